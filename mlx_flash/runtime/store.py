"""Store reader: coalesced, parallel reads of neuron records from the flash store into neuron
buffers.

Why this shape: flash is fast only for large reads with many in flight (README, Design: the disk).
So the ids of a call are sorted, adjacent ids are merged into one read per region run (capped at
``max_run_bytes``), and the runs are issued from a thread pool (``os.preadv`` releases the GIL).

Every run is read into a per-thread staging buffer, and each wanted part is copied or converted
from there into its destination rows with one numpy operation per part (float16 -> float32,
bfloat16 -> float32 by a 16-bit shift, ...). Runs read without ``O_DIRECT`` are batched: a job
reads several runs one after another into its staging buffer (one ``preadv`` each) and converts
them together, so a short run costs the reader little more than its ``preadv``. (Scattering each
record's parts straight into the rows needs an iovec per part per record, built in Python, and
converting run by run a few numpy calls per run: both cost more than the copy they save.)

With ``page_cache=False`` reads bypass the OS page cache (``mlx_flash.runtime.uncached``); staged
runs long enough for ``O_DIRECT`` go through the aligned staging buffer.

``read_path="mmap"`` reads no run with ``preadv``: every run is copied or converted from the
store's mapping as a staged one is from its buffer, by the same threads (the copy page-faults with
the GIL released). The call's runs are advised first (``MADV_WILLNEED``: the kernel queues them all
at once, as ``fadvise`` does for the uncached path) and the mapping is ``MADV_RANDOM`` (no
read-around of each fault). It needs the page cache, and an I/O error is a ``SIGBUS`` rather than a
``StoreReadError``. Measured on Linux (ext4 on a virtio disk, 4 threads, medians of 3): faster than
cached ``preadv`` for whole layers and for runs read through gaps (the copy skips the gap bytes
``preadv`` transfers), slower for many short runs (one ``madvise`` per run: 0.9x cold, 0.7x warm);
so ``preadv`` stays the default. macOS is unmeasured.

Queue depth without io_uring: where ``posix_fadvise`` exists and reads go through the kernel's
page cache (kept, or bypassed by flag: Linux ``RWF_DONTCACHE``), a call first advises the kernel
that it will need all of its buffered runs (``WILLNEED``: the kernel queues every one of them at
once); where all are short, the calling thread then reads them (they land in parallel; waking pool
threads would cost more than the copies). With the page cache bypassed they are then dropped again
(one ``DONTNEED`` over their span), so they are read with the device's queue full and nothing is
left in the page cache. Such a call reads no gap through (another advised read costs little more
than its bytes). ``advise`` starts the same for a later call (the look-ahead): with the page cache
bypassed, what it advised is dropped after the next read of that layer.

Destinations: ``dest`` maps part names to 2-D arrays ``[capacity, part.length]``; a part missing
from ``dest`` is not copied (a region none of whose parts is wanted is not read at all). Duplicate
ids or duplicate rows in one call are rejected with ``ValueError``: a neuron buffer never holds a
neuron twice, and two reads racing into one row would be a bug of the caller.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .errors import FlashFormatError, StoreReadError
from .manifest import (
    PACKED,
    LayerEntry,
    Manifest,
    Part,
    Region,
    check_store_file,
    numpy_storage_dtype,
)
from .options import READ_PATHS
from .uncached import DIRECT_ALIGN, DIRECT_MIN_BYTES, UncachedFile

MAX_THREADS = 64


@dataclass(frozen=True)
class ReadCount:
    """What reads cost: neuron records read, bytes the OS transferred (with O_DIRECT including the
    alignment slack), ``preadv`` calls (mmap: runs copied from the mapping), wall seconds inside
    ``read_neurons``, and its calls.
    Counts add up with ``+``."""

    records: int = 0
    bytes: int = 0
    reads: int = 0
    seconds: float = 0.0
    calls: int = 0

    def __add__(self, other: ReadCount) -> ReadCount:
        return ReadCount(
            self.records + other.records,
            self.bytes + other.bytes,
            self.reads + other.reads,
            self.seconds + other.seconds,
            self.calls + other.calls,
        )


@dataclass(frozen=True)
class _RegionPlan:
    """How to read runs of one region for one call: which parts are wanted and where they lie."""

    region: Region
    wanted: tuple[Part, ...]
    lead: int  # start of the first wanted part within a record
    tail: int  # end of the last wanted part within a record
    max_records: int
    max_gap: int  # records between two wanted ones that a run reads through rather than split

    def span(self, n_records: int | np.ndarray) -> int | np.ndarray:
        """Bytes from the first record's first wanted byte to the last record's last one."""
        return (n_records - 1) * self.region.record_stride + self.tail - self.lead


@dataclass(frozen=True)
class _Runs:
    """A region's runs in one call: [starts, ends) of the sorted ids, the records each spans,
    its file offset and bytes, and whether it is read ``O_DIRECT``."""

    starts: np.ndarray
    ends: np.ndarray
    spans: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    direct: np.ndarray


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _sorted_request(
    ids: np.ndarray, rows: np.ndarray, n_records: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ids sorted ascending with their rows; rejects out-of-range ids, duplicate ids and rows."""
    if ids.ndim != 1 or ids.shape != rows.shape:
        raise ValueError(
            f"ids and rows must be 1-D and of equal length (got {ids.shape} and {rows.shape})"
        )
    sids, srows = ids, rows
    if not _increasing(ids):  # a buffer's loads arrive sorted, into consecutive rows
        order = np.argsort(ids, kind="stable")
        sids, srows = ids[order], rows[order]
        if np.any(sids[1:] == sids[:-1]):
            raise ValueError("duplicate neuron ids in one read")
    if sids[0] < 0 or sids[-1] >= n_records:
        raise ValueError(f"neuron ids must be in [0, {n_records}) (got {sids[0]}..{sids[-1]})")
    if not _increasing(rows) and np.unique(rows).size != rows.size:
        raise ValueError("duplicate destination rows in one read")
    return sids, srows


