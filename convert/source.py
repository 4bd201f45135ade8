"""A source model, whatever it was read from: an mlx-lm config plus lazily loaded tensors.

Readers (Hugging Face / mlx-lm directories, hub repos, GGUF files) all produce a ``SourceModel`` so
the writer can pull one layer's tensors at a time and never needs the whole model in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_flash.runtime.adapters import build_model


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


def model_after_sanitize(config: dict, names: Iterable[str]):
    """The mlx-lm model for ``config`` (lazy: nothing is allocated) as its own ``sanitize`` leaves
    it after seeing weights with these (mlx-lm, post-sanitize) names.

    Why: some models decide their structure in ``sanitize``, not in the config. Gemma 3 always
    builds an ``lm_head`` and drops it when the checkpoint has none (a tied head). mlx-lm's
    ``load_model`` sanitizes before its strict load, so the parameters left here are exactly those
    the runtime will load. Only the names matter: ``sanitize`` gets the model's own lazy
    parameters and empty placeholders for the rest (on mlx-lm names, every supported sanitize
    is idempotent; the loader relies on that too, as it sanitizes the converted trunk again).
    """
    model = build_model(config)
    if hasattr(model, "sanitize"):
        own = dict(tree_flatten(model.parameters()))
        model.sanitize({name: own.get(name, mx.zeros((0,))) for name in names})
    return model
