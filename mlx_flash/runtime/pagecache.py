"""Keeping benchmark reads honest: where a file lives, dropping it from the page cache, and
checking.

Why: a read served from the page cache (or from RAM-backed tmpfs) measures memory, not flash. The
probe and the bench drop their files from the cache before measuring, refuse tmpfs, and report how
much of a file is cached afterwards, so a reader can see that the bypass held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
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
    """Bytes of ``path`` in the page cache (util-linux ``fincore``, else ``mincore(2)``, which macOS
    has), None where that cannot be told."""
    if shutil.which("fincore") is None:
        return mincore_bytes(path)
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
    )
    try:
        return int(out.stdout.split()[0]) if out.returncode == 0 else None
    except (IndexError, ValueError):
        return None


def mincore_bytes(path: str | Path) -> int | None:
    """Bytes of ``path`` in memory, from ``mincore(2)`` over a read-only mapping of it (mapping
    faults nothing in); None where libc has no mincore."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (
            [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
        )
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            pages = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
            if libc.mincore(addr, size, pages) != 0:
                return None
            return min(size, sum(p & 1 for p in pages) * mmap.PAGESIZE)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
