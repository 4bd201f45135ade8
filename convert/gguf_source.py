"""Read a GGUF file (llama.cpp's format) as a ``SourceModel``.

The file is memory-mapped by ``gguf.GGUFReader``; each tensor loader reads and dequantizes only its
own tensor and undoes what llama.cpp's converter changed (the Q/K row interleave of llama, the
``+1`` on Gemma's RMSNorm weights). Names come from gguf's own HF -> GGUF name table, applied to
the parameters of the mlx-lm model the config describes, so the file is checked against the model
before anything is converted. The tokenizer is rebuilt from the metadata with ``tokenizers``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    Keys,
    ReaderTensor,
    TokenType,
    dequantize,
    get_tensor_name_map,
)
from mlx.utils import tree_flatten
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from mlx_flash.runtime.adapters import build_model
from mlx_flash.runtime.errors import FlashFormatError, UnsupportedModelError

from .source import SourceModel, model_after_sanitize


@dataclass(frozen=True)
class _Arch:
    """How one GGUF architecture maps onto an mlx-lm model type."""

    model_type: str
    permute_qk: bool  # llama.cpp interleaves Q/K rows for its rotary mode ("LlamaModel.permute")
    norm_offset: float  # llama.cpp adds this to RMSNorm weights; mlx-lm's Gemma computes 1 + w


_ARCHS = {
    "llama": _Arch("llama", permute_qk=True, norm_offset=0.0),
    "qwen2": _Arch("qwen2", permute_qk=False, norm_offset=0.0),
    "qwen3": _Arch("qwen3", permute_qk=False, norm_offset=0.0),
    "gemma": _Arch("gemma", permute_qk=False, norm_offset=1.0),
    "gemma2": _Arch("gemma2", permute_qk=False, norm_offset=1.0),
    "gemma3": _Arch("gemma3_text", permute_qk=False, norm_offset=1.0),
    "qwen2moe": _Arch("qwen2_moe", permute_qk=False, norm_offset=0.0),
    "qwen3moe": _Arch("qwen3_moe", permute_qk=False, norm_offset=0.0),
    "olmoe": _Arch("olmoe", permute_qk=False, norm_offset=0.0),
}
# mlx-lm's names of stacked experts -> the HF names gguf's table knows (Mixtral is "llama" there)
_EXPERT_NAMES = (
    ("block_sparse_moe.switch_mlp.gate_proj", "block_sparse_moe.experts.w1"),
    ("block_sparse_moe.switch_mlp.down_proj", "block_sparse_moe.experts.w2"),
    ("block_sparse_moe.switch_mlp.up_proj", "block_sparse_moe.experts.w3"),
    (".mlp.switch_mlp.", ".mlp.experts."),
)
SUPPORTED_ARCHITECTURES = tuple(_ARCHS)

# Layer counts of the 27B Gemmas, whose query scale llama.cpp derives from hidden/heads,
# not head_dim.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

# Errors gguf's reader raises on a malformed file (it has no exception type of its own).
_READER_ERRORS = (
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    OverflowError,
    RecursionError,
    OSError,
)
_INT_TYPES = {
    GGUFValueType.UINT8,
    GGUFValueType.INT8,
    GGUFValueType.UINT16,
    GGUFValueType.INT16,
    GGUFValueType.UINT32,
    GGUFValueType.INT32,
    GGUFValueType.UINT64,
    GGUFValueType.INT64,
}
_FLOAT_TYPES = _INT_TYPES | {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
_NO_TOKEN = 0xFFFFFFFF  # llama.cpp's "no such token" id
_MAX_ARRAY_ITEMS = 1 << 24  # 64x the largest vocabularies; bounds parsing time on a damaged length
_REQUIRED = object()


class _CheckedReader(GGUFReader):
    """GGUFReader that rejects a corrupted length at once instead of walking the file item by item.

    The stock reader returns a short array for a read past the end of the file and parses metadata
    arrays one Python call per item, so a damaged array length makes it loop for minutes to hours.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        array = super()._get(offset, dtype, count, override_order)
        if len(array) != int(count):
            raise ValueError(f"data ends before offset {offset} + {int(count)} items")
        return array

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type == GGUFValueType.ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            scalar = self.gguf_scalar_to_np.get(item_type)
            # a string or array starts with 8+ bytes
            item_size = np.dtype(scalar).itemsize if scalar else 8
            if count > _MAX_ARRAY_ITEMS or count * item_size > len(self.data) - orig_offs - 12:
                raise ValueError(
                    f"metadata array of {count} items at offset {orig_offs} cannot fit the file"
                )
        return super()._get_field_parts(orig_offs, raw_type)


