"""The store reader's cost per call on this disk: the forecast's read time.

Why: a decode step reads through ``StoreReader`` — per call a thread hand-off and Python, per read
a ``preadv``, per byte the disk and a copy out of the staging buffer — and on a machine with few
cores that costs more than the disk alone (the probe's cost model). So the forecast times the
reader itself, page cache bypassed, on a fresh probe file of the model's record size, in both
patterns the runtime issues: contiguous runs (dense streaming) and scattered records and short runs
(sparse selectors), at the runtime's threads and read sizes. A call costs
``call_s + reads * read_s + bytes / bytes_per_s`` (least squares on the timed calls).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from .probe import make_probe_file, record_store
from .runtime.costmodel import CostModel
from .runtime.expected import ReaderCost
from .runtime.store import StoreReader

FILE_BYTES = 96 << 20
CONTIGUOUS_BYTES = (128 << 10, 1 << 20, 4 << 20)
SCATTERED = ((8, 1), (32, 1), (128, 1), (16, 4), (16, 16))  # (runs, records per run), far apart


def measure_reader(
    directory: Path, record: int, threads: int, disk: CostModel, repeats: int = 5
) -> ReaderCost:
    """Time the reader's calls (module docstring) on a probe file in ``directory``."""
    path = make_probe_file(directory, FILE_BYTES)
    try:
        manifest = record_store(path, record)
        n = manifest.d_ffn
        rng = np.random.default_rng(5)
        samples = []
        with StoreReader(
            path.parent,
            manifest,
            threads=threads,
            max_run_bytes=disk.run_bytes(threads),
            gap_bytes=disk.gap_bytes(threads),
        ) as reader:
            dest = {"up": np.empty((n, record // 4), np.float32)}
            calls = [max(1, b // record) for b in CONTIGUOUS_BYTES]
            for k in calls:
                for _ in range(repeats):
                    start = int(rng.integers(0, n - k))
                    samples.append(_timed(reader, np.arange(start, start + k), dest))
            for runs, length in SCATTERED:
                for _ in range(repeats):  # runs far apart: no two coalesce
                    starts = np.sort(rng.choice(n // 64, runs, replace=False)) * 64
                    ids = (starts[:, None] + np.arange(length)).ravel()
                    samples.append(_timed(reader, ids, dest))
            gap = reader.gap_bytes
    finally:
        shutil.rmtree(path.parent)
    return _fit(samples, threads, gap)


def _timed(reader: StoreReader, ids: np.ndarray, dest: dict) -> tuple[float, float, float]:
    """(reads, bytes, seconds) of one call."""
    start = time.perf_counter()
    done = reader.read_neurons(0, ids, dest, np.arange(ids.size))
    return done.reads, done.bytes, time.perf_counter() - start


def _fit(samples: list[tuple[float, float, float]], threads: int, gap_bytes: int) -> ReaderCost:
    """Least squares of seconds = c + reads * r + bytes / b, on relative error; each coefficient
    kept positive."""
    x = np.array([[1.0, reads, nbytes] for reads, nbytes, _ in samples])
    y = np.array([s for *_, s in samples])
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    coef = np.maximum(coef, [0.0, 0.0, 1e-12])
    return ReaderCost(float(coef[0]), float(coef[1]), float(1.0 / coef[2]), threads, gap_bytes)
