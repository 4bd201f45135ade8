"""mlx_flash: run LLMs larger than memory with mlx-lm by streaming active FFN neurons from flash."""

__version__ = "0.1.0"
