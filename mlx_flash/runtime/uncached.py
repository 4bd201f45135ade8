"""Open a store file for exact reads, with the OS page cache bypassed unless asked for.

Why: a model bigger than memory must not fill the page cache with the records it streams (the
page cache counts against the machine's memory and pushes it into swap), and a benchmark read
served from the page cache measures memory, not flash. How, by platform: ``F_NOCACHE`` on
macOS; on Linux uncached buffered reads (``RWF_DONTCACHE``, kernel 6.14+, no alignment rules)
for small reads and ``O_DIRECT`` (offsets, sizes and buffers aligned to ``DIRECT_ALIGN``) for reads
of ``DIRECT_MIN_BYTES`` or more, which it serves 1.3-1.9x faster here (README, Design: the disk);
without ``RWF_DONTCACHE``, ``O_DIRECT`` for all. Readahead is always off (``POSIX_FADV_RANDOM``):
every read is exact, and readahead would fill the page cache behind the bypass.
"""

from __future__ import annotations

import errno
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from .errors import StoreReadError

RWF_DONTCACHE = 0x80  # linux/fs.h; Python has no constant for it yet
DIRECT_ALIGN = 4096  # covers 512- and 4096-byte logical blocks
DIRECT_MIN_BYTES = 64 << 10  # reads this long go O_DIRECT beside RWF_DONTCACHE
BYPASS_MODES = ("auto", "nocache", "dontcache", "direct")


class UncachedFile:
    """A read-only store file. ``mode``: "cached", "nocache", "dontcache" or "direct". Reads of
    at least ``direct_min`` bytes (``direct_for``; None: never, 0 in "direct" mode: all) go aligned
    through ``direct_fd`` with no flags, the others through ``fd`` with ``flags``."""

    def __init__(self, path: str | Path, page_cache: bool = False, bypass: str = "auto") -> None:
        if bypass not in BYPASS_MODES:
            raise ValueError(f"unknown bypass mode {bypass!r} (one of {', '.join(BYPASS_MODES)})")
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.direct_fd: int | None = None
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            self.mode = "cached" if page_cache else self._bypass(bypass)
        except BaseException:
            self.close()
            raise
        self.flags = RWF_DONTCACHE if self.mode == "dontcache" else 0
        self.direct_min: int | None = 0 if self.mode == "direct" else None
        if self.mode == "dontcache" and bypass == "auto":
            self.direct_min = DIRECT_MIN_BYTES if self._open_direct() else None

    def direct_for(self, nbytes: int | np.ndarray) -> bool | np.ndarray:
        """Whether a read of ``nbytes`` goes aligned through ``direct_fd``, with no flags (for an
        array of sizes, per size)."""
        return nbytes >= (math.inf if self.direct_min is None else self.direct_min)

    def _bypass(self, bypass: str) -> str:
        """ "auto" prefers F_NOCACHE (macOS), then RWF_DONTCACHE, then O_DIRECT, else warns and
        caches."""
        if bypass == "nocache" or (bypass == "auto" and sys.platform == "darwin"):
            set_nocache(self.fd)
            return "nocache"
        if bypass in ("auto", "dontcache") and self._dontcache_supported():
            return "dontcache"
        if bypass == "dontcache":
            raise StoreReadError(
                f"{self.path}: this OS has no uncached buffered reads (RWF_DONTCACHE, Linux 6.14+)"
            )
        try:
            self._open_direct(strict=True)
        except (OSError, AttributeError) as e:
            if bypass == "direct":
                raise StoreReadError(f"{self.path}: cannot open with O_DIRECT ({e})") from e
            warnings.warn(
                f"{self.path}: no way to bypass the page cache here ({e}); reading through it",
                stacklevel=4,
            )
            return "cached"
        return "direct"

    def _open_direct(self, strict: bool = False) -> bool:
        """Open ``direct_fd`` (O_DIRECT); whether it worked (``strict``: raise if not)."""
        try:
            flags = os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0)
            self.direct_fd = os.open(self.path, flags)
        except (OSError, AttributeError):
            if strict:
                raise
            return False
        return True

    def _dontcache_supported(self) -> bool:
        """Probe one uncached read; old kernels answer EOPNOTSUPP (or EINVAL for unknown flags)."""
        try:
            os.preadv(self.fd, [bytearray(1)], 0, RWF_DONTCACHE)
        except (OSError, AttributeError) as e:
            unsupported = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
            if isinstance(e, AttributeError) or e.errno in unsupported:
                return False
            raise StoreReadError(f"{self.path}: probe read at offset 0 failed: {e}") from e
        return True

    def close(self) -> None:
        """Close the descriptors; safe to call twice."""
        for fd in (self.direct_fd, self.fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None  # type: ignore[assignment]


def set_nocache(fd: int) -> None:
    """macOS: keep this descriptor's reads and writes out of the page cache (``F_NOCACHE``)."""
    import fcntl

    fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