class _Metadata:
    """Typed access to GGUF key/values; a wrong type or a missing key is a format error."""

    def __init__(self, reader: GGUFReader, path: Path, arch: str = ""):
        self.reader, self.path, self.arch = reader, path, arch

    def _field(self, key: str, types: set, default: Any, array: bool = False) -> Any:
        key = key.format(arch=self.arch)
        field = self.reader.get_field(key)
        if field is None:
            if default is _REQUIRED:
                raise FlashFormatError(f"{self.path}: metadata field {key} is missing")
            return default
        is_array = field.types[0] == GGUFValueType.ARRAY
        item_type = field.types[-1] if len(field.types) > 1 else None
        if is_array != array or (item_type if array else field.types[0]) not in types | {None}:
            raise FlashFormatError(f"{self.path}: metadata field {key} has type {field.types}")
        try:
            return field.contents()
        except ValueError as e:  # undecodable UTF-8
            raise FlashFormatError(f"{self.path}: metadata field {key}: {e}") from e

    def get_int(
        self, key: str, default: Any = _REQUIRED, minimum: int = 1, maximum: int = 2**31 - 1
    ) -> Any:
        value = self._field(key, _INT_TYPES, default)
        if value is not default and not minimum <= value <= maximum:
            raise FlashFormatError(
                f"{self.path}: metadata field {key.format(arch=self.arch)} = {value}"
            )
        return value

    def get_float(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._field(key, _FLOAT_TYPES, default)
        if value is not default and not (math.isfinite(value) and value > 0):
            raise FlashFormatError(
                f"{self.path}: metadata field {key.format(arch=self.arch)} = {value}"
            )
        return value

    def get_str(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._field(key, {GGUFValueType.STRING}, default)

    def get_bool(self, key: str, default: bool) -> bool:
        return bool(self._field(key, {GGUFValueType.BOOL}, default))

    def get_list(self, key: str, types: set, default: Any = _REQUIRED) -> Any:
        return self._field(key, types, default, array=True)


@dataclass
class _Vocab:
    """The tokenizer as the GGUF metadata describes it (``tokenizer.ggml.*``)."""

    arch: str
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str | None
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]
    special: dict[str, int]  # bos/eos/unk/pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    max_length: int


def open_gguf(path: Path) -> SourceModel:
    """Open a GGUF file; raise FlashFormatError if it is damaged, UnsupportedModelError if we
    can't map it."""
    path = Path(path)
    reader = _read(path)
    meta = _Metadata(reader, path)
    arch = meta.get_str(Keys.General.ARCHITECTURE)
    if arch not in _ARCHS:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    meta.arch = arch
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, tensors)
    names = _match_tensors(path, arch, config, tensors)
    vocab = _read_vocab(meta, config) if meta.reader.get_field(Keys.Tokenizer.LIST) else None
    if vocab is not None:
        config.update(
            {f"{k}_token_id": vocab.special[k] for k in ("bos", "eos") if k in vocab.special}
        )
    loaders = {
        mlx_name: _loader(tensors[gguf_name], _fixup(mlx_name, _ARCHS[arch], config))
        for mlx_name, gguf_name in names.items()
    }
    return SourceModel(
        config=config,
        tensors=loaders,
        write_tokenizer=lambda out_dir: _write_tokenizer(path, vocab, Path(out_dir)),
        description=f"GGUF file {path} ({arch}, {_main_type(reader)})",
    )


def _read(path: Path) -> GGUFReader:
    """Parse the header; every way gguf rejects a file becomes a FlashFormatError naming it."""
    if not path.is_file():
        raise FlashFormatError(f"{path}: no such GGUF file")
    try:
        reader = _CheckedReader(path)
    except _READER_ERRORS as e:
        raise FlashFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    if reader.byte_order != "I":
        raise UnsupportedModelError(f"{path}: GGUF files of the other byte order are not supported")
    return reader


