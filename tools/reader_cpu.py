"""The store reader's time and CPU per call on a converted store, beside plain reads of the same
records and the disk's physical limit for them.

    python tools/reader_cpu.py --model DIR [--share 0.15] [--rounds 5]

Each call reads ``--share`` of a layer's neurons, chosen at random (1.0: the whole layer, as
naive streaming reads it), into buffer-like rows (sorted ids into consecutive rows, as a neuron
buffer asks), once per layer per round. Three ways, alternating within each round on the same
calls:

- cold: the runtime's reader with the page cache bypassed (as the runtime reads);
- plain: the same records with nothing but ``preadv`` from a pool of the reader's threads, each run
  of adjacent records one read cut at the reader's largest run (as the limit counts them), uncached
  as the reader's file does it (``O_DIRECT`` for long runs), into scratch memory: no planning,
  advice, copies into rows or gaps. For whole layers (few long reads) what it measures above the
  limit is the disk at that moment, and what the reader measures above it the reader's own cost;
  short records it reads one by one from the pool, CPU-bound on few cores (the reader advises them
  to the kernel instead), so there it is no floor;
- warm: the reader with the store in the page cache and one thread (its own work with no disk).

Prints per call: wall ms, and CPU ms split into user (Python, numpy) and kernel time, medians of
the rounds; and the physical limit (``mlx_flash/runtime/limit.py``) of the same calls.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mlx_flash.runtime.limit import limit_seconds
from mlx_flash.runtime.loader import disk_model, open_store
from mlx_flash.runtime.manifest import Manifest, read_manifest
from mlx_flash.runtime.options import FlashOptions
from mlx_flash.runtime.store import StoreReader, plan_runs
from mlx_flash.runtime.uncached import DIRECT_ALIGN, UncachedFile

Calls = list[tuple[int, np.ndarray]]  # (layer, sorted ids) per call


def random_calls(m: Manifest, share: float, rng: np.random.Generator) -> Calls:
    k = max(1, int(share * m.d_ffn))
    return [(i, np.sort(rng.choice(m.d_ffn, k, replace=False))) for i in range(m.n_layers)]


def timed(run: Callable[[int, np.ndarray], object], calls: Calls) -> tuple[float, float, float]:
    """(wall, user, kernel) seconds per call."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for layer, ids in calls:
        run(layer, ids)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    n = len(calls)
    return wall / n, (after.ru_utime - before.ru_utime) / n, (after.ru_stime - before.ru_stime) / n


def reader_call(reader: StoreReader) -> Callable[[int, np.ndarray], object]:
    m = reader.manifest
    k = m.d_ffn
    dest = {p.name: np.zeros((k, p.length), np.float32) for p in m.layers[0].parts()}
    return lambda layer, ids: reader.read_neurons(layer, ids, dest, np.arange(ids.size))


class PlainReads:
    """Each run of adjacent records one ``preadv`` into scratch memory, from a thread pool."""

    def __init__(self, directory: Path, m: Manifest, threads: int, run_bytes: int):
        self.m, self.run_bytes = m, run_bytes
        self.file = UncachedFile(directory / m.store_file, page_cache=False)
        self.pool = ThreadPoolExecutor(threads)
        self.local = threading.local()
        self.scratch = (
            run_bytes + max(r.record_stride for r in m.layers[0].regions) + 2 * DIRECT_ALIGN
        )

    def __call__(self, layer: int, ids: np.ndarray) -> int:
        reads = []
        for region in self.m.layers[layer].regions:
            stride = region.record_stride
            for a, b in plan_runs(ids, max(1, self.run_bytes // stride)):
                reads.append((region.offset + int(ids[a]) * stride, (b - a) * stride))
        return sum(self.pool.map(self.read, reads))

    def read(self, run: tuple[int, int]) -> int:
        offset, nbytes = run
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = memoryview(mmap.mmap(-1, self.scratch))
        f = self.file
        if not f.direct_for(nbytes):
            return os.preadv(f.fd, [buf[:nbytes]], offset, f.flags)
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN  # O_DIRECT stops at end of file
        return os.preadv(f.direct_fd, [buf[: end - start]], start)

    def close(self) -> None:
        self.pool.shutdown()
        self.file.close()


def report(name: str, samples: list[tuple[float, float, float]]) -> None:
    wall, user, kernel = (1e3 * statistics.median(s[i] for s in samples) for i in range(3))
    print(f"{name:>5}: {wall:6.2f} ms per call, CPU {user:5.2f} ms user + {kernel:5.2f} ms kernel")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="converted flash directory")
    ap.add_argument("--share", type=float, default=0.15, help="share of a layer's neurons per call")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not 0 < args.share <= 1:
        ap.error("--share must be in (0, 1]")
    m = read_manifest(args.model)
    cost, threads = disk_model(args.model, m)
    rng = np.random.default_rng(0)
    uncached = FlashOptions.build({"page_cache": False})
    cold, plain, limits = [], [], []
    with open_store(args.model, m, uncached, cost, threads) as reader:
        plain_reads = PlainReads(args.model, m, threads, reader.max_run_bytes)
        try:
            for _ in range(args.rounds):
                calls = random_calls(m, args.share, rng)
                cold.append(timed(reader_call(reader), calls))
                plain.append(timed(plain_reads, calls))
                regions = [m.layers[layer].regions for layer, _ in calls]
                limits.append(
                    statistics.mean(
                        limit_seconds(cost, r, None, ids, threads, reader.max_run_bytes)
                        for r, (_, ids) in zip(regions, calls, strict=True)
                    )
                )
        finally:
            plain_reads.close()
    print(
        f"{threads} threads, runs up to {reader.max_run_bytes >> 10} KiB, {reader.cache_mode}; "
        f"limit from {cost.source}"
    )
    report("cold", cold)
    report("plain", plain)
    print(f"limit: {1e3 * statistics.median(limits):6.2f} ms per call")
    with open(args.model / m.store_file, "rb") as store:  # into the page cache
        while store.read(1 << 24):
            pass
    with StoreReader(args.model, m, threads=1) as reader:
        calls = random_calls(m, args.share, rng)
        timed(reader_call(reader), calls)  # first touch of the rows
        warm = [
            timed(reader_call(reader), random_calls(m, args.share, rng)) for _ in range(args.rounds)
        ]
        report("warm", warm)


if __name__ == "__main__":
    main()
