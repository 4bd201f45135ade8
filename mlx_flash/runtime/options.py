"""Run-time options of a flash model: the one definition of every setting.

``FlashOptions``' fields are ``mlx_flash.load``'s keywords, the keys ``flash_settings.json``
accepts, and (through ``mlx_flash.cli``) the flash flags of every command. A field's metadata holds
its help text, its flag, how a value is checked, old names kept as deprecated aliases, and the
default of a command that needs another one than the package's.

Where a value comes from, last wins: the field's default, the model directory's
``flash_settings.json``, the command's default, then what the caller passes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import FlashFormatError, OptionError
from .files import read_json, write_json
from .sizes import parse_share, parse_size

SELECTORS = ("auto", "dense", "proxy", "gate", "oracle", "predictor")
COMPUTE_ROWS = ("resident", "selected")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize packs
KV_GROUP_SIZES = (32, 64, 128)
EXPERT_POLICIES = ("lru", "lfu")  # mlx_flash.runtime.expert_policy
READ_PATHS = ("preadv", "mmap")  # mlx_flash.runtime.store


def _between(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    def check(value: Any) -> float:
        value = float(value)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise ValueError(f"must be in {lo}{low:g}, {high:g}{hi}, got {value:g}")
        return value

    return check


def _whole(low: int, high: int | None = None):
    def check(value: Any) -> int:
        if isinstance(value, bool) or int(value) != float(value):
            raise ValueError(f"must be a whole number, got {value!r}")
        if int(value) < low or (high is not None and int(value) > high):
            bound = f"at least {low}" if high is None else f"in {low}..{high}"
            raise ValueError(f"must be {bound}, got {value}")
        return int(value)

    return check


def _one_of(names: tuple[str, ...]):
    def check(value: Any) -> str:
        if value not in names:
            raise ValueError(f"must be one of {', '.join(map(str, names))}; got {value!r}")
        return value

    return check


def _selector(value: Any) -> Any:
    if isinstance(value, str):
        return _one_of(SELECTORS)(value)
    if not callable(value):  # a Selector object (mlx_flash.runtime.selectors)
        raise ValueError(f"must be one of {', '.join(SELECTORS)} or a Selector; got {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _size(value: Any) -> str | int:
    parse_size(value)
    return value


def option(
    default: Any,
    help: str,
    check: Callable[[Any], Any],
    *,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
    tool_defaults: dict[str, Any] | None = None,
    cli: bool = True,
) -> Any:
    """A FlashOptions field: ``check`` turns a value (or its command-line text) into the value used,
    raising ValueError with the reason; ``aliases`` are deprecated old names."""
    meta = dict(help=help, check=check, metavar=metavar, aliases=aliases, cli=cli)
    meta["tool_defaults"] = tool_defaults or {}
    return field(default=default, metadata=meta)


@dataclass
class FlashOptions:
    """How a flash model runs (see the module docstring; the README has the measured effects)."""

    memory_budget: str | int | None = option(
        None,
        'bytes MLX may hold for the model, e.g. "2GB" or "40%" of RAM (default: 50% of RAM)',
        lambda v: None if v is None else _size(v),
        metavar="SIZE",
    )
    ffn_cache: float | None = option(
        None,
        "share of each layer's FFN rows kept in DRAM, 0.5 or 50% (default: what the budget holds)",
        lambda v: None if v is None else parse_share(v),
        metavar="SHARE",
        aliases=("ffn_share",),
        tool_defaults={"evaluate": 0.95},
    )
    window: int = option(
        4,
        "tokens of history whose neurons stay buffered "
        "(k; 0 keeps only pinned rows between tokens)",
        _whole(0),
        metavar="K",
    )
    selector: Any = option(
        "auto", f"which neurons a token uses: {', '.join(SELECTORS)}", _selector, metavar="NAME"
    )
    sparsity: float | None = option(
        None,
        "share of FFN neurons skipped per token, the mean over layers (default: the measured "
        "operating point's)",
        lambda v: None if v is None else _between(0, 1, high_open=True)(v),
        metavar="S",
    )
    max_quality_loss: float = option(
        0.02,
        "the perplexity increase auto may accept, as measured on held-back calibration text "
        "(0.02: +2%)",
        _between(0, 10),
        metavar="LOSS",
    )
    compute_rows: str | None = option(
        None,
        "resident: multiply every buffered row; selected: only this token's selection (default: "
        "the measured operating point's, else resident)",
        lambda v: None if v is None else _one_of(COMPUTE_ROWS)(v),
    )
    pin_share: float | None = option(
        None,
        "share of the buffer rows pinned for the whole run (the most often active neurons; "
        "default: the plan's, which leaves the window two tokens' selections, or streaming every "
        "neuron reads each token's rest once)",
        lambda v: None if v is None else _between(0, 1)(v),
        metavar="SHARE",
        tool_defaults={"evaluate": 0.0},
    )
    threads: int | None = option(
        None,
        "parallel flash reads (default: the disk probe's best, else 32)",
        lambda v: None if v is None else _whole(1, 64)(v),
        metavar="N",
    )
    page_cache: bool = option(
        True, "read the store through the OS page cache (--no-page-cache bypasses it)", _flag
    )
    read_path: str = option(
        "preadv",
        "how records are read: preadv (into the buffer rows) or mmap (copied from the store's "
        "mapping; needs the page cache)",
        _one_of(READ_PATHS),
        metavar="NAME",
    )
    lookahead: bool = option(
        True,
        "while a layer computes, have the kernel read what the next layer's selector expects it "
        "to need (store read uncached on Linux; --no-lookahead turns it off)",
        _flag,
    )
    max_context: int = option(
        2048,
        "tokens of context the KV cache is planned for",
        _whole(1),
        metavar="TOKENS",
        tool_defaults={"chat": 4096},
    )
    max_kv_size: int | None = option(
        None,
        "keep only the last N tokens in a rotating KV cache (mlx-lm's meaning; the plan counts it)",
        lambda v: None if v is None else _whole(1)(v),
        metavar="N",
    )
    kv_bits: int | None = option(
        None,
        "quantize the KV cache to this many bits (mlx-lm's meaning; the plan counts it)",
        lambda v: None if v is None else _one_of(KV_BITS)(_whole(1)(v)),
        metavar="BITS",
    )
    kv_group_size: int = option(
        64, "group size of the KV cache's quantization", _one_of(KV_GROUP_SIZES), metavar="N"
    )
    quantized_kv_start: int = option(
        5000,
        "with --kv-bits, quantize the KV cache once it holds this many tokens",
        _whole(0),
        metavar="TOKENS",
    )
    prefill_step_size: int = option(
        512,
        "prompt tokens per prefill step (the memory plan assumes this many)",
        _whole(1),
        metavar="TOKENS",
    )
    num_draft_tokens: int = option(
        0,
        "draft tokens speculative decoding verifies per step (the plan counts their logits); "
        "generate sets it from mlx-lm's --num-draft-tokens when given --draft-model",
        _whole(0, 64),
        cli=False,
    )
    compute_dtype: str | None = option(
        None,
        "dtype to compute in (default: float32 on the CPU, the model's own on a GPU)",
        lambda v: None if v is None else _one_of(COMPUTE_DTYPES)(v),
        metavar="DTYPE",
    )
    expert_policy: str = option(
        "lru",
        "MoE models: which resident expert to evict, lru or lfu (LFU with ageing); "
        "the default is provisional",
        _one_of(EXPERT_POLICIES),
        metavar="NAME",
    )
    record_trace: str | None = option(
        None,
        "write the ids each decode token used, per layer, to FILE (.npz) on close: the selected "
        "FFN neurons (dense models) or the experts (MoE); the bench replays it with --trace",
        lambda v: None if v is None else str(v),
        metavar="FILE",
        aliases=("routing_trace",),
    )
    telemetry: bool = option(True, "count reads and rows per token", _flag, cli=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check_option(f.name, getattr(self, f.name)))
        if self.read_path == "mmap" and not self.page_cache:
            raise OptionError(
                "read_path mmap reads through the page cache: it cannot be combined with "
                "page_cache false (--no-page-cache)"
            )

    @classmethod
    def build(
        cls, values: dict[str, Any], tool: str | None = None, where: str = ""
    ) -> FlashOptions:
        """Options from ``values`` over ``tool``'s defaults; deprecated names are mapped (with a
        warning), unknown ones refused naming ``where`` they came from."""
        known = {f.name: f for f in fields(cls)}
        chosen = {
            n: f.metadata["tool_defaults"][tool]
            for n, f in known.items()
            if tool in f.metadata["tool_defaults"]
        }
        for name, value in values.items():
            chosen[canonical_name(name, where)] = value
        return cls(**chosen)

    def changed(self) -> dict[str, Any]:
        """The fields whose value differs from the package default (what a settings file stores)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != f.default
        }


