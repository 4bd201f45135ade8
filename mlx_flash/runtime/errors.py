"""Exceptions the package raises on purpose: each one names the file and the problem."""

from __future__ import annotations


class FlashError(Exception):
    """Base class of every error mlx_flash reports to users."""


class OptionError(FlashError, ValueError):
    """An option or argument has a value mlx_flash cannot use (named in the message)."""


class FlashFormatError(FlashError):
    """A flash model directory (or one of its files) is missing, damaged or of an unknown format."""


class UnsupportedModelError(FlashError):
    """The source model uses an architecture or a weight format the converter cannot handle."""


class StoreReadError(FlashError):
    """Reading FFN records from the store failed (I/O error or short read)."""


class BudgetError(FlashError):
    """The memory budget cannot hold what the model needs."""
