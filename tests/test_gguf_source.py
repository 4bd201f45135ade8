"""GGUF reader: real models generate what llama.cpp's originals do, tokenizers round-trip, damaged
files give our errors only."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm import generate, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_tokenizer

import mlx_flash
from conftest import convert_quietly
from mlx_flash.convert.gguf_source import SUPPORTED_ARCHITECTURES, gguf_lookup_name, open_gguf
from mlx_flash.convert.source import SourceModel
from mlx_flash.runtime.errors import FlashFormatError, UnsupportedModelError
from tiny_models import CONFIGS, build_model, has_untied_head

SHARED = Path(os.environ.get("MLX_FLASH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
STORIES = SHARED / "models" / "stories260K.gguf"
STORIES_REFERENCE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)
ROUND_TRIP_TEXTS = [
    "Once upon a time",
    " leading space, two  spaces and\nnew\n\nlines\t",
    "héllo wörld 🙂 日本語 1234567",
    "",
]


def load_model(source: SourceModel):
    """The mlx-lm model for a SourceModel, loaded strictly (every parameter, nothing more)."""
    model_class, args_class = _get_classes(source.config)
    model = model_class(args_class.from_dict(source.config))
    weights = {name: load() for name, load in source.tensors.items()}
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    return model


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> tuple[SourceModel, Path]:
    source = open_gguf(STORIES)
    tokenizer_dir = tmp_path_factory.mktemp("stories_tokenizer")
    source.write_tokenizer(tokenizer_dir)
    return source, tokenizer_dir


def test_stories260k_generates_the_reference_story(stories):
    source, tokenizer_dir = stories
    assert source.description == f"GGUF file {STORIES} (llama, F32)"
    tokenizer = load_tokenizer(tokenizer_dir)
    text = generate(load_model(source), tokenizer, "Once upon a time", max_tokens=60)
    assert ("Once upon a time" + text).startswith(STORIES_REFERENCE)


def test_stories260k_tokenizer_adds_one_bos_and_round_trips(stories):
    _, tokenizer_dir = stories
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenizer.encode("Once upon a time")
    assert ids[0] == tokenizer.bos_token_id == 1 and ids.count(1) == 1
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == ["▁Once", "▁upon", "▁a", "▁time"]
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def _field(number: int, value: bytes | int | float | str) -> bytes:
    """One protobuf field (wire types: varint, fixed32 float, length-delimited)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    if isinstance(value, float):
        return varint(number << 3 | 5) + np.float32(value).tobytes()
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int]):
    """A SentencePiece BPE model with these pieces, llama2.c's settings (identity normaliser,
    byte fallback).

    The ModelProto is written by hand so the test needs no protobuf package.
    """
    import sentencepiece

    pieces = b"".join(
        _field(1, _field(1, t) + _field(2, float(s)) + _field(3, int(k)))
        for t, s, k in zip(tokens, scores, types, strict=True)
    )
    trainer = _field(3, 2) + _field(35, 1)  # model_type = BPE, byte_fallback
    # add_dummy_prefix, keep extra spaces
    normalizer = _field(1, "identity") + _field(3, 1) + _field(4, 0)
    proto = pieces + _field(2, trainer) + _field(3, normalizer)
    return sentencepiece.SentencePieceProcessor(model_proto=proto)


def test_stories260k_tokenizer_matches_sentencepiece(stories):
    """The rebuilt BPE splits real text exactly as SentencePiece does with the same pieces."""
    from tokenizers import Tokenizer

    reader = gguf.GGUFReader(STORIES)
    vocab = (
        reader.fields[f"tokenizer.ggml.{f}"].contents() for f in ("tokens", "scores", "token_type")
    )
    reference = sentencepiece_bpe(*vocab)
    ours = Tokenizer.from_file(str(stories[1] / "tokenizer.json"))
    shakespeare = (SHARED / "data" / "tinyshakespeare.txt").read_text().splitlines()[:400]
    for text in ROUND_TRIP_TEXTS + shakespeare:
        assert ours.encode(text, add_special_tokens=False).ids == reference.encode(text), text


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory) -> tuple[SourceModel, Path]:
    source = open_gguf(smollm2_gguf)
    tokenizer_dir = tmp_path_factory.mktemp("smollm2_tokenizer")
    source.write_tokenizer(tokenizer_dir)
    return source, tokenizer_dir


def test_smollm2_knows_the_capital_of_france(smollm2):
    source, tokenizer_dir = smollm2
    assert source.description.endswith("(llama, Q4_1)")
    assert source.config["tie_word_embeddings"] and "lm_head.weight" not in source.tensors
    # Q4_1 dequantized
    assert source.tensors["model.layers.0.mlp.up_proj.weight"]().dtype == mx.float32
    tokenizer = load_tokenizer(tokenizer_dir)
    first = next(
        stream_generate(load_model(source), tokenizer, "The capital of France is", max_tokens=1)
    )
    assert tokenizer.convert_ids_to_tokens(first.token) == "ĠParis"


