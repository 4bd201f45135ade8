"""The storage cost model: read throughput as a function of read size and threads (the paper's
fig. 2b).

Why: flash is fast only for large reads with many in flight (README, Design: the disk), so the
runtime needs to know, for this machine's disk, how many threads to use and what a token's reads
should cost. ``mlx_flash.probe`` measures it; without a probe the model falls back to defaults
measured on Linux development machines with direct I/O (``_DEFAULT_POINTS``).

Per thread count t, a read of s bytes costs ``a_t + s / b_t`` seconds of the device's time shared by
the t threads: ``a_t`` is the per-read cost (latency divided by the parallelism the device and the
OS achieve), ``b_t`` the streaming bandwidth. Throughput is ``s / (a_t + s / b_t)``; between
measured thread counts it is interpolated geometrically, outside them clamped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .files import cache_root

PROBE_FORMAT = "mlx_flash-probe"
PROBE_VERSION = 1

# Measured with direct I/O on Linux development machines: 4 KiB reads 70 MB/s (1 thread) and
# 300 MB/s (32); 64 KiB reads 0.5 GB/s and 2 GB/s. Solved for a_t and b_t at t = 1 and 32.
_DEFAULT_POINTS = {1: ((4096, 70e6), (65536, 0.5e9)), 32: ((4096, 300e6), (65536, 2e9))}


@dataclass(frozen=True)
class Cell:
    """A probe measurement: ``threads`` threads reading ``chunk``-byte pieces at ``bytes_per_s``."""

    chunk: int
    threads: int
    bytes_per_s: float


def _fit_line(cells: Sequence[Cell]) -> tuple[float, float]:
    """(a, 1/b) of ``s / throughput = a + s / b``, least squares on relative error, both >= 0."""
    xs = [c.chunk for c in cells]
    ys = [c.chunk / c.bytes_per_s for c in cells]
    ws = [1.0 / y**2 for y in ys]  # minimise the squared relative residuals
    if len(cells) == 1:
        return 0.0, ys[0] / xs[0]
    sw = sum(ws)
    sx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    sy = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    sxx = sum(w * (x - sx) ** 2 for w, x in zip(ws, xs, strict=True))
    slope = (
        sum(w * (x - sx) * (y - sy) for w, x, y in zip(ws, xs, ys, strict=True)) / sxx
        if sxx
        else 0.0
    )
    a = sy - slope * sx
    if slope <= 0:  # bandwidth never binds in the measured range: all cost is per read
        return sy, 1e-15
    if a < 0:  # no measurable per-read cost: pure bandwidth
        return 0.0, sum(w * x * y for w, x, y in zip(ws, xs, ys, strict=True)) / sum(
            w * x * x for w, x in zip(ws, xs, strict=True)
        )
    return a, slope


@dataclass(frozen=True)
class CostModel:
    """Fitted per-read cost and bandwidth per measured thread count (see the module docstring)."""

    threads: tuple[int, ...]
    per_read_s: tuple[float, ...]
    bandwidth: tuple[float, ...]  # bytes per second
    source: str = "defaults"
    # the reader's threads as the probe timed it (CPU cost included): fastest for a layer's batch
    # of small reads, and of those within 5% of it, the fastest streaming a layer whole
    batch_threads: int | None = None
    # size the reader cuts long runs at, fastest for a layer streamed whole at those threads
    long_run_bytes: int | None = None
    # the reader's own cost per read and bandwidth at ``batch_threads``, solved from the two
    # patterns the probe timed it on: the disk's fit misjudges both (short reads advised to the
    # kernel cost less than its per-read cost, a layer's long runs more than its bandwidth)
    reader_read_s: float | None = None
    reader_bytes_per_s: float | None = None

    @classmethod
    def fit(cls, cells: Iterable[Cell], source: str, batch_threads: int | None = None) -> CostModel:
        """Fit one (a_t, b_t) per thread count from probe cells."""
        by_threads: dict[int, list[Cell]] = {}
        for c in cells:
            if c.bytes_per_s > 0:
                by_threads.setdefault(c.threads, []).append(c)
        if not by_threads:
            raise ValueError("no probe measurements to fit")
        ts = sorted(by_threads)
        fits = [_fit_line(by_threads[t]) for t in ts]
        return cls(
            tuple(ts),
            tuple(a for a, _ in fits),
            tuple(1.0 / c for _, c in fits),
            source,
            batch_threads,
        )

    @classmethod
    def defaults(cls) -> CostModel:
        cells = [Cell(s, t, bw) for t, points in _DEFAULT_POINTS.items() for s, bw in points]
        return cls.fit(cells, "defaults (Linux development machines, direct I/O)")

    def _at(self, i: int, read_bytes: float) -> float:
        return read_bytes / (self.per_read_s[i] + read_bytes / self.bandwidth[i])

    def throughput(self, read_bytes: float, threads: int) -> float:
        """Bytes per second for reads of ``read_bytes`` issued by ``threads`` threads."""
        read_bytes = max(1.0, float(read_bytes))
        ts = self.threads
        if threads <= ts[0]:
            return self._at(0, read_bytes)
        if threads >= ts[-1]:
            return self._at(len(ts) - 1, read_bytes)
        j = next(i for i, t in enumerate(ts) if t >= threads)
        lo, hi = self._at(j - 1, read_bytes), self._at(j, read_bytes)
        w = math.log(threads / ts[j - 1]) / math.log(ts[j] / ts[j - 1])
        return lo ** (1 - w) * hi**w

    def best_threads(self, read_bytes: float, tolerance: float = 0.05) -> int:
        """Fewest measured threads within ``tolerance`` of the best throughput (fewer threads,
        less CPU)."""
        rates = [self._at(i, max(1.0, read_bytes)) for i in range(len(self.threads))]
        best = max(rates)
        return next(
            t for t, r in zip(self.threads, rates, strict=True) if r >= (1 - tolerance) * best
        )

    def reader_threads(self, record_bytes: float) -> int:
        """Threads for the runtime's reader: the probe's choice when it timed the reader (fastest
        for batches of small reads, then for streaming a layer: the disk alone favours more threads
        than a machine with few cores can wake cheaply), else the disk's."""
        return self.batch_threads or self.best_threads(record_bytes)

    def best_throughput(self, read_bytes: float) -> float:
        """The device's best rate for reads of this size, over all thread counts."""
        return max(self._at(i, max(1.0, read_bytes)) for i in range(len(self.threads)))

    def run_bytes(self, threads: int, share: float = 0.9) -> int:
        """The size long runs are cut at: the probe's timing of the reader when it made one
        (``long_run_bytes``, at the runtime's threads), else the smallest power-of-two read (64 KiB
        .. 4 MiB) reaching ``share`` of the bandwidth at ``threads``.

        Why: a long run (a whole layer streamed) is split into reads of this size, so that its
        pieces keep threads busy; on few cores each piece's hand-off and copy also cost, which only
        timing the reader sees.
        """
        if self.long_run_bytes:
            return self.long_run_bytes
        size = 64 << 10
        while size < 4 << 20 and self.throughput(size, threads) < share * self.throughput(
            1 << 40, threads
        ):
            size *= 2
        return size

    def nearest(self, threads: int) -> int:
        """Index of the measured thread count nearest ``threads``."""
        return min(range(len(self.threads)), key=lambda j: abs(math.log(self.threads[j] / threads)))

    def gap_bytes(self, threads: int) -> int:
        """Bytes between two wanted records that cost less to read through than another read does
        (``a_t * b_t``) at ``threads`` threads (the nearest measured count)."""
        i = self.nearest(threads)
        return int(self.per_read_s[i] * self.bandwidth[i])

    def read_seconds(self, nbytes: float, reads: float, threads: int | None = None) -> float:
        """Estimated time to read ``nbytes`` in ``reads`` reads (mean size) with ``threads``
        (default: best)."""
        if reads <= 0 or nbytes <= 0:
            return 0.0
        size = nbytes / reads
        rate = self.best_throughput(size) if threads is None else self.throughput(size, threads)
        return nbytes / rate

    def to_json(self) -> dict:
        return {
            "threads": list(self.threads),
            "per_read_s": list(self.per_read_s),
            "bandwidth_bytes_per_s": list(self.bandwidth),
            "source": self.source,
            "batch_threads": self.batch_threads,
            "long_run_bytes": self.long_run_bytes,
            "reader_read_s": self.reader_read_s,
            "reader_bytes_per_s": self.reader_bytes_per_s,
        }

    @classmethod
    def from_json(cls, d: dict) -> CostModel:
        return cls(
            tuple(int(t) for t in d["threads"]),
            tuple(float(a) for a in d["per_read_s"]),
            tuple(float(b) for b in d["bandwidth_bytes_per_s"]),
            str(d.get("source", "probe")),
            d.get("batch_threads"),
            d.get("long_run_bytes"),
            d.get("reader_read_s"),
            d.get("reader_bytes_per_s"),
        )


