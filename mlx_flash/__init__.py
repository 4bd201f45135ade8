"""mlx_flash: run LLMs larger than memory with mlx-lm by streaming active FFN neurons from flash."""

__version__ = "0.1.0"

from .errors import BudgetError, FlashError, FlashFormatError, StoreReadError, UnsupportedModelError
from . import rebuild
from .loader import load

__all__ = ["load", "FlashError", "FlashFormatError", "BudgetError", "StoreReadError", "UnsupportedModelError"]
