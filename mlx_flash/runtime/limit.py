"""The physical limit of a configuration's reads, defined once for every bench.

Why: "how close to what the disk allows" needs one definition, or benches disagree. The limit of a
read call is the disk's cost model (``costmodel``: ``a_t + s / b_t`` per read of s bytes, at the
reader's thread count t) applied to the records the call needs, before any merging: each run of
adjacent needed records is one read (cut into pieces of the reader's largest run, as the reader
would issue it), gaps are never read through, and only the record parts the buffers hold count.
What the reader measures above it is its own cost: planning, thread wake-ups, copies, and gap bytes
it chose to read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .costmodel import CostModel
from .manifest import Region
from .store import ReadCount

# how the benches' tables name it
LIMIT = (
    "limit = the probe's cost model for the records the run needed, each run of adjacent ones "
    "one read, at the reader's thread count (mlx_flash/runtime/limit.py)"
)


def run_lengths(ids: np.ndarray) -> np.ndarray:
    """Lengths of the runs of adjacent ids in ``ids`` (sorted, distinct)."""
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(np.diff(ids) != 1)
    return np.diff(np.concatenate(([0], ends + 1, [ids.size])))


def needed_reads(ids: np.ndarray, max_records: int) -> int:
    """Reads that fetch exactly records ``ids`` (sorted, distinct): one per run of adjacent
    ids, runs cut every ``max_records`` records."""
    return int(np.sum(-(-run_lengths(ids) // max(1, max_records))))


def limit_seconds(
    cost: CostModel,
    regions: tuple[Region, ...],
    wanted: Mapping[str, object] | None,
    ids: np.ndarray,
    threads: int,
    run_bytes: int,
) -> float:
    """The cost model's time for reading records ``ids`` of a layer stored in ``regions`` with
    ``threads`` threads: per region holding a ``wanted`` part (None: all), only those parts'
    bytes, in ``needed_reads``."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    seconds = 0.0
    for region in regions:
        record = sum(p.nbytes for p in region.parts if wanted is None or p.name in wanted)
        if record:
            reads = needed_reads(ids, run_bytes // record)
            seconds += cost.read_seconds(ids.size * record, reads, threads)
    return seconds


def metered_loader(runtime, layer: int) -> Callable:
    """``runtime.reader.read_neurons`` for ``layer``, adding each call's limit to
    ``runtime.telemetry`` (the buffers' loader)."""
    reader, regions = runtime.reader, runtime.manifest.layers[layer].regions

    def load(ids: np.ndarray, dest: Mapping[str, np.ndarray], rows: np.ndarray) -> ReadCount:
        read = reader.read_neurons(layer, ids, dest, rows)
        runtime.telemetry.add_limit(
            limit_seconds(runtime.cost, regions, dest, ids, reader.threads, reader.max_run_bytes)
        )
        return read

    return load
