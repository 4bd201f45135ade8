"""``python -m mlx_flash.settings DIR [--memory-budget 2GB] [--window 4] ...``: show or edit the
options stored in a flash model directory. ``mlx_flash.load`` and every command take them as
defaults, and stock mlx-lm tools (which cannot pass them) use them as they are."""

from __future__ import annotations

import argparse
import json
import sys

from .cli import add_debug_arg, add_flash_args, load_options, run_cli
from .runtime.manifest import read_manifest
from .runtime.options import FlashOptions, read_settings, write_settings

TOOL = "settings"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_flash.settings", description=__doc__)
    p.add_argument("directory", help="flash model directory")
    p.add_argument("--reset", action="store_true", help="forget every stored option first")
    add_flash_args(p, TOOL)
    add_debug_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    read_manifest(args.directory)  # a clear error if this is not a flash model directory
    stored = {} if args.reset else read_settings(args.directory)
    changes = load_options(args, TOOL)
    if changes or args.reset:
        stored.update(changes)
        write_settings(args.directory, stored)
    effective = FlashOptions.build(stored)
    print(json.dumps({k: getattr(effective, k) for k in vars(effective)}, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
