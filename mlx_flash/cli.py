"""Pieces shared by the command-line tools: flash flags, model resolution, error reporting."""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from pathlib import Path
from typing import Callable

from .default_model import cache_root, default_dtype, default_model_path
from .errors import FlashError
from .manifest import MANIFEST_FILE

DEFAULT_MODEL_FFN_SHARE = 0.5  # the demo keeps half of each FFN in DRAM, so it really streams


def add_flash_args(parser: argparse.ArgumentParser) -> None:
    """The flags every tool that loads a flash model takes (names as in the README)."""
    g = parser.add_argument_group("flash")
    g.add_argument(
        "--memory-budget",
        help='bytes MLX may hold for the model, e.g. "2GB" or "40%%" of RAM '
        "(default: 50%% of RAM; for the built-in default model: half of each FFN in DRAM)",
    )
    g.add_argument(
        "--ffn-cache",
        type=float,
        metavar="SHARE",
        help="instead of a budget: share (0-1] of each layer's FFN rows kept in DRAM",
    )
    g.add_argument(
        "--window", type=int, default=4, help="tokens of history whose neurons stay buffered (k)"
    )
    g.add_argument(
        "--selector", default=None, help="neuron selector: dense, gate, predictor or auto"
    )
    g.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="target fraction of FFN neurons skipped per token",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="parallel flash reads (default: the best count measured by mlx_flash.probe, else 32)",
    )
    g.add_argument(
        "--no-page-cache", action="store_true", help="bypass the OS page cache for flash reads"
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def resolve_model(model: str | None, log: Callable[[str], None] = print) -> Path:
    """A flash model directory for --model: as given, or converted once into the cache."""
    if model is None:
        return default_model_path(log=log)
    path = Path(model)
    if (path / MANIFEST_FILE).is_file():
        return path
    if not path.exists() and (model.count("/") != 1 or model.startswith((".", "/", "~"))):
        raise FlashError(
            f"{model}: no such file or directory (and not a hub repo id like org/name)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        from .manifest import read_manifest

        read_manifest(path)  # raises the clear "not a flash model directory" error
    name = re.sub(
        r"[^A-Za-z0-9._-]+", "_", path.stem if path.suffix == ".gguf" else str(model).strip("/")
    )
    out = cache_root() / "converted" / f"{name}-{default_dtype()}"
    if (out / MANIFEST_FILE).is_file():
        return out
    from .convert.converter import convert

    log(f"{model} is not a flash model directory: converting it into {out} (once)")
    return convert(
        model, out, dtype=None if path.suffix != ".gguf" else default_dtype(), force=True, log=log
    )


def load_options(args: argparse.Namespace, is_default_model: bool) -> dict:
    """Keyword arguments for mlx_flash.load from the flash flags."""
    options = dict(window=args.window, page_cache=not args.no_page_cache)
    if args.threads is not None:
        options["threads"] = args.threads
    if args.selector is not None:
        options["selector"] = args.selector
    if args.sparsity is not None:
        options["sparsity"] = args.sparsity
    if args.ffn_cache is not None:
        options["ffn_share"] = args.ffn_cache
    elif args.memory_budget is None and is_default_model:
        options["ffn_share"] = DEFAULT_MODEL_FFN_SHARE
    return options


def run_cli(
    main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv=None
) -> int:
    """Parse, run, and turn our errors into one line on stderr and exit status 1 (traceback with --debug)."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (FlashError, ValueError, FileNotFoundError, OSError) as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
