"""Keeping benchmark reads honest: where a file lives, dropping it from the page cache, and
checking.

Why: a read served from the page cache (or from RAM-backed tmpfs) measures memory, not flash. The
probe and the bench drop their files from the cache before measuring, refuse tmpfs, and report how
much of a file is cached afterwards, so a reader can see that the bypass held.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

RAM_FILE_SYSTEMS = ("tmpfs", "ramfs", "devtmpfs", "overlay-tmpfs")


def file_system_type(path: str | Path) -> str:
    """Type of the file system holding ``path`` (longest mount point prefix in
    /proc/self/mounts)."""
    best, kind = "", "unknown"
    target = str(Path(path).resolve())
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, mount, fstype, *_ = line.split()
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


def on_ram_disk(path: str | Path) -> bool:
    """True when ``path`` lives in RAM (tmpfs): reads from there say nothing about flash."""
    return file_system_type(path) in RAM_FILE_SYSTEMS


def drop_from_page_cache(path: str | Path) -> None:
    """Evict ``path``'s clean pages (dirty pages stay: fsync the file after writing it)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: str | Path) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``), None where that cannot be
    told."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
    )
    try:
        return int(out.stdout.split()[0]) if out.returncode == 0 else None
    except (IndexError, ValueError):
        return None
