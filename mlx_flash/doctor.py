"""``python -m mlx_flash.doctor``: check the platform paths mlx_flash depends on, and print a report
to paste into an issue.

Why: the paths that keep streaming honest and fast differ by platform and fail quietly (a page-cache
bypass the OS ignores fills memory; a missing Metal device computes on the CPU). On macOS: the
Metal device, ``F_NOCACHE`` honoured (a store read uncached does not land in the page cache), the
wired limit mlx-lm's generation sets and restores; on Linux: ``RWF_DONTCACHE`` and ``O_DIRECT``.
Everywhere: a tiny random model's flash logits against plain mlx-lm, and a short disk probe. A
check that cannot run here is reported as not run, with the reason.

    python -m mlx_flash.doctor --path ~/models --json doctor.json
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cli import add_debug_arg, run_cli
from .probe import make_probe_file, measure_cell, run_probe
from .runtime.costmodel import device_key
from .runtime.errors import StoreReadError
from .runtime.files import cache_root, write_json
from .runtime.pagecache import cached_bytes, file_system_type, on_ram_disk
from .runtime.sizes import format_size
from .runtime.uncached import UncachedFile

PASS, FAIL, NOT_RUN = "pass", "FAIL", "not run"
CHECK_FILE = 16 << 20  # the bypass checks' file
LANDED_SHARE = 0.05  # more than this share of an uncached read in the page cache: not honoured
PROMPT = [3, 17, 42, 99, 7, 120, 5, 64]


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


def bypass_modes() -> list[tuple[str, str]]:
    """(name, ``UncachedFile`` mode) of this platform's page-cache bypasses."""
    if sys.platform == "darwin":
        return [("F_NOCACHE", "nocache")]
    if sys.platform.startswith("linux"):
        return [("RWF_DONTCACHE", "dontcache"), ("O_DIRECT", "direct")]
    return []


def check_metal() -> Check:
    """A Metal device MLX computes on (macOS only)."""
    if sys.platform != "darwin":
        return Check("Metal device", NOT_RUN, f"not macOS ({sys.platform})")
    if not mx.metal.is_available():
        return Check("Metal device", FAIL, "MLX sees no Metal device: it computes on the CPU")
    info = mx.device_info()
    name = info.get("device_name") or info.get("architecture", "?")
    memory = info.get("memory_size")
    return Check(
        "Metal device",
        PASS,
        f"{name}" + (f", {format_size(memory)} unified memory" if memory else ""),
    )


def check_bypass(directory: Path, name: str, mode: str, size: int = CHECK_FILE) -> Check:
    """Read a fresh file uncached (``mode``), then cached: the first must leave the page cache
    (almost) empty, the second shows that the measurement can see cached pages at all."""
    if on_ram_disk(directory):
        return Check(name, NOT_RUN, f"{directory} is on {file_system_type(directory)} (RAM)")
    path = make_probe_file(directory, size)
    try:
        before = cached_bytes(path)
        if before is None:
            return Check(name, NOT_RUN, "this OS does not tell which pages are cached")
        if before > LANDED_SHARE * size:
            return Check(name, NOT_RUN, f"the new file stayed cached after writing ({before} B)")
        try:
            uncached = _read_all(path, size, mode)
        except StoreReadError as e:
            return Check(name, NOT_RUN if mode == "dontcache" else FAIL, str(e))
        control = _read_all(path, size, None)
    finally:
        shutil.rmtree(path.parent)
    landed = (
        f"{format_size(uncached - before)} of {format_size(size)} read landed in the page cache"
    )
    if control - before < size // 2:
        return Check(name, NOT_RUN, f"a cached read keeps no pages here either ({landed})")
    if uncached - before > LANDED_SHARE * size:
        return Check(name, FAIL, f"not honoured: {landed}")
    return Check(name, PASS, f"{landed} (a cached read: {format_size(control - before)})")


def _read_all(path: Path, size: int, mode: str | None) -> int:
    """Read all of ``path`` once (``mode`` None: through the page cache); its cached bytes after."""
    src = UncachedFile(path, page_cache=mode is None, bypass=mode or "auto")
    try:
        measure_cell(src, size, 1 << 20, 1, 3600.0, np.random.default_rng(0))
    finally:
        src.close()
    return cached_bytes(path) or 0


def check_wired_limit() -> Check:
    """mlx-lm's generation wires the recommended working set, and gives the old limit back."""
    if sys.platform != "darwin" or not mx.metal.is_available():
        return Check("wired limit", NOT_RUN, "no Metal device")
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    recommended = mx.device_info().get("max_recommended_working_set_size")
    old = maybe_set_recommended_wired_limit()
    if old is None:
        return Check("wired limit", FAIL, "Metal reports no recommended working set size")
    now = mx.set_wired_limit(old)
    if now != recommended:
        return Check("wired limit", FAIL, f"set {recommended}, but the limit read back {now}")
    return Check(
        "wired limit", PASS, f"set to {format_size(recommended)}, restored to {format_size(old)}"
    )


