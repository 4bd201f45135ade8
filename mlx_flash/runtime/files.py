"""Files the package writes: the cache folder, writes that never leave a half-written file, and
reading its JSON back.

Why: a crash or Ctrl-C while writing a manifest, settings, a probe, calibration arrays, a download
or a whole converted directory must leave what the user already had as it was. Every write goes to a
temporary path beside its target and is renamed onto it only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import FlashError, FlashFormatError


def cache_root() -> Path:
    """``$MLX_FLASH_CACHE``, else ``$XDG_CACHE_HOME/mlx_flash``, else ``~/.cache/mlx_flash``."""
    if os.environ.get("MLX_FLASH_CACHE"):
        return Path(os.environ["MLX_FLASH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_flash"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) to write; renamed onto ``path`` if the
    block succeeds.

    The suffix is kept because some writers add their own (``mx.save_safetensors``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    """What ``path`` holds, read back; a FlashFormatError naming the file if it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FlashFormatError(f"{path}: not valid JSON ({e})") from e


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=1) + "\n")


def staging_dir(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` to build it in; stale ones of dead processes are
    removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and Path("/proc").is_dir() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """A staging directory to build ``out`` in (``staging_dir``): published onto ``out`` if the
    block succeeds (``publish``), removed if anything stops it, Ctrl-C included."""
    tmp = staging_dir(out)
    try:
        yield tmp
        publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move a finished staging directory onto ``out``; with ``force`` the old ``out`` goes only
    after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not force:
        raise FlashError(f"{out}: exists and is not empty; pass --force to replace it")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