def test_smollm2_tokenizer_round_trips_and_keeps_chat_tokens(smollm2):
    tokenizer = load_tokenizer(smollm2[1])
    # no BOS
    assert tokenizer.encode("The capital") == tokenizer.encode("The") + tokenizer.encode(" capital")
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>user") == [1] + tokenizer.encode("user")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.startswith("<|im_start|>system\n")


# --- every supported architecture, through a GGUF written the way llama.cpp's converter writes it

GGUF_ARCHS = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}


def write_like_llama_cpp(
    path: Path,
    arch: str,
    model,
    config: dict,
    types: dict[str, int] | None = None,
    tokenizer: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    metadata: Callable[[gguf.GGUFWriter], None] | None = None,
) -> None:
    """A GGUF of ``model`` with llama.cpp's names, Q/K interleave (llama) and +1 norms (Gemma).

    ``tokenizer``: add a byte-level vocabulary (so the file converts); ``extra``: more tensors,
    by GGUF name; ``metadata``: adds metadata (a MoE's expert counts)."""
    from mlx_lm.gguf import permute_weights

    writer = gguf.GGUFWriter(str(path), arch)
    if metadata is not None:
        metadata(writer)
    if tokenizer:
        _add_byte_level_vocabulary(writer, config["vocab_size"])
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_context_length(config["max_position_embeddings"])
    if "sliding_window" in config:
        writer.add_sliding_window(config["sliding_window"])
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    table = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value)
        if arch == "llama" and ".q_proj." in name:
            array = np.array(permute_weights(value, config["num_attention_heads"]))
        if arch == "llama" and ".k_proj." in name:
            array = np.array(
                permute_weights(value, config["num_attention_heads"], config["num_key_value_heads"])
            )
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1
        gguf_name = table.get_name(gguf_lookup_name(name), try_suffixes=(".weight", ".bias"))
        qtype = gguf.GGMLQuantizationType((types or {}).get(name, gguf.GGMLQuantizationType.F32))
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, array)
        else:
            writer.add_tensor(gguf_name, gguf.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_byte_level_vocabulary(writer: gguf.GGUFWriter, size: int) -> None:
    """GPT-2 style byte tokens and an end-of-sequence token: ``size`` ids, no merges."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())[: size - 1] + ["<eos>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (size - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges([])
    writer.add_eos_token_id(size - 1)


def _gemma3_six_layers(monkeypatch) -> None:
    """llama.cpp fixes Gemma 3's local/global layer pattern at 6 (and mlx-lm needs that many
    layers)."""
    gemma3 = dict(CONFIGS["gemma3_text"], num_hidden_layers=6, sliding_window_pattern=6)
    monkeypatch.setitem(CONFIGS, "gemma3_text", gemma3)


@pytest.mark.parametrize("arch", sorted(GGUF_ARCHS))
def test_each_architecture_reads_back_the_model_it_was_written_from(arch, tmp_path, monkeypatch):
    _gemma3_six_layers(monkeypatch)
    model, config = build_model(GGUF_ARCHS[arch])
    write_like_llama_cpp(tmp_path / "m.gguf", arch, model, config)
    source = open_gguf(tmp_path / "m.gguf")
    assert source.config["model_type"] == GGUF_ARCHS[arch]
    original = dict(tree_flatten(model.parameters()))
    assert source.tensors.keys() == original.keys()
    for name, load in source.tensors.items():
        # Gemma norms: +1 -1
        assert mx.allclose(load(), original[name], rtol=0, atol=1e-6).item(), name
    tokens = mx.array([[1, 5, 9, 200, 3, 7]])
    assert mx.allclose(load_model(source)(tokens), model(tokens), atol=1e-4)
    with pytest.raises(UnsupportedModelError, match="no tokenizer"):
        source.write_tokenizer(tmp_path / "tok")


ALWAYS_TIED = ("gemma", "gemma2")  # mlx-lm's models have no head of their own (refused below)
HEADS = [
    pytest.param(arch, tied, id=f"{arch}-{'tied' if tied else 'untied'}")
    for arch in sorted(GGUF_ARCHS)
    for tied in (True, False)
    if tied or arch not in ALWAYS_TIED
]


@pytest.mark.parametrize("arch, tied", HEADS)
def test_tied_and_untied_heads_convert_and_match_mlx_lm(arch, tied, tmp_path, monkeypatch):
    """A GGUF without output.weight (a tied head, as real Gemma 3 files are) and one with it both
    convert, and the flash model computes what the mlx-lm model they were written from does."""
    _gemma3_six_layers(monkeypatch)
    model, config = build_model(GGUF_ARCHS[arch], tied=tied)
    assert has_untied_head(model) == (not tied)
    write_like_llama_cpp(tmp_path / "m.gguf", arch, model, config, tokenizer=True)
    flash_dir = convert_quietly(tmp_path / "m.gguf", tmp_path / "flash")
    flash, _ = mlx_flash.load(flash_dir, "1GB", ffn_cache=0.5, pin_share=0.0)
    tokens = mx.array([[1, 5, 9, 200, 3, 7]])
    np.testing.assert_allclose(np.array(flash(tokens)), np.array(model(tokens)), atol=1e-4)
    cache = make_prompt_cache(flash)  # a decode step goes through the neuron buffers
    flash(tokens, cache=cache)
    step = flash(mx.array([[11]]), cache=cache)
    expected = model(mx.concatenate([tokens, mx.array([[11]])], axis=1))[:, -1:]
    np.testing.assert_allclose(np.array(step), np.array(expected), atol=1e-4)


@pytest.mark.parametrize("arch", ALWAYS_TIED)
def test_an_output_head_gemma_cannot_hold_is_refused(arch, tmp_path):
    model, config = build_model(arch)
    head = np.zeros((config["vocab_size"], config["hidden_size"]), np.float32)
    write_like_llama_cpp(tmp_path / "m.gguf", arch, model, config, extra={"output.weight": head})
    with pytest.raises(UnsupportedModelError, match=f"no place in mlx-lm's {arch}: .*output"):
        open_gguf(tmp_path / "m.gguf")


def test_f16_stays_float16_and_quantized_tensors_dequantize_to_float32(tmp_path):
    model, config = build_model("llama")
    F16, Q8_0 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
    types = {
        "model.layers.0.mlp.down_proj.weight": F16,
        "model.layers.0.self_attn.q_proj.weight": Q8_0,
    }
    write_like_llama_cpp(tmp_path / "m.gguf", "llama", model, config, types)
    source = open_gguf(tmp_path / "m.gguf")
    original = dict(tree_flatten(model.parameters()))
    down, q = (source.tensors[name]() for name in types)
    assert down.dtype == mx.float16
    assert mx.array_equal(
        down, original["model.layers.0.mlp.down_proj.weight"].astype(mx.float16)
    ).item()
    assert q.dtype == mx.float32
    assert mx.allclose(
        q, original["model.layers.0.self_attn.q_proj.weight"], atol=0.01
    ).item()  # Q8_0 error
    assert source.description.endswith("(llama, F32)")


# --- errors ---


def test_non_gguf_files_raise_format_errors_naming_the_file(tmp_path):
    cases = {
        "text.gguf": b"this is not a gguf file at all",
        "empty.gguf": b"",
        "truncated.gguf": STORIES.read_bytes()[:5000],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FlashFormatError, match=name):
            open_gguf(tmp_path / name)
    with pytest.raises(FlashFormatError, match="missing.gguf"):
        open_gguf(tmp_path / "missing.gguf")


def test_unknown_architecture_is_unsupported_and_lists_supported_ones(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        UnsupportedModelError, match="'mamba'.*" + ", ".join(SUPPORTED_ARCHITECTURES)
    ):
        open_gguf(tmp_path / "mamba.gguf")


def _structure_offsets() -> list[int]:
    """Where stories260K's key/value entries and tensor infos start: mutations there hit lengths
    and types."""
    reader = gguf.GGUFReader(STORIES)
    return sorted(
        {f.offset for f in reader.fields.values()} | {t.field.offset for t in reader.tensors}
    )


_HEADER = gguf.GGUFReader(STORIES).data_offset
_position = st.one_of(
    st.integers(0, _HEADER - 1),
    st.builds(
        lambda start, delta: min(start + delta, _HEADER - 1),
        st.sampled_from(_structure_offsets()),
        st.integers(0, 47),
    ),
)
_flip = st.one_of(st.sampled_from([1 << bit for bit in range(8)]), st.integers(1, 255))  # XOR mask


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    edits=st.lists(st.tuples(_position, _flip), min_size=1, max_size=6),
    # cut 1 time in 4
    cut=st.one_of(st.none(), st.none(), st.none(), st.integers(0, _HEADER + 4096)),
)
def test_mutated_headers_raise_only_our_errors(edits, cut):
    data = bytearray(STORIES.read_bytes())
    for position, mask in edits:
        data[position] ^= mask
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.gguf"
        path.write_bytes(bytes(data[:cut] if cut is not None else data))
        try:
            source = open_gguf(path)
            for load in source.tensors.values():
                load()
            source.write_tokenizer(Path(tmp) / "tokenizer")
        except (FlashFormatError, UnsupportedModelError):
            pass
