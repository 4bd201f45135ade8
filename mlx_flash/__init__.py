"""mlx_flash: run LLMs larger than memory with mlx-lm by streaming active FFN neurons from flash."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# Installed, the offline pipeline (the repo's top-level convert/) is the subpackage
# mlx_flash.convert (pyproject's package-dir). Run from a source checkout, the checkout's convert/
# must play that part.
if (
    not (_Path(__file__).parent / "convert").is_dir()
    and (_Path(__file__).parent.parent / "convert" / "__init__.py").is_file()
):
    __path__.append(str(_Path(__file__).parent.parent))  # noqa: F821 - a package's own __path__

from .runtime.errors import (  # noqa: E402
    BudgetError,
    FlashError,
    FlashFormatError,
    OptionError,
    StoreReadError,
    UnsupportedModelError,
)
from .runtime.loader import load  # noqa: E402
from .runtime.options import FlashOptions  # noqa: E402

__all__ = [
    "load",
    "FlashOptions",
    "FlashError",
    "FlashFormatError",
    "OptionError",
    "BudgetError",
    "StoreReadError",
    "UnsupportedModelError",
]