def _increasing(a: np.ndarray) -> bool:
    return bool(np.all(a[1:] > a[:-1]))


def plan_runs(sids: np.ndarray, cap: int, max_gap: int = 0) -> list[tuple[int, int]]:
    """[a, b) index ranges of ``sids`` (sorted ids) read as one run each: ids less than
    ``max_gap`` + 1 apart share a run (the records between are read and dropped: cheaper than
    another read), and no run spans more than ``cap`` records."""
    starts, ends = _run_bounds(sids, cap, max_gap)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _run_bounds(sids: np.ndarray, cap: int, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """``plan_runs`` as two arrays: the runs' starts and ends."""
    if len(sids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(sids) > max_gap + 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(sids)]))
    if np.all(sids[ends - 1] - sids[starts] < cap):  # most calls: no run to split
        return starts, ends
    bounds = []
    for a, e in zip(starts.tolist(), ends.tolist(), strict=True):
        while a < e:  # split at the cap: the run [a, b) spans at most cap records
            b = a + int(np.searchsorted(sids[a:e], sids[a] + cap, side="left"))
            bounds.append((a, b))
            a = b
    return tuple(np.array(bounds, np.int64).T)


def _batches(spans: list[int], batched: list[bool], limit: int) -> list[tuple[int, int]]:
    """[i, j) ranges of runs read by one job: consecutive runs that may be batched while their
    records (``spans``) add up to at most ``limit``; any other run alone."""
    out: list[tuple[int, int]] = []
    i = total = 0
    for j, (span, together) in enumerate(zip(spans, batched, strict=True)):
        if j > i and not (together and batched[i] and total + span <= limit):
            out.append((i, j))
            i, total = j, 0
        total += span
    if spans:
        out.append((i, len(spans)))
    return out


