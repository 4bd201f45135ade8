"""``python -m mlx_flash.probe``: measure this disk's read throughput by read size and threads, with
the page cache bypassed (the paper's figure 2b), and fit the cost model the runtime uses.

Why: the runtime picks its read threads and read sizes, and ``mlx_flash.bench`` its physical limit,
from this measurement (``mlx_flash.runtime.costmodel``); without one they use its defaults, measured
on Linux development machines. Reads are random, chunk-aligned and never repeat within a cell, from
a fresh file of random bytes that is dropped from the page cache first; the file must be on the disk
you will stream models from, not on tmpfs. Then the store reader itself reads batches of random
records from that file, per thread count: on a machine with few cores the fastest count for a
layer's batch is lower than what the disk alone prefers. Of the counts within 5% of that, it then
streams 8 MiB per call with long runs cut at 256 KiB to 4 MiB, and the runtime takes the count
that streams fastest, with the smallest cut within 5% of its best (``choose_reader``).
``--store DIR`` also times the reader on a flash model, cold and warm, to split I/O time into disk
and reader cost.

    python -m mlx_flash.probe --path ~/models --size 1GB --json probe.json --plot probe.png
    python -m mlx_flash.probe --path ~/models --store ~/models/my-flash-model --threads 1 4 8 32
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cli import add_debug_arg, run_cli, write_outputs
from .plots import plot_probe
from .runtime.costmodel import PROBE_FORMAT, PROBE_VERSION, Cell, CostModel, device_key, probe_path
from .runtime.errors import OptionError
from .runtime.files import cache_root, write_json
from .runtime.manifest import (
    STORE_FILE,
    LayerEntry,
    Manifest,
    Part,
    Region,
    numpy_storage_dtype,
    read_manifest,
)
from .runtime.pagecache import cached_bytes, drop_from_page_cache, file_system_type, on_ram_disk
from .runtime.sizes import format_size, parse_size
from .runtime.store import MAX_THREADS, ReadCount, StoreReader
from .runtime.uncached import DIRECT_ALIGN, UncachedFile, set_nocache

DEFAULT_CHUNKS = tuple(4096 << i for i in range(9))  # 4 KiB .. 1 MiB
DEFAULT_THREADS = (1, 2, 4, 8, 16, 32, 64)
RUN_SIZES = tuple(256 << 10 << i for i in range(5))  # 256 KiB .. 4 MiB
RUN_CALL_BYTES = 8 << 20
RUN_TOLERANCE = 0.05
RUN_REPEAT = 3
RUN_STAGING_BYTES = 32 << 20  # one run per reader thread is staged at most: cuts above this split


def make_probe_file(directory: Path, size: int) -> Path:
    """A store file of ``size`` random bytes in a new folder of ``directory``, fsynced and out of
    the page cache."""
    folder = Path(tempfile.mkdtemp(prefix="mlx_flash-probe-", dir=directory))
    path = folder / STORE_FILE
    rng = np.random.default_rng(0)
    block = 8 << 20
    try:
        with open(path, "wb") as f:
            if sys.platform == "darwin":  # no way to drop a file's pages there: never cache them
                set_nocache(f.fileno())
            for offset in range(0, size, block):
                f.write(rng.bytes(min(block, size - offset)))
            f.flush()
            os.fsync(f.fileno())
        drop_from_page_cache(path)
    except BaseException:
        shutil.rmtree(folder)
        raise
    return path


def record_store(path: Path, record: int) -> Manifest:
    """The probe file seen as one layer of ``record``-byte neurons, so the store reader itself
    can read it."""
    n = path.stat().st_size // record
    part = Part("up", 0, record // 4, "float32")
    layer = LayerEntry(0, "probe", 0, n * record, "", (Region(0, record, record, n, (part,)),))
    return Manifest(
        "probe",
        record // 4,
        n,
        False,
        "relu",
        "bundled",
        "float32",
        0,
        STORE_FILE,
        path.stat().st_size,
        (layer,),
    )


def measure_batches(
    path: Path,
    threads: Sequence[int],
    record: int,
    batch: int,
    seconds: float,
    repeat: int,
    bypass: str,
    progress: bool = True,
) -> dict:
    """The store reader reading batches of ``batch`` random, non-adjacent ``record``-byte records
    per call, per thread count, page cache bypassed: what one layer's sparse load costs, thread
    wake-ups and Python included. The fastest thread count is what the runtime uses (on few cores,
    more threads cost more CPU than the deeper disk queue saves)."""
    manifest = record_store(path, record)
    rng = np.random.default_rng(3)
    dest = {"up": np.empty((batch, record // 4), np.float32)}
    samples: dict[int, list[float]] = {}
    for t in tqdm(list(threads) * repeat, desc="reader batches", unit="cell", disable=not progress):
        with StoreReader(
            path.parent, manifest, threads=t, page_cache=False, bypass=bypass
        ) as reader:
            median = _median_read_s(
                reader,
                dest,
                lambda: np.sort(rng.choice(manifest.d_ffn // 2, batch, replace=False)) * 2,
                seconds,
            )
        samples.setdefault(t, []).append(median)
    ms = {t: 1e3 * float(np.median(v)) for t, v in samples.items()}
    return {
        "record": record,
        "batch": batch,
        "ms_per_batch": {str(t): v for t, v in ms.items()},
        "best_threads": min(ms, key=ms.get),
    }


def _median_read_s(
    reader: StoreReader, dest: dict, draw: Callable[[], np.ndarray], seconds: float
) -> float:
    """Median seconds of the reader's calls on layer 0 during ``seconds``, each reading the ids
    ``draw()`` gives (drawn before its clock starts) into the first rows of ``dest``."""
    t0, times = time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        ids = draw()
        began = time.perf_counter()
        reader.read_neurons(0, ids, dest, np.arange(ids.size))
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def measure_runs(
    path: Path,
    threads: Sequence[int],
    seconds: float,
    repeat: int,
    bypass: str,
    progress: bool = True,
) -> dict:
    """The store reader reading a contiguous ``RUN_CALL_BYTES`` per call (a layer streamed whole)
    at each of ``threads``, with its long runs cut at each of ``run_sizes``: more, shorter reads
    keep more threads busy, fewer, longer ones cost fewer hand-offs and copies, and on few cores the
    second can win where the disk alone (the grid) favours the first. Sizes are interleaved, each
    cell keeps its median over at least ``RUN_REPEAT`` rounds (the differences are tens of per
    cent, a shared disk's noise as large)."""
    record = 4096
    manifest = record_store(path, record)
    rng = np.random.default_rng(4)
    k = RUN_CALL_BYTES // record
    dest = {"up": np.empty((k, record // 4), np.float32)}
    cells = [(t, size) for t in threads for size in run_sizes(t)] * max(repeat, RUN_REPEAT)
    samples: dict[tuple[int, int], list[float]] = {}
    for t, size in tqdm(cells, desc="reader runs", unit="cell", disable=not progress):
        with StoreReader(
            path.parent, manifest, t, page_cache=False, bypass=bypass, max_run_bytes=size
        ) as reader:
            median = _median_read_s(
                reader,
                dest,
                lambda: np.arange(k) + int(rng.integers(0, manifest.d_ffn - k)),
                seconds,
            )
        samples.setdefault((t, size), []).append(median)
    ms: dict[str, dict[str, float]] = {}
    for (t, size), v in samples.items():
        ms.setdefault(str(t), {})[str(size)] = 1e3 * float(np.median(v))
    return {"call_bytes": RUN_CALL_BYTES, "ms_per_call": ms}


def run_sizes(threads: int) -> tuple[int, ...]:
    """The cuts timed at ``threads``: those whose staging (a run per thread) fits
    ``RUN_STAGING_BYTES``, and the smallest always."""
    return tuple(n for n in RUN_SIZES if n == RUN_SIZES[0] or n * threads <= RUN_STAGING_BYTES)


def fast_batch_threads(batches: dict) -> list[int]:
    """Thread counts within ``RUN_TOLERANCE`` of the fastest sparse batch (``measure_batches``)."""
    return _near_fastest({int(t): v for t, v in batches["ms_per_batch"].items()})


def _near_fastest(ms: dict[int, float]) -> list[int]:
    """The keys whose time is within ``RUN_TOLERANCE`` of the fastest."""
    return [k for k, v in ms.items() if v <= (1 + RUN_TOLERANCE) * min(ms.values())]


def choose_reader(runs: dict) -> tuple[int, int]:
    """The reader's threads and long-run size: of the thread counts ``measure_runs`` timed (those
    within ``RUN_TOLERANCE`` of the fastest sparse batch), the one that streams a layer fastest;
    then the smallest run size within ``RUN_TOLERANCE`` of its fastest (staging memory grows with
    it)."""
    runs_ms = {int(t): {int(n): v for n, v in by.items()} for t, by in runs["ms_per_call"].items()}
    threads = min(runs_ms, key=lambda t: min(runs_ms[t].values()))
    return threads, min(_near_fastest(runs_ms[threads]))


def fit_reader(batches: dict, runs: dict) -> tuple[float, float]:
    """The reader's cost per read (s) and bandwidth (bytes/s) at the threads ``choose_reader``
    took, from its two timed calls there: a batch of scattered records (many reads, few bytes)
    and a layer streamed whole (few reads, many bytes). Two equations ``reads * r + bytes / b =
    seconds``; r kept within [0, a batch's time per read]."""
    threads, cut = runs["threads"], runs["best_run_bytes"]
    batch_s = {int(t): ms for t, ms in batches["ms_per_batch"].items()}[threads] / 1e3
    run_s = {int(t): by for t, by in runs["ms_per_call"].items()}[threads][str(cut)] / 1e3
    batch_reads, batch_bytes = batches["batch"], batches["batch"] * batches["record"]
    run_reads, run_bytes = -(-runs["call_bytes"] // cut), runs["call_bytes"]
    det = batch_reads * run_bytes - run_reads * batch_bytes
    read_s = (batch_s * run_bytes - run_s * batch_bytes) / det
    read_s = min(max(read_s, 0.0), batch_s / batch_reads)
    per_byte = max(run_s - run_reads * read_s, 1e-12 * run_bytes) / run_bytes
    return read_s, 1.0 / per_byte


def measure_cell(
    src: UncachedFile,
    file_size: int,
    chunk: int,
    threads: int,
    seconds: float,
    rng: np.random.Generator,
) -> dict:
    """``threads`` threads read distinct random ``chunk``-aligned pieces for ``seconds`` (or until
    each piece of the file was read once); returns bytes, reads, wall seconds and bytes/s."""
    offsets = (rng.permutation(file_size // chunk) * chunk).tolist()
    start: list[float] = []
    barrier = threading.Barrier(threads + 1, action=lambda: start.append(time.perf_counter()))
    reads, ends, errors = [0] * threads, [0.0] * threads, []

    def worker(i: int) -> None:
        # page aligned, as O_DIRECT needs; freed by the GC
        buf = mmap.mmap(-1, max(chunk, mmap.PAGESIZE))
        bufs, n = [memoryview(buf)[:chunk]], 0
        # as the store reader reads: O_DIRECT from its size on, where it is used at all
        direct = src.direct_for(chunk) and chunk % DIRECT_ALIGN == 0
        fd, flags = (src.direct_fd, 0) if direct else (src.fd, src.flags)
        try:
            barrier.wait()
            deadline = start[0] + seconds
            for off in offsets[i::threads]:
                if time.perf_counter() > deadline:
                    break
                if os.preadv(fd, bufs, off, flags) != chunk:
                    raise OSError(f"short read at offset {off}")
                n += 1
        except BaseException as e:  # reported by the caller; the barrier must not hang the others
            errors.append(e)
            barrier.abort()
        finally:
            reads[i], ends[i] = n, time.perf_counter()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    wall = max(ends) - start[0]
    total = sum(reads) * chunk
    return {
        "chunk": chunk,
        "threads": threads,
        "bytes": total,
        "reads": sum(reads),
        "seconds": wall,
        "bytes_per_s": total / wall if wall > 0 else 0.0,
    }


def run_probe(
    directory: Path,
    size: int,
    chunks=DEFAULT_CHUNKS,
    threads=DEFAULT_THREADS,
    seconds: float = 0.5,
    bypass: str = "auto",
    repeat: int = 1,
    batch: int = 32,
    progress: bool = True,
) -> dict:
    """Create the probe file in ``directory``, measure every (chunk, threads) cell, fit; the
    probe as JSON data.

    With ``repeat`` > 1 the whole grid is measured that many times, interleaved, and each cell keeps
    the median rate: on a shared machine a neighbour's burst then spoils one sample, not a cell.
    Then the store reader reads batches of ``batch`` random 4 KiB records per call
    (``measure_batches``; 0 skips it).
    """
    chunks, threads = _checked_grid(directory, size, chunks, threads)
    path = make_probe_file(directory, size)
    try:
        cells, mode = _measure_grid(path, size, chunks, threads, seconds, bypass, repeat, progress)
        batches = (
            measure_batches(path, threads, 4096, batch, seconds, repeat, bypass, progress)
            if batch
            else None
        )
        model = CostModel.fit(
            [Cell(c["chunk"], c["threads"], c["bytes_per_s"]) for c in cells],
            f"probe of {directory} ({datetime.now():%Y-%m-%d %H:%M})",
            batches["best_threads"] if batches else None,
        )
        runs = None
        if batches and size >= 2 * RUN_CALL_BYTES:
            runs = measure_runs(
                path, fast_batch_threads(batches), seconds, repeat, bypass, progress
            )
            runs["threads"], runs["best_run_bytes"] = choose_reader(runs)
            read_s, bytes_per_s = fit_reader(batches, runs)
            model = replace(
                model,
                batch_threads=runs["threads"],
                long_run_bytes=runs["best_run_bytes"],
                reader_read_s=read_s,
                reader_bytes_per_s=bytes_per_s,
            )
        after = cached_bytes(path)
    finally:
        shutil.rmtree(path.parent)
    return {
        "format": PROBE_FORMAT,
        "version": PROBE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "path": str(directory.resolve()),
        "file_system": file_system_type(directory),
        "device": device_key(directory),
        "bypass": mode,
        "file_bytes": size,
        "seconds_per_cell": seconds,
        "repeat": repeat,
        "page_cache_after": after,
        "cells": cells,
        "batches": batches,
        "runs": runs,
        "model": model.to_json(),
        "fit_error": _fit_error(model, cells),
    }


# a probe run by a bench that found none recent enough: about a minute on a laptop SSD
QUICK = {"size": 512 << 20, "threads": (1, 2, 4, 8, 16, 32), "seconds": 0.25}


def recent_probe(directory: Path, max_age_s: float, progress: bool = True) -> dict:
    """The probe of the disk holding ``directory``: the saved one if it was made within
    ``max_age_s`` seconds, else a quick one run now (in ``directory``) and saved where the
    runtime finds it, so the benches' physical limit is this disk's as it is now."""
    file = probe_path(directory)
    try:
        probe = json.loads(file.read_text())
        age = datetime.now(timezone.utc) - datetime.fromisoformat(probe["created"])
        if probe.get("format") == PROBE_FORMAT and age.total_seconds() <= max_age_s:
            return probe
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none, unreadable or foreign: probe now
    probe = run_probe(directory, progress=progress, **QUICK)
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json(file, probe)
    return probe


def _checked_grid(
    directory: Path, size: int, chunks: Sequence[int], threads: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The distinct read sizes and thread counts, sorted; refused where the probe would measure
    memory instead of the disk, or could not keep every thread reading distinct pieces."""
    if on_ram_disk(directory):
        raise OptionError(
            f"{directory} is on {file_system_type(directory)} (RAM): probe a directory on disk"
        )
    chunks, threads = sorted(set(chunks)), sorted(set(threads))
    if not all(1 <= t <= MAX_THREADS for t in threads):
        raise OptionError(f"threads must be in 1..{MAX_THREADS}")
    if size < max(chunks) * max(threads):
        raise OptionError(
            f"--size {format_size(size)} is too small for {max(threads)} threads of "
            f"{format_size(max(chunks))} reads"
        )
    return chunks, threads


def _measure_grid(
    path: Path,
    size: int,
    chunks: list[int],
    threads: list[int],
    seconds: float,
    bypass: str,
    repeat: int,
    progress: bool,
) -> tuple[list[dict], str]:
    """Every (chunk, threads) cell ``repeat`` times, interleaved; the median sample of each cell,
    and the bypass mode the file was read with."""
    rng = np.random.default_rng(1)
    src = UncachedFile(path, bypass=bypass)
    try:
        if src.mode == "direct" and any(c % DIRECT_ALIGN for c in chunks):
            raise OptionError(f"O_DIRECT needs chunk sizes that are multiples of {DIRECT_ALIGN}")
        grid = [(c, t) for c in chunks for t in threads]
        samples: dict[tuple[int, int], list[dict]] = {}
        for c, t in tqdm(grid * repeat, desc="probe", unit="cell", disable=not progress):
            samples.setdefault((c, t), []).append(measure_cell(src, size, c, t, seconds, rng))
        return [_median_cell(samples[key]) for key in grid], src.mode
    finally:
        src.close()


def _fit_error(model: CostModel, cells: list[dict]) -> dict:
    """How far the fitted model is from the measured cells, relative to the measurement."""
    errors = [
        abs(model.throughput(c["chunk"], c["threads"]) / c["bytes_per_s"] - 1)
        for c in cells
        if c["bytes_per_s"]
    ]
    return {"median": float(np.median(errors)), "max": float(max(errors))}


def measure_reader(
    directory: Path,
    threads: Sequence[int],
    fraction: float,
    seconds: float,
    cost: CostModel,
    progress: bool = True,
) -> dict:
    """The store reader on a real flash store, per thread count: random sets of ``fraction`` of a
    layer's neurons per call (what a sparse token reads) and whole layers (what naive reads), cold
    (page cache bypassed) and warm (the store in the page cache: what is left is the reader's CPU
    cost), next to the cost model's disk time for the same reads. The gap between the three says
    where I/O time goes."""
    manifest = read_manifest(directory)
    store = directory / manifest.store_file
    k = max(1, round(fraction * manifest.d_ffn))
    rng = np.random.default_rng(2)
    id_sets = [np.sort(rng.choice(manifest.d_ffn, k, replace=False)) for _ in range(64)]
    dest = {
        p.name: np.empty((manifest.d_ffn, p.length), numpy_storage_dtype(p.dtype))
        for r in manifest.layers[0].regions
        for p in r.parts
    }
    rows = []
    grid = [
        (pattern, warm, t)
        for pattern in ("random", "layer")
        for warm in (False, True)
        for t in threads
    ]
    for pattern, warm, t in tqdm(grid, desc="store reader", unit="cell", disable=not progress):
        drop_from_page_cache(store)
        with StoreReader(directory, manifest, threads=t, page_cache=warm) as reader:
            if warm:
                for layer in range(manifest.n_layers):
                    reader.read_range(layer, 0, manifest.d_ffn, dest)
                reader.reset_totals()
            _read_for(reader, manifest, pattern, seconds, dest, id_sets)
            stats = reader.totals
        rows.append(_reader_row(pattern, warm, t, stats, cost))
    return {
        "directory": str(directory),
        "layout": manifest.layout,
        "record_bytes": manifest.neuron_bytes(),
        "neurons_per_call": k,
        "rows": rows,
    }


def _read_for(
    reader: StoreReader,
    manifest: Manifest,
    pattern: str,
    seconds: float,
    dest: dict[str, np.ndarray],
    id_sets: list[np.ndarray],
) -> None:
    """Read for ``seconds``, layer after layer: whole layers (``pattern`` "layer") or one of the
    random ``id_sets`` per call."""
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        layer = n % manifest.n_layers
        if pattern == "layer":
            reader.read_range(layer, 0, manifest.d_ffn, dest)
        else:
            ids = id_sets[n % len(id_sets)]
            reader.read_neurons(layer, ids, dest, np.arange(len(ids)))
        n += 1


def _reader_row(pattern: str, warm: bool, threads: int, stats: ReadCount, cost: CostModel) -> dict:
    """One cell of the reader table: the reader's totals per call, and the cost model's disk
    time for the same reads."""
    return {
        "pattern": pattern,
        "warm": warm,
        "threads": threads,
        "calls": stats.calls,
        "reads_per_call": stats.reads / stats.calls,
        "bytes_per_call": stats.bytes / stats.calls,
        "ms_per_call": 1e3 * stats.seconds / stats.calls,
        "model_ms_per_call": 1e3
        * cost.read_seconds(stats.bytes, stats.reads, threads)
        / stats.calls,
    }


def format_reader(result: dict) -> str:
    """One line per (pattern, threads): cold and warm ms per call and the cost model's disk time."""
    lines = [
        f"store reader on {result['directory']} ({result['layout']}, "
        f"{result['record_bytes']} B per neuron): random = {result['neurons_per_call']} random "
        "neurons per call, layer = a whole layer per call",
        f"{'pattern':>8} {'threads':>7} {'reads':>6} {'KB/read':>8} {'cold ms':>8} {'warm ms':>8} "
        f"{'disk ms':>8}",
    ]
    rows = {(r["pattern"], r["warm"], r["threads"]): r for r in result["rows"]}
    for (pattern, warm, t), cold in rows.items():
        if warm:
            continue
        hot = rows[(pattern, True, t)]
        size = (
            cold["bytes_per_call"] / cold["reads_per_call"] / 1e3 if cold["reads_per_call"] else 0.0
        )
        lines.append(
            f"{pattern:>8} {t:7d} {cold['reads_per_call']:6.1f} {size:8.1f} "
            f"{cold['ms_per_call']:8.3f} {hot['ms_per_call']:8.3f} "
            f"{cold['model_ms_per_call']:8.3f}"
        )
    lines.append(
        "cold: page cache bypassed (disk + reader); warm: store in the page cache (reader CPU "
        "cost alone); disk: the cost model's time for the same reads at that thread count"
    )
    return "\n".join(lines)


def _median_cell(samples: list[dict]) -> dict:
    """The sample with the median rate, with every sample's rate kept for the record."""
    ranked = sorted(samples, key=lambda c: c["bytes_per_s"])
    return {
        **ranked[(len(ranked) - 1) // 2],
        "samples_bytes_per_s": [c["bytes_per_s"] for c in samples],
    }


def format_probe(probe: dict) -> str:
    """The throughput table (MB/s, rows = read size, columns = threads) and the fitted model."""
    threads = sorted({c["threads"] for c in probe["cells"]})
    chunks = sorted({c["chunk"] for c in probe["cells"]})
    rate = {(c["chunk"], c["threads"]): c["bytes_per_s"] for c in probe["cells"]}
    model = CostModel.from_json(probe["model"])
    cached = probe["page_cache_after"]
    lines = [
        f"probe: {probe['path']} ({probe['file_system']}, {probe['device']}), "
        f"{format_size(probe['file_bytes'])} file, bypass {probe['bypass']}, "
        f"{probe['seconds_per_cell']} s per cell x {probe['repeat']}, page cache after: "
        f"{'?' if cached is None else format_size(cached)}",
        "random reads, MB/s (1 MB = 1e6 bytes)",
        f"{'read size':>10} " + " ".join(f"{f'{t} thr':>8}" for t in threads) + f" {'best thr':>9}",
    ]
    for c in chunks:
        row = [rate.get((c, t), 0.0) / 1e6 for t in threads]
        lines.append(
            f"{_kib(c):>10} " + " ".join(f"{r:8.0f}" for r in row) + f" {model.best_threads(c):9d}"
        )
    lines.append(
        "fitted cost model: read of s bytes = a + s / b (device time shared by the threads)"
    )
    lines.append(f"{'threads':>10} {'a (us)':>8} {'b (GB/s)':>9}")
    for t, a, b in zip(model.threads, model.per_read_s, model.bandwidth, strict=True):
        lines.append(f"{t:10d} {a * 1e6:8.1f} {b / 1e9:9.2f}")
    err = probe["fit_error"]
    lines.append(
        f"fit error: median {100 * err['median']:.0f}%, max {100 * err['max']:.0f}% of the "
        "measured throughput"
    )
    batches = probe.get("batches")
    if batches:
        lines.append(
            f"store reader, batches of {batches['batch']} random {_kib(batches['record'])} records "
            f"per call (one layer's sparse load), ms per batch:"
        )
        lines.append(
            " ".join(f"{t} thr {ms:.2f}" for t, ms in batches["ms_per_batch"].items())
            + f"  -> fastest with {batches['best_threads']} threads"
        )
    runs = probe.get("runs")
    if runs:
        lines.append(
            f"store reader, {_kib(runs['call_bytes'])} contiguous per call (a layer streamed "
            f"whole), ms per call by threads and the size long runs are cut at:"
        )
        for t, by_size in runs["ms_per_call"].items():
            lines.append(
                f"{t:>4} thr " + " ".join(f"{_kib(int(n))} {ms:.2f}" for n, ms in by_size.items())
            )
    threads = runs["threads"] if runs else batches["best_threads"] if batches else None
    if threads:
        cut = f", long runs cut at {_kib(runs['best_run_bytes'])}" if runs else ""
        lines.append(f"-> the runtime reads with {threads} threads{cut}")
    if model.reader_read_s is not None:
        lines.append(
            f"-> the reader there: {model.reader_read_s * 1e6:.1f} us per read, "
            f"{model.reader_bytes_per_s / 1e9:.2f} GB/s (what auto weighs reads with)"
        )
    return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n // 1024} KiB" if n < 1 << 20 else f"{n // (1 << 20)} MiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.probe",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--path",
        type=Path,
        default=None,
        help="directory on the disk to probe "
        "(default: the mlx_flash cache, where the default model lives)",
    )
    p.add_argument(
        "--size", default="1GB", help="probe file size (default: 1GB); larger than the disk's cache"
    )
    p.add_argument("--json", type=Path, help="also write the probe to this file")
    p.add_argument(
        "--chunk-sizes", nargs="+", help="read sizes (default: 4KiB to 1MiB in powers of two)"
    )
    p.add_argument(
        "--threads", nargs="+", type=int, default=list(DEFAULT_THREADS), help="thread counts"
    )
    p.add_argument("--seconds", type=float, default=0.5, help="time per (read size, threads) cell")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure the grid this many times; keep each cell's median",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=32,
        help="random records per store-reader call when timing thread counts (0: skip)",
    )
    p.add_argument(
        "--bypass",
        default="auto",
        choices=["auto", "dontcache", "direct", "nocache"],
        help="how to bypass the page cache "
        "(auto: F_NOCACHE on macOS, RWF_DONTCACHE, else O_DIRECT)",
    )
    p.add_argument(
        "--store", type=Path, help="also time the store reader on this flash model directory"
    )
    p.add_argument(
        "--fraction",
        type=float,
        default=0.03,
        help="--store: share of a layer's neurons per random call",
    )
    p.add_argument(
        "--no-save", action="store_true", help="do not store the result where the runtime finds it"
    )
    p.add_argument(
        "--plot", type=Path, help="write a PNG of throughput against read size and threads"
    )
    add_debug_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    directory = args.path or cache_root()
    directory.mkdir(parents=True, exist_ok=True)
    chunks = [parse_size(c) for c in args.chunk_sizes] if args.chunk_sizes else list(DEFAULT_CHUNKS)
    probe = run_probe(
        directory,
        parse_size(args.size),
        chunks,
        args.threads,
        args.seconds,
        args.bypass,
        args.repeat,
        args.batch,
    )
    print(format_probe(probe))
    if args.store:
        probe["store_reader"] = measure_reader(
            args.store,
            args.threads,
            args.fraction,
            args.seconds,
            CostModel.from_json(probe["model"]),
        )
        print(format_reader(probe["store_reader"]))
    if not args.no_save:
        probe_path(directory).parent.mkdir(parents=True, exist_ok=True)
        write_json(probe_path(directory), probe)
        print(f"saved for the runtime: {probe_path(directory)}")
    write_outputs(probe, args.json, args.plot, plot_probe)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