def option_fields() -> list:
    """FlashOptions' fields, in declaration order."""
    return list(fields(FlashOptions))


def tool_defaults(tool: str) -> dict[str, Any]:
    """The options whose default differs for command ``tool``, with that default."""
    return {
        f.name: f.metadata["tool_defaults"][tool]
        for f in fields(FlashOptions)
        if tool in f.metadata["tool_defaults"]
    }


def tool_default(name: str, tool: str | None) -> Any:
    """The default of option ``name`` for command ``tool``."""
    f = next(f for f in fields(FlashOptions) if f.name == name)
    return f.metadata["tool_defaults"].get(tool, f.default)


def canonical_name(name: str, where: str = "") -> str:
    """The option a (possibly deprecated) name stands for; unknown names raise OptionError."""
    for f in fields(FlashOptions):
        if name == f.name:
            return name
        if name in f.metadata["aliases"]:
            warnings.warn(
                f"{where}{name!r} is deprecated; use {f.name!r}", DeprecationWarning, stacklevel=4
            )
            return f.name
    known = ", ".join(f.name for f in fields(FlashOptions))
    raise OptionError(f"{where}unknown option {name!r} (known: {known})")


def check_option(name: str, value: Any) -> Any:
    """The value option ``name`` uses for ``value``; OptionError names the option and the reason."""
    f = next(f for f in fields(FlashOptions) if f.name == name)
    try:
        return f.metadata["check"](value)
    except (TypeError, ValueError) as e:
        raise OptionError(f"{name} {e}") from e


SETTINGS_FILE = "flash_settings.json"


def read_settings(directory: str | Path) -> dict[str, Any]:
    """The options stored in a flash model directory (only those that differ from the defaults)."""
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        return {}
    stored = read_json(path)
    if not isinstance(stored, dict):
        raise FlashFormatError(f"{path}: not a JSON object")
    try:
        options = FlashOptions.build(stored, where=f"{path}: ")
    except OptionError as e:
        raise FlashFormatError(str(e)) from e
    return options.changed()


def write_settings(directory: str | Path, values: dict[str, Any]) -> None:
    """Store options in a flash model directory (atomically; defaults are left out)."""
    write_json(Path(directory) / SETTINGS_FILE, FlashOptions.build(values).changed())