def _convert_into(dst: np.ndarray, rows: np.ndarray, src: np.ndarray, dtype: str) -> None:
    """``dst[rows] = src``, ``src`` holding raw store values of ``dtype`` (bfloat16 as uint16)."""
    if dtype == "bfloat16" and dst.dtype.kind == "f":
        src = (src.astype(np.uint32) << 16).view(np.float32)
    elif dtype == "float16" and dst.dtype == np.float32:
        src = _half_to_float32(src)
    dst[rows] = src


_HALF_TO_FLOAT_SCALE = np.float32(2.0**112)  # 2 ** (float32's exponent bias - float16's)


def _half_to_float32(half: np.ndarray) -> np.ndarray:
    """float16 values as float32, bit for bit numpy's cast (subnormals, infinities and NaN
    payloads included), in a few vectorised integer passes: numpy's own cast is a scalar loop
    unless it was built for a CPU with half-precision instructions. A half's magnitude bits
    shifted into a float32's place read as the value times 2**-112 (subnormals too), so one
    multiply rescales them; magnitudes that land at 2**16 or more were infinities or NaN."""
    signed = half.view(np.int16).astype(np.int32)  # the sign fills the upper bits
    bits = signed & 0x7FFF
    bits <<= 13
    out = bits.view(np.float32)
    out *= _HALF_TO_FLOAT_SCALE
    if out.size and out.max() >= 2.0**16:
        np.bitwise_or(bits, 0x7F800000, out=bits, where=out >= 2.0**16)
    signed &= np.int32(-(1 << 31))
    bits |= signed
    return out