def _config(meta: _Metadata, tensors: dict[str, ReaderTensor]) -> dict:
    """The mlx-lm config.json the metadata describes."""
    arch = meta.arch
    embed = tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise FlashFormatError(f"{meta.path}: no 2-D token_embd.weight tensor")
    hidden = meta.get_int(Keys.LLM.EMBEDDING_LENGTH)
    heads = meta.get_int(Keys.Attention.HEAD_COUNT)
    head_dim = meta.get_int(Keys.Attention.KEY_LENGTH, hidden // heads)
    layers = meta.get_int(Keys.LLM.BLOCK_COUNT)
    config = {
        "model_type": _ARCHS[arch].model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": meta.get_int(Keys.LLM.FEED_FORWARD_LENGTH),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get_int(Keys.Attention.HEAD_COUNT_KV, heads),
        "head_dim": head_dim,
        "rms_norm_eps": _round(meta.get_float(Keys.Attention.LAYERNORM_RMS_EPS)),
        "rope_theta": _round(meta.get_float(Keys.Rope.FREQ_BASE, 10000.0)),
        "vocab_size": int(embed.shape[1]),
        "max_position_embeddings": meta.get_int(Keys.LLM.CONTEXT_LENGTH, 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    _check_heads(meta, config, meta.get_int(Keys.Rope.DIMENSION_COUNT, head_dim))
    _check_layers(meta.path, layers, tensors)
    scaling = _rope_scaling(meta)
    if scaling:
        config["rope_scaling"] = scaling
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if arch in _GEMMA_27B_LAYERS:
        is_27b = layers == _GEMMA_27B_LAYERS[arch]
        config["query_pre_attn_scalar"] = hidden // heads if is_27b else head_dim
    if arch == "gemma2":
        config["attn_logit_softcapping"] = meta.get_float(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, 50.0)
        config["final_logit_softcapping"] = meta.get_float(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 30.0)
    config.update(_moe_config(meta))
    if arch == "gemma3":
        # llama.cpp hard-codes these two for gemma3; newer files may state the base frequency.
        config["sliding_window_pattern"] = 6
        # not in older gguf Keys
        config["rope_local_base_freq"] = meta.get_float("{arch}.rope.freq_base_swa", 10000.0)
        config["sliding_window"] = meta.get_int(Keys.Attention.SLIDING_WINDOW, 512)
    return config


def _moe_config(meta: _Metadata) -> dict:
    """The expert settings of a mixture-of-experts file (none for dense ones): llama.cpp's
    ``expert_*`` keys in mlx-lm's names; a llama file with experts is Mixtral."""
    experts = meta.get_int(Keys.LLM.EXPERT_COUNT, 0, minimum=0)
    if not experts:
        return {}
    used = meta.get_int(Keys.LLM.EXPERT_USED_COUNT, maximum=experts)
    if meta.arch == "llama":
        return {"model_type": "mixtral", "num_local_experts": experts, "num_experts_per_tok": used}
    config = {"num_experts": experts, "num_experts_per_tok": used}
    if meta.arch == "qwen3moe":  # llama.cpp renormalises the top-k weights unless told not to
        config.update(decoder_sparse_step=1, mlp_only_layers=[])
        config["norm_topk_prob"] = meta.get_bool(Keys.LLM.EXPERT_WEIGHTS_NORM, True)
    if meta.arch == "olmoe":
        config["norm_topk_prob"] = meta.get_bool(Keys.LLM.EXPERT_WEIGHTS_NORM, False)
    if meta.arch in ("qwen2moe", "qwen3moe"):
        config["moe_intermediate_size"] = meta.get_int(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)
    if meta.arch == "qwen2moe":
        shared = Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH
        config["shared_expert_intermediate_size"] = meta.get_int(shared)
    return config


def gguf_lookup_name(name: str) -> str:
    """The name to look an mlx-lm parameter up by in gguf's HF -> GGUF table."""
    for mlx_name, hf_name in _EXPERT_NAMES:
        if mlx_name in name:
            return name.replace(mlx_name, hf_name)
    return name


def _round(value: float) -> float:
    """float32 metadata as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{value:.7g}")


def _check_heads(meta: _Metadata, config: dict, rope_dims: int) -> None:
    """Head counts the attention layout (and the Q/K un-permutation) can work with."""
    heads, kv_heads, head_dim = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    if heads % kv_heads or head_dim % 2 or not 0 < rope_dims <= head_dim:
        raise FlashFormatError(
            f"{meta.path}: {heads} heads, {kv_heads} KV heads, head size {head_dim}, "
            f"{rope_dims} rotary dims"
        )
    if rope_dims != head_dim:
        raise UnsupportedModelError(
            f"{meta.path}: rotary embedding on {rope_dims} of {head_dim} head dims"
        )


def _check_layers(path: Path, layers: int, tensors: dict[str, ReaderTensor]) -> None:
    """block_count must match the blocks present (and bounds the model built from the config)."""
    present = {int(m.group(1)) for name in tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    if present != set(range(layers)):
        raise FlashFormatError(
            f"{path}: block_count is {layers} but the file has tensors for {len(present)} blocks"
        )


def _rope_scaling(meta: _Metadata) -> dict | None:
    """mlx-lm's rope_scaling for the kinds it shares with llama.cpp (linear)."""
    kind = meta.get_str(Keys.Rope.SCALING_TYPE, "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise UnsupportedModelError(
            f"{meta.path}: rope scaling {kind!r} is not supported (only linear)"
        )
    return {"type": "linear", "factor": meta.get_float(Keys.Rope.SCALING_FACTOR)}


def _match_tensors(
    path: Path, arch: str, config: dict, tensors: dict[str, ReaderTensor]
) -> dict[str, str]:
    """mlx-lm parameter name -> GGUF tensor name, checked both ways and shape by shape.

    The expected parameters are those of the mlx-lm model built (lazily, nothing is allocated) from
    ``config``; gguf's HF -> GGUF table names each one's GGUF tensor.
    """
    arch_id = {name: arch_id for arch_id, name in MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_id is None:
        raise UnsupportedModelError(
            f"{path}: this version of the gguf package does not know {arch!r}; upgrade it"
        )
    table = get_tensor_name_map(arch_id, config["num_hidden_layers"])

    def gguf_name(name: str) -> str | None:
        return table.get_name(gguf_lookup_name(name), try_suffixes=(".weight", ".bias"))

    present = [name for name in _model_shapes(path, config) if gguf_name(name) in tensors]
    # what mlx-lm's sanitize leaves given these tensors (a tied head: no lm_head, in Gemma 3 too)
    expected = _model_shapes(path, config, present)
    names = {name: gguf_name(name) for name in expected}
    unmapped = sorted(name for name, gguf_name in names.items() if gguf_name is None)
    if unmapped:
        raise UnsupportedModelError(
            f"{path}: no GGUF tensor name for mlx-lm parameters {unmapped[:5]}"
        )
    missing = sorted(gguf_name for gguf_name in names.values() if gguf_name not in tensors)
    if missing:
        raise FlashFormatError(f"{path}: tensors missing: {', '.join(missing[:5])}")
    extra = sorted(set(tensors) - set(names.values()))
    if extra:
        raise UnsupportedModelError(
            f"{path}: tensors with no place in mlx-lm's {config['model_type']}: {extra[:5]}"
        )
    for name, gguf_name in names.items():
        shape = tuple(int(d) for d in reversed(tensors[gguf_name].shape))
        if shape != expected[name]:
            raise FlashFormatError(
                f"{path}: tensor {gguf_name} has shape {shape}, the config implies {expected[name]}"
            )
        _check_type(path, tensors[gguf_name])
    return names


def _model_shapes(
    path: Path, config: dict, present: list[str] | None = None
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the mlx-lm model for ``config`` (lazy arrays: nothing is computed);
    with ``present``, of that model as its sanitize leaves it given weights with those names."""
    try:
        model = build_model(config) if present is None else model_after_sanitize(config, present)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, OverflowError) as e:
        raise FlashFormatError(
            f"{path}: mlx-lm cannot build a model from this metadata: {e}"
        ) from e
    return {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}


def _check_type(path: Path, tensor: ReaderTensor) -> None:
    """Fail at open time, not mid-conversion, on a tensor type gguf cannot dequantize."""
    if not _dequantizable(tensor.tensor_type):
        raise UnsupportedModelError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}"
        )


@cache
def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf's dequantize handles ``qtype`` (probed on one zero block)."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    if qtype not in GGML_QUANT_SIZES:
        return False
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _fixup(name: str, arch: _Arch, config: dict) -> Callable[[np.ndarray], np.ndarray] | None:
    """The inverse of what llama.cpp's converter did to this tensor, if anything."""
    if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
        return lambda w: _unpermute(w, config["num_attention_heads"])
    if arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
        return lambda w: _unpermute(w, config["num_key_value_heads"])
    if arch.norm_offset and name.endswith("norm.weight"):
        return lambda w: (w.astype(np.float32) - arch.norm_offset).astype(w.dtype)
    return None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of mlx_lm.gguf.permute_weights / llama.cpp's LlamaModel.permute
    (interleaved -> halves)."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _loader(tensor: ReaderTensor, fixup: Callable | None) -> Callable[[], mx.array]:
    """Reads (from the mmap) and dequantizes this one tensor: F16 stays float16, the rest is
    float32."""

    def load() -> mx.array:
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            array = np.asarray(tensor.data)
        elif fixup is None and tensor.data.ndim == 2:
            return _dequantize_into_mlx(tensor)
        else:
            array = dequantize(tensor.data, tensor.tensor_type)
        return mx.array(fixup(array) if fixup else array)

    return load


def _dequantize_into_mlx(tensor: ReaderTensor, rows_per_chunk: int = 1024) -> mx.array:
    """Dequantize a 2-D tensor a block of rows at a time straight into a preallocated MLX array.

    Dequantizing the whole tensor at once would hold several full-size float32 temporaries plus the
    copy ``mx.array`` makes: for an embedding that is the converter's peak memory.
    """
    rows = tensor.data.shape[0]
    out = mx.zeros((rows, int(tensor.n_elements) // rows), dtype=mx.float32)
    mx.eval(out)
    view = np.array(out, copy=False)  # writable, shares memory with ``out``
    for start in range(0, rows, rows_per_chunk):
        view[start : start + rows_per_chunk] = dequantize(
            tensor.data[start : start + rows_per_chunk], tensor.tensor_type
        )
    return out


def _main_type(reader: GGUFReader) -> str:
    """The tensor type that holds most of the weights, e.g. Q4_1."""
    counts = Counter()
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] += tensor.n_elements
    return counts.most_common(1)[0][0] if counts else "no tensors"


def _read_vocab(meta: _Metadata, config: dict) -> _Vocab:
    """Read and check the tokenizer metadata (building the tokenizer waits for write_tokenizer)."""
    tok = Keys.Tokenizer
    model = meta.get_str(tok.MODEL)
    if model not in ("llama", "gpt2"):
        raise UnsupportedModelError(
            f"{meta.path}: tokenizer model {model!r} is not supported (llama, gpt2)"
        )
    tokens = meta.get_list(tok.LIST, {GGUFValueType.STRING})
    n = len(tokens)
    if not 0 < n <= config["vocab_size"]:
        raise FlashFormatError(
            f"{meta.path}: {n} tokens for an embedding of {config['vocab_size']} rows"
        )
    scores = meta.get_list(tok.SCORES, _FLOAT_TYPES, [-float(i) for i in range(n)])
    types = meta.get_list(tok.TOKEN_TYPE, _INT_TYPES, [int(TokenType.NORMAL)] * n)
    if len(scores) != n or len(types) != n:
        raise FlashFormatError(
            f"{meta.path}: {n} tokens but {len(scores)} scores and {len(types)} token types"
        )
    pre = meta.get_str(tok.PRE, None)
    if model == "gpt2" and pre not in _BYTE_LEVEL_SPLITS:
        raise UnsupportedModelError(
            f"{meta.path}: pre-tokenizer {pre!r} is not supported "
            f"({', '.join(map(str, _BYTE_LEVEL_SPLITS))})"
        )
    special = {}
    for name, key in (
        ("bos", tok.BOS_ID),
        ("eos", tok.EOS_ID),
        ("unk", tok.UNK_ID),
        ("pad", tok.PAD_ID),
    ):
        token_id = meta.get_int(key, _NO_TOKEN, minimum=0, maximum=_NO_TOKEN)
        if token_id != _NO_TOKEN:
            if token_id >= n:
                raise FlashFormatError(f"{meta.path}: {key} = {token_id}, but there are {n} tokens")
            special[name] = token_id
    return _Vocab(
        arch=meta.arch,
        model=model,
        pre=pre,
        tokens=tokens,
        scores=scores,
        types=types,
        merges=meta.get_list(tok.MERGES, {GGUFValueType.STRING}, []),
        special=special,
        # llama.cpp's defaults: a SentencePiece vocabulary adds BOS and a prefix space
        # unless told not to.
        add_bos=meta.get_bool(tok.ADD_BOS, model == "llama"),
        add_eos=meta.get_bool(tok.ADD_EOS, False),
        add_space_prefix=meta.get_bool(tok.ADD_PREFIX, model == "llama"),
        chat_template=meta.get_str(tok.CHAT_TEMPLATE, None),
        max_length=config["max_position_embeddings"],
    )


def _write_tokenizer(path: Path, vocab: _Vocab | None, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for ``mlx_lm.utils.load_tokenizer``."""
    if vocab is None:
        raise UnsupportedModelError(f"{path}: the file has no tokenizer (tokenizer.ggml.tokens)")
    try:
        tokenizer = (
            _spm_tokenizer(vocab) if vocab.model == "llama" else _byte_level_tokenizer(vocab)
        )
        _add_special_tokens(tokenizer, vocab)
        tokenizer.post_processor = _bos_eos_template(vocab)
    except Exception as e:  # tokenizers reports a vocabulary it rejects as a bare Exception
        raise FlashFormatError(f"{path}: cannot build a tokenizer from its metadata: {e}") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(vocab), indent=2, ensure_ascii=False)
    )


def _spm_tokenizer(vocab: _Vocab) -> Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: merge the pair whose result scores highest, bytes
    as <0xNN>."""
    tokens = vocab.tokens
    if vocab.arch.startswith("gemma"):
        # Gemma files store its whitespace tokens with real spaces; the BPE works on "▁".
        tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    ids = {token: i for i, token in reversed(list(enumerate(tokens)))}
    # Gemma's scores do not follow its merge order, its token order does (found by transformers'
    # GGUF loader).
    rank = [-i for i in range(len(tokens))] if vocab.arch.startswith("gemma") else vocab.scores
    unk = vocab.special.get("unk")
    model = models.BPE(
        vocab=ids,
        merges=_spm_merges(tokens, rank, vocab.types, ids),
        unk_token=tokens[unk] if unk is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    # A normalizer, not Metaspace: Metaspace skips the prefix when the text already starts with a
    # space, SentencePiece does not; and like llama.cpp it prefixes each piece of text after a
    # special token.
    steps = [normalizers.Prepend("▁")] if vocab.add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    # the shapes mlx-lm's SPM streaming detokenizer recognises
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _spm_merges(
    tokens: list[str], rank: list[float], types: list[int], ids: dict[str, int]
) -> list[tuple[str, str]]:
    """Every split of a mergeable token into two known tokens, best-scoring result first."""
    mergeable = {int(TokenType.NORMAL), int(TokenType.USER_DEFINED)}
    merges = []
    for i, token in enumerate(tokens):
        if types[i] not in mergeable or ids.get(token) != i:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                merges.append((-rank[i], i, ids[left], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


# llama.cpp's `tokenizer.ggml.pre` -> how the text is split before byte-level BPE (None:
# GPT-2's regex).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL_SPLITS = {
    None: None,
    "default": None,
    "gpt-2": None,
    "smollm": "digits",
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


def _byte_level_tokenizer(vocab: _Vocab) -> Tokenizer:
    """GPT-2 style byte-level BPE from the tokens and merges as the file spells them."""
    merges = [tuple(merge.split(" ")) for merge in vocab.merges]
    if any(len(merge) != 2 for merge in merges):
        raise ValueError("a merge is not two tokens separated by one space")
    ids = {token: i for i, token in reversed(list(enumerate(vocab.tokens)))}
    tokenizer = Tokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=False))
    split = _BYTE_LEVEL_SPLITS[vocab.pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if split == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    elif split is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    if vocab.pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, vocab: _Vocab) -> None:
    """Control tokens match whole and are special; user-defined ones match whole too (as
    llama.cpp does)."""
    special = {int(TokenType.CONTROL), int(TokenType.UNKNOWN)}
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(vocab.tokens, vocab.types, strict=True)
            if kind in special
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(vocab.tokens, vocab.types, strict=True)
            if kind == TokenType.USER_DEFINED
        ]
    )


def _bos_eos_template(vocab: _Vocab) -> processors.TemplateProcessing | None:
    """Post-processor adding BOS/EOS the way the file's add_bos_token / add_eos_token say."""
    bos = vocab.special.get("bos") if vocab.add_bos else None
    eos = vocab.special.get("eos") if vocab.add_eos else None
    if bos is None and eos is None:
        return None
    used = [i for i in (bos, eos) if i is not None]
    prefix = f"{vocab.tokens[bos]} " if bos is not None else ""
    suffix = f" {vocab.tokens[eos]}" if eos is not None else ""
    return processors.TemplateProcessing(
        single=f"{prefix}$A{suffix}",
        pair=f"{prefix}$A{suffix} {prefix}$B:1{suffix}",
        special_tokens=[(vocab.tokens[i], i) for i in dict.fromkeys(used)],
    )


def _tokenizer_config(vocab: _Vocab) -> dict:
    """tokenizer_config.json: special tokens, BOS/EOS flags, chat template."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": vocab.max_length,
    }
    config.update({f"{name}_token": vocab.tokens[i] for name, i in vocab.special.items()})
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    return config
