"""Tiny random models built with mlx-lm's own classes, written as mlx-lm directories.

Why: the doctor checks this machine's flash path against plain mlx-lm on one, and the tests build
one of every supported architecture. Sizes are small, but FFN widths are multiples of 64 so
quantization applies; weights are scaled so activations stay sane.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import save_config, save_model

D, FFN, LAYERS, VOCAB = 64, 128, 2, 256

COMMON = dict(
    hidden_size=D,
    num_hidden_layers=LAYERS,
    intermediate_size=FFN,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    norm_eps=1e-5,
    layer_norm_eps=1e-5,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

TINY_LLAMA = dict(COMMON, model_type="llama")

_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (normal, std 0.2), evaluated."""
    mx.random.seed(seed)
    model.update(
        tree_map(lambda p: mx.random.normal(p.shape, dtype=mx.float32) * 0.2, model.parameters())
    )
    mx.eval(model.parameters())
    return model


def save_model_dir(
    model: nn.Module, config: dict, path: Path, dtype: mx.Dtype = mx.float32
) -> dict[str, mx.array]:
    """Write ``model`` as an mlx-lm directory (weights in ``dtype``, config, a byte-level
    tokenizer); returns the weights written."""
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(dict(config, torch_dtype=_DTYPE_NAMES[dtype]), path / "config.json")
    write_tiny_tokenizer(path)
    return dict(tree_flatten(model.parameters()))


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A tiny random llama as an mlx-lm directory at ``path``."""
    from .runtime.adapters import build_model

    save_model_dir(randomize(build_model(TINY_LLAMA), seed), TINY_LLAMA, path)
    return path


def write_tiny_tokenizer(path: Path) -> None:
    """A byte-level tokenizer of VOCAB entries, enough for mlx-lm's load_tokenizer and generate."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(alphabet)[: VOCAB - 1])}
    vocab["<eos>"] = VOCAB - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", '
        '"model_max_length": 256}'
    )