def _sorted_parts(region: Region, where: str) -> list[Part]:
    """The region's parts by offset; overlapping parts mean a corrupt manifest."""
    parts = sorted(region.parts, key=lambda p: p.offset)
    for a, b in zip(parts, parts[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise FlashFormatError(f"{where}: parts {a.name!r} and {b.name!r} overlap")
    return parts


class StoreReader:
    """Reads neuron records of a flash store into neuron buffers (see the module docstring).

    Usable from several threads at once; ``close()`` must not race with reads in flight.
    """

    def __init__(
        self,
        directory: str | Path,
        manifest: Manifest,
        threads: int = 32,
        page_cache: bool = True,
        *,
        bypass: str = "auto",
        max_run_bytes: int = 1 << 20,
        gap_bytes: int = 0,
        read_path: str = "preadv",
    ) -> None:
        """``bypass`` picks how ``page_cache=False`` is done: "auto", "nocache", "dontcache" or
        "direct"; ``read_path`` how runs are read: "preadv" or "mmap" (needs the page cache)."""
        if read_path not in READ_PATHS:
            raise ValueError(
                f"read_path must be one of {', '.join(READ_PATHS)} (got {read_path!r})"
            )
        if read_path == "mmap" and not page_cache:
            raise ValueError("read_path 'mmap' reads through the page cache: needs page_cache=True")
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be in 1..{MAX_THREADS} (got {threads})")
        if max_run_bytes < 1:
            raise ValueError("max_run_bytes must be positive")
        self._file: UncachedFile | None = None
        self._mm: mmap.mmap | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.manifest = manifest
        self.threads = threads
        self.read_path = read_path
        self.max_run_bytes = max_run_bytes
        self.gap_bytes = gap_bytes  # gaps up to this size are read through (cheaper than a read)
        self.totals = ReadCount()  # every read_neurons call so far (see reset_totals)
        self._totals_lock = threading.Lock()
        self.path = check_store_file(directory, manifest)
        self._parts = {
            id(r): _sorted_parts(r, f"{self.path} layer {e.index}")
            for e in manifest.layers
            for r in e.regions
        }
        strides = [r.record_stride for e in manifest.layers for r in e.regions]
        self._staging_size = _round_up(
            max(max_run_bytes, *strides, 1) + 2 * DIRECT_ALIGN, mmap.PAGESIZE
        )
        self._local = threading.local()
        self._advised: dict[int, list[tuple[int, int]]] = {}  # layer -> byte ranges (advise)
        try:
            self._open(page_cache, bypass)
        except BaseException:
            self.close()
            raise

    # -- opening and closing -----------------------------------------------------------------------

    def _open(self, page_cache: bool, bypass: str) -> None:
        self._file = UncachedFile(self.path, page_cache, bypass)
        self.cache_mode = self._file.mode
        # reads served by the kernel's page cache (kept, or dropped after each call: dontcache) are
        # advised first: the kernel queues a call's short runs all at once
        self.advises = (
            self.read_path == "preadv"
            and self.cache_mode in ("cached", "dontcache")
            and hasattr(os, "posix_fadvise")
        )
        if self.advises:
            # the kernel queues every advised run of a call at once, so one more short read costs
            # little more than its bytes: reading a gap through only adds bytes (README, The I/O
            # engine)
            self.gap_bytes = 0
        if self.manifest.store_size:
            self._mm = mmap.mmap(self._file.fd, 0, access=mmap.ACCESS_READ)
            if self.read_path == "mmap":
                self._mm.madvise(mmap.MADV_RANDOM)
        if self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mlx_flash-store")

    def close(self, *, join: bool = True) -> None:
        """Join the threads and close the files; safe to call twice (``join=False``: let idle
        threads exit)."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=join)
        if self._mm is not None:
            self._mm.close()
        if self._file is not None:
            self._file.close()

    def __del__(self) -> None:
        # A reader dropped without close() (its model garbage-collected) must not keep its
        # descriptors and threads. No read can be in flight: a read in progress holds a reference
        # to the reader.
        if not getattr(self, "_closed", True):
            self.close(join=False)

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public reads ------------------------------------------------------------------------------

    def read_neurons(
        self,
        layer: int,
        ids: Sequence[int] | np.ndarray,
        dest: Mapping[str, np.ndarray],
        rows: Sequence[int] | np.ndarray,
    ) -> ReadCount:
        """Read neurons ``ids`` of ``layer`` so that ``dest[p][rows[j]]`` gets part p of neuron
        ``ids[j]``."""
        t0 = time.perf_counter()
        done = ReadCount()
        try:
            done = self._read_neurons(
                layer, np.asarray(ids, dtype=np.int64), dest, np.asarray(rows, dtype=np.int64)
            )
        finally:
            seconds = time.perf_counter() - t0
            done = ReadCount(np.size(ids), done.bytes, done.reads, seconds, 1)
            with self._totals_lock:
                self.totals += done
        return done

    def advise(self, layer: int, ids: Sequence[int] | np.ndarray) -> int:
        """Ask the kernel to start reading the records of neurons ``ids`` of ``layer`` (every
        part), for a read of that layer soon; returns the bytes advised (0 where the reader does not
        advise). With the page cache bypassed they stay in it until that read, at most one layer's
        worth; else for as long as the kernel keeps them."""
        mapped = self.read_path == "mmap"
        if not (self.advises or mapped) or np.size(ids) == 0:
            return 0
        entry = self._layer(layer)
        sids = np.unique(np.asarray(ids, dtype=np.int64))
        ranges = []
        for region in entry.regions:
            stride = region.record_stride
            cap = max(1, self.max_run_bytes // stride)
            for a, b in plan_runs(sids, cap, self.gap_bytes // stride):
                start = region.offset + int(sids[a]) * stride
                ranges.append((start, (int(sids[b - 1] - sids[a]) + 1) * stride))
        if mapped:
            self._madvise(ranges, mmap.MADV_WILLNEED)
        else:
            self._fadvise(ranges, os.POSIX_FADV_WILLNEED)
            if self.drops_advised:
                self._advised.setdefault(layer, []).extend(ranges)
        return sum(n for _, n in ranges)

    @property
    def drops_advised(self) -> bool:
        """Whether what the reader advised leaves the page cache again after its read (the page
        cache bypassed)."""
        return self.advises and self.cache_mode == "dontcache"

    def reset_totals(self) -> ReadCount:
        """The totals so far; counting starts again from zero."""
        with self._totals_lock:
            totals, self.totals = self.totals, ReadCount()
        return totals

    def read_layer(
        self, layer: int, parts: Sequence[str] | None = None, floats: type | None = np.float32
    ) -> dict[str, np.ndarray]:
        """Every record of ``layer``: each part (default all) as a [records, length] array; float
        parts converted to ``floats`` (None: raw store values), packed quantized words as stored."""
        entry = self._layer(layer)

        def dtype(p: Part) -> np.dtype:
            raw = numpy_storage_dtype(p.dtype)
            return raw if floats is None or p.dtype in PACKED else np.dtype(floats)

        dest = {
            p.name: np.empty((self.manifest.n_records, p.length), dtype(p))
            for p in entry.parts()
            if parts is None or p.name in parts
        }
        ids = np.arange(self.manifest.n_records)
        self.read_neurons(layer, ids, dest, ids)
        return dest

    def read_range(
        self, layer: int, start: int, stop: int, dest: Mapping[str, np.ndarray], row0: int = 0
    ) -> ReadCount:
        """Read neurons [start, stop) into rows [row0, row0 + stop - start): coalescing makes it
        sequential."""
        return self.read_neurons(
            layer, np.arange(start, stop), dest, np.arange(row0, row0 + stop - start)
        )

    def read_blob(self, layer: int, name: str, dtype: np.dtype | type | None = None) -> np.ndarray:
        """A per-layer blob (e.g. the down bias) as a copy; raw store dtype unless ``dtype`` is
        given."""
        entry = self._layer(layer)
        if name not in entry.blobs:
            raise KeyError(
                f"{self.path}: layer {layer} has no blob {name!r} (has {sorted(entry.blobs)})"
            )
        blob = entry.blobs[name]
        raw = np.frombuffer(
            self._mm or b"", numpy_storage_dtype(blob.dtype), blob.length, blob.offset
        ).copy()
        if dtype is None:
            return raw
        out = np.empty(blob.length, dtype)
        _convert_into(out, slice(None), raw, blob.dtype)
        return out

    def layer_digest(self, layer: int) -> str:
        """Hex digest (manifest.checksum_algorithm) of the layer's bytes, streamed with this
        reader's cache mode."""
        entry = self._layer(layer)
        h = hashlib.new(self.manifest.checksum_algorithm)
        chunk = self.max_run_bytes
        for offset in range(entry.offset, entry.offset + entry.nbytes, chunk):
            n = min(chunk, entry.offset + entry.nbytes - offset)
            buf, pos, _ = self._read_staged(layer, offset, n)
            h.update(memoryview(buf)[pos : pos + n])
        return h.hexdigest()

    # -- planning ----------------------------------------------------------------------------------

    def _layer(self, layer: int) -> LayerEntry:
        if self._closed:
            raise StoreReadError(f"{self.path}: reader is closed")
        if not 0 <= layer < self.manifest.n_layers:
            raise IndexError(
                f"{self.path}: layer {layer} out of range (store has {self.manifest.n_layers})"
            )
        return self.manifest.layers[layer]

    def _read_neurons(
        self, layer: int, ids: np.ndarray, dest: Mapping[str, np.ndarray], rows: np.ndarray
    ) -> ReadCount:
        entry = self._layer(layer)
        unknown = set(dest) - set(entry.part_names())
        if unknown:
            raise ValueError(f"dest names parts layer {layer} does not have: {sorted(unknown)}")
        if ids.size == 0:
            return ReadCount()
        sids, srows = _sorted_request(ids, rows, self.manifest.n_records)
        row_range = int(srows.min()), int(srows.max())
        plans = [p for r in entry.regions if (p := self._plan(r, dest, row_range)) is not None]
        runs = [self._runs(plan, sids) for plan in plans]
        buffered = [  # byte ranges read without O_DIRECT
            pair
            for r in runs
            for pair in zip(r.offsets[~r.direct].tolist(), r.sizes[~r.direct].tolist(), strict=True)
        ]
        # the kernel reads every advised run at once: one thread copies short ones as they land,
        # with no worker to wake (on few cores, wake-ups cost more than the copies); long runs
        # (whole layers) copy faster on the pool
        inline = self.advises and not any((r.sizes >= DIRECT_MIN_BYTES).any() for r in runs)
        jobs = [
            job
            for plan, r in zip(plans, runs, strict=True)
            for job in self._jobs(layer, plan, r, sids, srows, dest, inline)
        ]
        if self.read_path == "mmap":
            self._madvise(buffered, mmap.MADV_WILLNEED)
        if not self.advises:
            return self._execute(jobs, inline)
        if len(buffered) > 1:
            self._fadvise(buffered, os.POSIX_FADV_WILLNEED)
        try:
            return self._execute(jobs, inline)
        finally:
            if self.drops_advised:
                self._drop(buffered + self._advised.pop(layer, []))

    def _fadvise(self, ranges: list[tuple[int, int]], advice: int) -> None:
        """Advice on whole pages around each range (the kernel drops only the pages a
        ``DONTNEED`` range covers entirely)."""
        page = mmap.PAGESIZE
        for offset, nbytes in ranges:
            start = offset - offset % page
            os.posix_fadvise(self._file.fd, start, _round_up(offset + nbytes, page) - start, advice)

    def _drop(self, ranges: list[tuple[int, int]]) -> None:
        """``DONTNEED`` over the span of the ranges in one call: the span lies in one layer, whose
        pages in the page cache are only those this call read and the look-ahead advised."""
        if ranges:
            start = min(offset for offset, _ in ranges)
            end = max(offset + nbytes for offset, nbytes in ranges)
            self._fadvise([(start, end - start)], os.POSIX_FADV_DONTNEED)

    def _madvise(self, ranges: list[tuple[int, int]], advice: int) -> None:
        """Advice on the mapping's whole pages around each range (madvise wants a page-aligned
        start)."""
        page = mmap.PAGESIZE
        for offset, nbytes in ranges:
            start = offset - offset % page
            self._mm.madvise(advice, start, offset + nbytes - start)

    def _plan(
        self, region: Region, dest: Mapping[str, np.ndarray], row_range: tuple[int, int]
    ) -> _RegionPlan | None:
        """Plan reads of one region, or None when no part of it is wanted (then it is not read)."""
        parts = self._parts[id(region)]
        wanted = tuple(p for p in parts if p.name in dest)
        if not wanted:
            return None
        for p in wanted:
            _check_dest(p, dest[p.name], row_range)
        lead, tail = wanted[0].offset, wanted[-1].offset + wanted[-1].nbytes
        stride = region.record_stride
        cap = max(1, self.max_run_bytes // stride)
        return _RegionPlan(region, wanted, lead, tail, cap, self.gap_bytes // stride)

    def _runs(self, plan: _RegionPlan, sids: np.ndarray) -> _Runs:
        """Cut the sorted ids into runs and place each in the file."""
        starts, ends = _run_bounds(sids, plan.max_records, plan.max_gap)
        spans = sids[ends - 1] - sids[starts] + 1
        offsets = plan.region.offset + sids[starts] * plan.region.record_stride + plan.lead
        sizes = plan.span(spans)
        return _Runs(starts, ends, spans, offsets, sizes, self._file.direct_for(sizes))

    def _jobs(
        self,
        layer: int,
        plan: _RegionPlan,
        runs: _Runs,
        sids: np.ndarray,
        srows: np.ndarray,
        dest: Mapping[str, np.ndarray],
        inline: bool,
    ) -> list[Callable[[], ReadCount]]:
        """One job per batch of runs (``_batches``): runs read from the file without O_DIRECT
        are batched up to the staging buffer's size (on the pool, into about one batch per
        thread); O_DIRECT and mapped runs are read alone."""
        stride = plan.region.record_stride
        spans = runs.spans.tolist()
        limit = self._staging_size // stride
        if not inline:
            limit = min(limit, -(-sum(spans) // self.threads))
        batched = (~runs.direct).tolist() if self.read_path == "preadv" else [False] * len(spans)
        # records within a batch follow one another: each wanted id's position among them
        first_row = np.cumsum(runs.spans) - runs.spans
        at = np.repeat(first_row - sids[runs.starts], runs.ends - runs.starts) + sids
        offsets, starts, ends = runs.offsets.tolist(), runs.starts.tolist(), runs.ends.tolist()
        first_row = first_row.tolist()
        jobs: list[Callable[[], ReadCount]] = []
        for i, j in _batches(spans, batched, limit):
            a, b = starts[i], ends[j - 1]
            batch = list(zip(offsets[i:j], spans[i:j], strict=True))
            jobs.append(
                partial(
                    self._staged_runs, layer, plan, batch, srows[a:b], at[a:b] - first_row[i], dest
                )
            )
        return jobs

    # -- execution ---------------------------------------------------------------------------------

    def _execute(self, jobs: list[Callable[[], ReadCount]], inline: bool) -> ReadCount:
        """Run the jobs inline (asked for, one thread or one job) or on the pool; returns once all
        are done."""
        if inline or self._pool is None or len(jobs) == 1:
            # nothing else writes into dest: no hand-out, no locks
            return sum((job() for job in jobs), ReadCount())
        call = _Call(jobs)
        futures = []
        try:
            for _ in range(min(self.threads, len(jobs))):
                futures.append(self._pool.submit(self._drain, call))
            wait(futures)  # no worker may still write into dest when we return or raise
        # Ctrl-C (KeyboardInterrupt) here, even inside submit (its work item is queued)
        except BaseException:
            # no run starts any more, and none in progress writes into dest after we raise
            call.stop()
            raise
        return sum((f.result() for f in futures), ReadCount())

    def _drain(self, call: _Call) -> ReadCount:
        """Worker loop: take jobs from the call until none is left or the call was stopped (a job
        failed)."""
        done = ReadCount()
        while (job := call.take()) is not None:
            try:
                done += job()
            except BaseException:
                call.failed = True
                raise
            finally:
                call.finished()
        return done

    def _staged_runs(
        self,
        layer: int,
        plan: _RegionPlan,
        runs: list[tuple[int, int]],
        rows: np.ndarray,
        at: np.ndarray,
        dest: Mapping[str, np.ndarray],
    ) -> ReadCount:
        """Read runs ((file offset, records) each) one after another into the staging buffer,
        then convert each wanted part into its rows; ``at``: the wanted records' positions among
        the runs' records (the others fill gaps)."""
        stride = plan.region.record_stride
        if len(runs) == 1:
            offset, n = runs[0]
            buf, pos, nbytes = self._read_staged(layer, offset, plan.span(n))
        else:
            buf, pos, nbytes, n = self._staging(), 0, 0, 0
            view = memoryview(buf)
            for offset, records in runs:
                size = plan.span(records)
                start = n * stride
                nbytes += self._buffered_read(layer, [view[start : start + size]], offset, size)
                n += records
        for p in plan.wanted:
            dt = numpy_storage_dtype(p.dtype)
            src = np.ndarray(
                (n, p.length),
                dt,
                buffer=buf,
                offset=pos + p.offset - plan.lead,
                strides=(stride, dt.itemsize),
            )
            _convert_into(dest[p.name], rows, src if n == len(at) else src[at], p.dtype)
        return ReadCount(bytes=nbytes, reads=len(runs))

    def _read_staged(
        self, layer: int, offset: int, nbytes: int
    ) -> tuple[mmap.mmap | np.ndarray, int, int]:
        """Read [offset, offset+nbytes) into this thread's staging buffer: (buffer, data
        position, bytes read). mmap: the mapping's bytes stand where the buffer's would."""
        if self.read_path == "mmap":
            return np.frombuffer(self._mm, np.uint8, nbytes, offset), 0, nbytes
        staging = self._staging()
        if not self._file.direct_for(nbytes):
            return (
                staging,
                0,
                self._buffered_read(layer, [memoryview(staging)[:nbytes]], offset, nbytes),
            )
        start = offset - offset % DIRECT_ALIGN
        length = _round_up(offset + nbytes, DIRECT_ALIGN) - start
        # O_DIRECT stops at end of file
        expect = min(start + length, self.manifest.store_size) - start
        bufs = [memoryview(staging)[:length]]
        return (
            staging,
            offset - start,
            self._read(layer, self._file.direct_fd, 0, bufs, start, expect),
        )

    def _buffered_read(self, layer: int, bufs: list, offset: int, expect: int) -> int:
        """A read with no alignment rules (the page cache bypassed by flag where it is)."""
        return self._read(layer, self._file.fd, self._file.flags, bufs, offset, expect)

    def _read(self, layer: int, fd: int, flags: int, bufs: list, offset: int, expect: int) -> int:
        """One preadv of ``expect`` bytes; an OSError or a short read becomes StoreReadError
        naming file, layer, offset."""
        try:
            got = self._preadv(fd, bufs, offset, flags)
        except OSError as e:
            raise StoreReadError(
                f"{self.path}: reading layer {layer} at offset {offset} ({expect} bytes) failed: "
                f"{e.strerror or e}"
            ) from e
        if got != expect:
            raise StoreReadError(
                f"{self.path}: short read in layer {layer} at offset {offset}: "
                f"got {got} of {expect} bytes"
            )
        return got

    def _preadv(self, fd: int, bufs: list, offset: int, flags: int) -> int:
        """The only place that touches the disk; tests replace it to inject faults."""
        return os.preadv(fd, bufs, offset, flags)

    def _staging(self) -> mmap.mmap:
        """Per-thread staging buffer; anonymous mmap memory is page aligned, as O_DIRECT needs."""
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = mmap.mmap(-1, self._staging_size)
        return staging


class _Call:
    """The jobs of one read_neurons call, handed out to its workers; counts the jobs running."""

    def __init__(self, jobs: list[Callable[[], int]]) -> None:
        self._pending: Iterator[Callable[[], int]] = iter(jobs)
        self._lock = threading.Lock()
        self.failed = False
        self.running = 0

    def take(self) -> Callable[[], int] | None:
        with self._lock:
            job = None if self.failed else next(self._pending, None)
            self.running += job is not None
            return job

    def finished(self) -> None:
        with self._lock:
            self.running -= 1

    def stop(self) -> None:
        """No job starts after this returns, and none is running (waits through further
        KeyboardInterrupts: each job is one bounded preadv)."""
        while True:
            try:
                with self._lock:
                    self.failed = True
                while self.running:
                    time.sleep(0.0005)
                return
            except KeyboardInterrupt:
                continue


def _check_dest(part: Part, arr: np.ndarray, row_range: tuple[int, int]) -> None:
    """Reject destinations that would silently receive the wrong shape or rows."""
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.shape[1] != part.length:
        shape = getattr(arr, "shape", None)
        raise ValueError(
            f"dest[{part.name!r}] must be a 2-D array [capacity, {part.length}] (got shape {shape})"
        )
    if not arr.flags.writeable:
        raise ValueError(f"dest[{part.name!r}] is read-only")
    lo, hi = row_range
    if lo < 0 or hi >= arr.shape[0]:
        raise ValueError(
            f"rows must be in [0, {arr.shape[0]}) for dest[{part.name!r}] (got {lo}..{hi})"
        )
