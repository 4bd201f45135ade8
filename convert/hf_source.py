"""Read a Hugging Face / mlx-lm model directory (or a hub repo id) as a ``SourceModel``.

Tensors are loaded lazily with ``mx.load`` and renamed by the model's own ``sanitize``, so a
tensor's bytes are read only when the writer evaluates it.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import load_config

from mlx_flash.runtime.adapters import check_supported, model_classes
from mlx_flash.runtime.errors import FlashFormatError, UnsupportedModelError

from .source import SourceModel

TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "*.tiktoken",
    "tiktoken.model",
)


def resolve_model_path(path_or_repo: str, revision: str | None = None) -> Path:
    """A local directory as is; otherwise download the repo from the Hugging Face hub."""
    path = Path(path_or_repo)
    if path.exists():
        return path
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/")):
        raise FlashFormatError(
            f"{path_or_repo}: no such file or directory (and not a hub repo id like org/name)"
        )
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            path_or_repo,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    )


def open_hf_directory(path: Path) -> SourceModel:
    """A SourceModel over ``path/model*.safetensors`` and ``path/config.json``."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FlashFormatError(
            f"{config_file}: missing; {path} is not a Hugging Face / mlx-lm model directory"
        )
    try:
        config = load_config(path)
    except json.JSONDecodeError as e:
        raise FlashFormatError(f"{config_file}: not valid JSON ({e})") from e
    if "model_type" not in config:
        raise FlashFormatError(f"{config_file}: has no model_type")
    # unsupported architectures fail before any weight is touched
    check_supported(config["model_type"])
    files = sorted(glob.glob(str(path / "model*.safetensors")))
    if not files:
        raise FlashFormatError(f"{path}: no model*.safetensors weight files")
    try:
        model_class, args_class = model_classes(config)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{config_file}: {e}") from e
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(f))
        except (RuntimeError, ValueError) as e:
            raise FlashFormatError(f"{f}: cannot read safetensors ({e})") from e
    if hasattr(model_class, "sanitize"):
        # sanitize is an instance method; the model's own parameters stay lazy and are
        # never evaluated.
        weights = model_class(args_class.from_dict(config)).sanitize(weights)

    def write_tokenizer(out: Path) -> None:
        for pattern in TOKENIZER_PATTERNS:
            for f in glob.glob(str(path / pattern)):
                shutil.copy2(f, out / Path(f).name)

    return SourceModel(
        config=config,
        tensors={name: (lambda n=name: weights.pop(n)) for name in list(weights)},
        write_tokenizer=write_tokenizer,
        description=f"model directory {path}",
    )