def check_dense_equivalence(tmp: Path) -> Check:
    """A tiny random llama, converted and streamed with a third of its FFN in the buffer, computes
    plain mlx-lm's logits (prompt and greedy decode steps)."""
    import mlx_lm

    from . import load
    from .convert.converter import convert
    from .tiny import save_tiny_llama

    src = save_tiny_llama(tmp / "tiny")
    flash = convert(src, tmp / "tiny-flash", calibration=None, progress=False, log=lambda _: None)
    reference, _ = mlx_lm.load(str(src))
    model, _ = load(flash, "1GB", ffn_cache=1 / 3, pin_share=0.0)
    try:
        diff = float(np.abs(_logits(model) - _logits(reference)).max())
        read = model.flash.reader.totals.bytes
    finally:
        model.flash.close()
    detail = f"largest logit difference {diff:.1e} over 4 positions; {format_size(read)} streamed"
    return Check("dense equivalence", PASS if diff <= 1e-4 and read > 0 else FAIL, detail)


def _logits(model, steps: int = 3) -> np.ndarray:
    """The prompt's last logits, then ``steps`` greedy decode steps through a KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array([PROMPT]), cache=cache)[0, -1]]
    for _ in range(steps):
        token = mx.argmax(out[-1]).reshape(1, 1)
        out.append(model(token, cache=cache)[0, -1])
    return np.stack([np.array(o) for o in out])


def check_probe(directory: Path) -> Check:
    """A short probe of the disk (not saved: the runtime uses a full ``mlx_flash.probe``)."""
    if on_ram_disk(directory):
        return Check("short probe", NOT_RUN, f"{directory} is on RAM")
    probe = run_probe(
        directory, 64 << 20, (4096, 65536), (1, 4), seconds=0.25, batch=0, progress=False
    )
    rates = ", ".join(
        f"{c['chunk'] // 1024} KiB x {c['threads']}: {c['bytes_per_s'] / 1e6:.0f} MB/s"
        for c in probe["cells"]
    )
    return Check("short probe", PASS, f"{probe['bypass']}; {rates}")


def run_checks(directory: Path, skip: set[str] = frozenset()) -> list[Check]:
    """Every check, in order; a check that raises is reported as failed with its error."""
    with tempfile.TemporaryDirectory(prefix="mlx_flash-doctor-", dir=directory) as tmp:
        steps: list[tuple[str, Callable[[], Check]]] = [("metal", check_metal)]
        steps += [
            ("bypass", lambda n=name, m=mode: check_bypass(directory, n, m))
            for name, mode in bypass_modes()
        ]
        steps += [
            ("wired", check_wired_limit),
            ("equivalence", lambda: check_dense_equivalence(Path(tmp))),
            ("probe", lambda: check_probe(directory)),
        ]
        checks = []
        for key, step in steps:
            if key in skip:
                checks.append(Check(key, NOT_RUN, "skipped (--skip)"))
                continue
            try:
                checks.append(step())
            except Exception as e:  # a broken path is what the doctor is for: report, go on
                checks.append(Check(key, FAIL, f"{type(e).__name__}: {e}"))
        if not bypass_modes():
            checks.insert(1, Check("page-cache bypass", NOT_RUN, f"no bypass on {sys.platform}"))
        return checks


def environment(directory: Path) -> dict:
    """What the report is about: versions, platform, the checked directory."""
    import mlx_lm

    from . import __version__

    return {
        "mlx_flash": __version__,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "directory": str(directory.resolve()),
        "file_system": file_system_type(directory),
        "device": device_key(directory),
    }


def format_report(env: dict, checks: list[Check]) -> str:
    """A markdown report to paste into an issue."""
    lines = [
        "### mlx_flash doctor",
        f"mlx_flash {env['mlx_flash']}, mlx {env['mlx']}, mlx-lm {env['mlx_lm']}, "
        f"Python {env['python']}; {env['platform']} ({env['machine']})",
        f"checked on {env['directory']} ({env['file_system']}, {env['device']})",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {c.status} | {c.detail} |" for c in checks]
    failed = sum(c.status == FAIL for c in checks)
    not_run = sum(c.status == NOT_RUN for c in checks)
    lines += ["", f"{len(checks) - failed - not_run} passed, {failed} failed, {not_run} not run"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.doctor",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--path",
        type=Path,
        default=None,
        help="directory on the disk you stream models from (default: the mlx_flash cache)",
    )
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["metal", "bypass", "wired", "equivalence", "probe"],
        help="checks not to run",
    )
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    add_debug_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    directory = args.path or cache_root()
    directory.mkdir(parents=True, exist_ok=True)
    env = environment(directory)
    checks = run_checks(directory, set(args.skip))
    print(format_report(env, checks))
    if args.json:
        write_json(args.json, {"environment": env, "checks": [asdict(c) for c in checks]})
        print(f"wrote {args.json}")
    return 1 if any(c.status == FAIL for c in checks) else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
