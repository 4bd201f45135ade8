"""Human sizes and shares: "1.5GB", "512MiB", "40%" of RAM <-> bytes; "50%" or 0.5 -> 0.5."""

from __future__ import annotations

import os
import re

from .errors import OptionError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}


def physical_memory() -> int:
    """Bytes of physical RAM of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str | int | float, total: int | None = None) -> int:
    """Parse "1.5GB", "512MiB", "4096" or "40%" (of ``total``, default physical RAM) into bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*", str(text))
    if not m:
        raise OptionError(f"cannot read size {text!r} (examples: 1.5GB, 512MiB, 40%)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise OptionError(f"percentage {text!r} must be in (0, 100]")
        return int(value / 100 * (total if total is not None else physical_memory()))
    if unit not in _UNITS:
        raise OptionError(f"unknown size unit in {text!r} (use B, KB, MB, GB, KiB, MiB, GiB or %)")
    return int(value * _UNITS[unit])


def format_size(n: float) -> str:
    """Bytes as a short human string (MB/GB, powers of 1000 like macOS shows)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def parse_share(text: str | float) -> float:
    """A share in (0, 1] from 0.5, "0.5" or "50%"."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise OptionError(f"cannot read share {text!r} (examples: 0.5, 50%)") from None
    if not 0 < value <= 1:
        raise OptionError(f"share {text!r} must be in (0, 1] or (0%, 100%]")
    return value
