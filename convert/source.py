"""A source model, whatever it was read from: an mlx-lm config plus lazily loaded tensors.

Readers (Hugging Face / mlx-lm directories, hub repos, GGUF files) all produce a ``SourceModel`` so
the writer can pull one layer's tensors at a time and never needs the whole model in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx


@dataclass
class SourceModel:
    """``config``: an mlx-lm ``config.json`` dict (model_type, sizes, ``quantization`` if any).
    ``tensors``: mlx-lm parameter name (after ``sanitize``) -> zero-argument loader returning the
    array; calling a loader must read only that tensor.
    ``write_tokenizer``: writes the tokenizer files (tokenizer.json, tokenizer_config.json, ...)
    into a dir.
    ``description``: where it came from, for the manifest and messages.
    """

    config: dict
    tensors: dict[str, Callable[[], mx.array]]
    write_tokenizer: Callable[[Path], None]
    description: str
    extra_files: dict[str, bytes] = field(default_factory=dict)
