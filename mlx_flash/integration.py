"""Stock mlx-lm tools load flash model directories through config.json's ``model_file``.

The converter writes ``flash_model.py`` (a few lines that call ``model_file_classes``) and
``flash_settings.json`` (the options mlx-lm cannot pass: memory budget, window, selector...).
``mlx_lm.generate --model DIR --trust-remote-code`` and ``mlx_lm.server --trust-remote-code`` then
build the model through this module. Edit the settings with ``python -m mlx_flash.settings DIR``.
"""

from __future__ import annotations

from pathlib import Path

from .runtime.files import write_text
from .runtime.loader import flash_model_classes
from .runtime.manifest import read_manifest
from .runtime.options import FlashOptions, read_settings, write_settings

MODEL_FILE = "flash_model.py"

MODEL_FILE_SOURCE = (
    '"""mlx-lm entry point of this flash model directory (config.json names it as model_file)."""'
    """
from pathlib import Path

from mlx_flash.integration import model_file_classes

Model, ModelArgs = model_file_classes(Path(__file__).parent)
"""
)


def write_entry_point(directory: Path, config: dict, settings: dict | None = None) -> dict:
    """Write the model_file entry point and the stored settings; returns the config to save."""
    write_text(directory / MODEL_FILE, MODEL_FILE_SOURCE)
    write_settings(directory, settings or {})
    return {**config, "model_file": MODEL_FILE}


def model_file_classes(directory: Path):
    """(Model, ModelArgs) for mlx-lm's model_file hook: Model(args) is the flash model, trunk
    unloaded. mlx-lm does not cast the trunk, so it computes in the dtype it was stored in."""
    stored = {**read_settings(directory), "compute_dtype": read_manifest(directory).dtype}
    get_model_classes = flash_model_classes(directory, FlashOptions.build(stored))

    class ModelArgs(dict):
        @classmethod
        def from_dict(cls, config: dict) -> ModelArgs:
            return cls(config)

    def Model(args: ModelArgs):  # noqa: N802 - mlx-lm calls it like a class
        build, args_class = get_model_classes(dict(args))
        return build(args_class.from_dict(dict(args)))

    return Model, ModelArgs
