"""Where a flash model's time per token goes, from a py-spy profile of the generating thread.

Why: tokens/s against naive depends on more than bytes read: on a small CPU, MLX compute, Python
work per layer and waiting for reads all count. py-spy samples the main thread's stack; each sample
is put in one bucket (MLX work is told by native MLX frames with ``--native``, else by the Python
line that waits for MLX to evaluate; ``--native`` slows the process several times, so prefer plain
sampling for times):

- FFN I/O: inside ``StoreReader.read_neurons`` (planning reads, preadv, waiting for
  the read threads);
- FFN compute (MLX): MLX work under ``FlashFFN`` methods (FFN rows, selector), except
  evaluating its input;
- FFN Python/numpy: the rest of the time in ``FlashFFN`` (selector, window, buffer
  bookkeeping, interpreter);
- trunk compute (MLX): MLX work elsewhere, and the layer-input evaluation at the top of FlashFFN
  (MLX is lazy: that is where the layer's attention runs, and where each layer waits for MLX's
  worker thread);
- other Python: mlx-lm's model code, sampling, detokenizing, interpreter.

    py-spy record --idle -r 100 --format raw -o spy.txt -- \\
        python -m mlx_flash.bench --model DIR --ffn-cache 50% --configs 5 --no-reference \\
            --tokens 128
    python tools/profile_breakdown.py spy.txt --tokens 130 --rate 100
"""

from __future__ import annotations

import argparse
import linecache
import re
from collections import Counter
from pathlib import Path

BUCKETS = (
    "FFN I/O",
    "FFN compute (MLX)",
    "FFN Python/numpy",
    "trunk compute (MLX)",
    "other Python",
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")
# without native frames, MLX's work shows as the Python line that waits for it
EVALUATING = ("mx.eval(", "mx.async_eval(", "np.array(", ".item()", ".tolist()")


def _source(frame: str, roots: list[Path]) -> str:
    """The source line a Python frame ("func (file:line)") is on, or "" for native frames."""
    m = _FRAME.match(frame)
    if not m:
        return ""
    for root in roots:
        line = linecache.getline(str(root / m["file"]), int(m["line"]))
        if line:
            return line
    return ""


def _in_mlx(frames: list[str], roots: list[Path]) -> bool:
    """The sample is MLX work: native MLX frames (py-spy --native), else a leaf line that makes
    MLX evaluate."""
    if any("mlx::" in f or "libmlx" in f for f in frames):
        return True
    return any(call in _source(frames[-1], roots) for call in EVALUATING)


def bucket(frames: list[str], roots: list[Path]) -> str:
    """The bucket of one sample of the generating thread (see the module docstring)."""
    if any("read_neurons" in f for f in frames):
        return "FFN I/O"
    ffn = [i for i, f in enumerate(frames) if f.startswith("FlashFFN.")]
    if not ffn:
        return "trunk compute (MLX)" if _in_mlx(frames, roots) else "other Python"
    if "mx.eval(xf)" in _source(frames[ffn[-1]], roots):
        # MLX is lazy: the layer's attention runs where FlashFFN evaluates its input
        return "trunk compute (MLX)"
    return "FFN compute (MLX)" if _in_mlx(frames[ffn[-1] :], roots) else "FFN Python/numpy"


def breakdown(raw: Path, roots: list[Path], marker: str = "generate_step") -> Counter:
    """Samples per bucket over the stacks that pass through ``marker`` (the token loop)."""
    counts: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if any(marker in f for f in frames):
            counts[bucket(frames, roots)] += int(n)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path, help="py-spy record --format raw output")
    p.add_argument("--tokens", type=int, help="tokens generated: also print ms per token")
    p.add_argument(
        "--rate", type=float, default=100, help="py-spy sampling rate (-r), for ms per token"
    )
    args = p.parse_args(argv)
    import mlx_lm

    roots = [Path(__file__).resolve().parents[1], Path(mlx_lm.__file__).parents[1]]
    counts = breakdown(args.raw, roots)
    total = sum(counts.values())
    print(
        f"{'bucket':<22}{'samples':>9}{'share':>8}" + (f"{'ms/token':>10}" if args.tokens else "")
    )
    for name in BUCKETS:
        n = counts.get(name, 0)
        ms = f"{1e3 * n / args.rate / args.tokens:10.2f}" if args.tokens else ""
        print(f"{name:<22}{n:9d}{100 * n / max(1, total):7.1f}%" + ms)


if __name__ == "__main__":
    main()
