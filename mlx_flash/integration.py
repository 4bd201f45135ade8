"""Stock mlx-lm tools load flash model directories through config.json's ``model_file``.

The converter writes ``flash_model.py`` (three lines that call ``model_file_classes``) and
``flash_settings.json`` (the run-time settings mlx-lm cannot pass: memory budget, window, selector...).
``mlx_lm.generate --model DIR --trust-remote-code`` and ``mlx_lm.server --trust-remote-code`` then build
the model through this module. Edit the settings with ``python -m mlx_flash.settings DIR``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx_lm.utils import _get_classes

from .errors import FlashFormatError
from .loader import FlashOptions, install, prepare_runtime
from .manifest import read_manifest

MODEL_FILE = "flash_model.py"
SETTINGS_FILE = "flash_settings.json"
SETTING_KEYS = (
    "memory_budget",
    "window",
    "selector",
    "threads",
    "page_cache",
    "max_context",
    "pin_share",
)

MODEL_FILE_SOURCE = '''"""mlx-lm entry point of this flash model directory (config.json names it as model_file)."""
from pathlib import Path

from mlx_flash.integration import model_file_classes

Model, ModelArgs = model_file_classes(Path(__file__).parent)
'''


def default_settings() -> dict:
    defaults = FlashOptions()
    return {k: getattr(defaults, k) for k in SETTING_KEYS}


def read_settings(directory: str | Path) -> dict:
    """The directory's stored settings over the defaults."""
    path = Path(directory) / SETTINGS_FILE
    settings = default_settings()
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FlashFormatError(f"{path}: not valid JSON ({e})") from None
        unknown = set(stored) - set(SETTING_KEYS)
        if not isinstance(stored, dict) or unknown:
            raise FlashFormatError(
                f"{path}: unknown settings {sorted(unknown)} (known: {', '.join(SETTING_KEYS)})"
            )
        settings.update(stored)
    return settings


def write_settings(directory: str | Path, settings: dict) -> None:
    """Write settings atomically."""
    path = Path(directory) / SETTINGS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({k: settings[k] for k in SETTING_KEYS}, indent=1) + "\n")
    os.replace(tmp, path)


def write_entry_point(directory: Path, config: dict) -> dict:
    """Add the model_file entry point and default settings; returns the config to save."""
    (directory / MODEL_FILE).write_text(MODEL_FILE_SOURCE)
    write_settings(directory, default_settings())
    return {**config, "model_file": MODEL_FILE}


def model_file_classes(directory: Path):
    """(Model, ModelArgs) for mlx-lm's model_file hook: Model(args) is the flash model, trunk unloaded."""

    class ModelArgs(dict):
        @classmethod
        def from_dict(cls, config: dict) -> "ModelArgs":
            return cls(config)

    def Model(config: ModelArgs):  # noqa: N802 - mlx-lm calls it like a class
        # mlx-lm does not cast the trunk: compute in the dtype it was stored in
        options = FlashOptions(
            **read_settings(directory), compute_dtype=read_manifest(directory).dtype
        )
        runtime = prepare_runtime(directory, dict(config), options)
        model_class, args_class = _get_classes(dict(config))
        return install(model_class(args_class.from_dict(dict(config))), runtime)

    return Model, ModelArgs
