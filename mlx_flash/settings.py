"""``python -m mlx_flash.settings DIR [--memory-budget 2GB] [--window 4] ...``: show or edit the run-time
settings stored in a flash model directory (what stock mlx-lm tools use when they load it)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import FlashError
from .integration import read_settings, write_settings
from .manifest import read_manifest
from .sizes import parse_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_flash.settings", description=__doc__)
    p.add_argument("directory", help="flash model directory")
    p.add_argument("--memory-budget", help='e.g. "2GB" or "40%%" of RAM')
    p.add_argument("--window", type=int, help="tokens of history kept in the neuron buffer (k)")
    p.add_argument("--selector", help="neuron selector (dense, gate, predictor, auto)")
    p.add_argument("--threads", type=int, help="read threads")
    p.add_argument(
        "--page-cache", choices=["on", "off"], help="read through the OS page cache or bypass it"
    )
    p.add_argument("--max-context", type=int, help="tokens of KV cache the budget reserves")
    p.add_argument("--pin-share", type=float, help="share of buffer rows pinned for the whole run")
    args = p.parse_args(argv)
    try:
        read_manifest(args.directory)
        settings = read_settings(args.directory)
        changes = {k: v for k, v in vars(args).items() if k != "directory" and v is not None}
        if "memory_budget" in changes:
            parse_size(changes["memory_budget"])
        if "page_cache" in changes:
            changes["page_cache"] = changes["page_cache"] == "on"
        if changes:
            settings.update(changes)
            write_settings(args.directory, settings)
        print(json.dumps(settings, indent=1))
        return 0
    except (FlashError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