def device_key(path: str | Path) -> str:
    """Identifies the block device holding ``path``: probes are per device, not per directory."""
    dev = os.stat(path).st_dev
    return f"dev-{os.major(dev)}-{os.minor(dev)}"


def probe_path(path: str | Path) -> Path:
    """Where the probe of the device holding ``path`` is cached."""
    return cache_root() / "probe" / f"{device_key(path)}.json"


def load_probe(file: str | Path) -> CostModel:
    """The cost model stored in a probe JSON (written by ``python -m mlx_flash.probe``)."""
    data = json.loads(Path(file).read_text())
    if data.get("format") != PROBE_FORMAT or data.get("version") != PROBE_VERSION:
        raise ValueError(f"{file}: not a version {PROBE_VERSION} mlx_flash probe")
    return CostModel.from_json(data["model"])


def sparse_reads(density: float, gap: int) -> tuple[float, float]:
    """Records read (the gaps read through included) and reads, per neuron of a layer, when each
    neuron is wanted independently with probability ``density`` and the reader reads through gaps
    of up to ``gap`` records: a gap of k records follows a wanted one with probability
    ``density * (1 - density)^k``, and a read ends at a longer gap."""
    if density <= 0.0:
        return 0.0, 0.0
    q = 1.0 - density
    through = sum(k * q**k * density for k in range(1, gap + 1))
    return density * (1.0 + through), density * q ** (gap + 1)


def cost_model_for(path: str | Path) -> CostModel:
    """The probed model of the device holding ``path``, or the defaults when it was never probed."""
    try:
        file = probe_path(path)
        if file.is_file():
            return load_probe(file)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # an unreadable or foreign probe is as good as none
    return CostModel.defaults()
