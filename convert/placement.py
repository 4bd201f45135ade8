"""Co-activation placement: store neurons that are often needed together next to each other.

Why: a token's misses are read one run of adjacent records at a time, and on flash a short read
costs nearly as much as a long one (README, The I/O engine). Ordering each layer's neurons so that
neurons active on the same tokens sit side by side turns scattered misses into fewer, longer runs.
An FFN's neurons can be permuted freely (a neuron's gate and up rows and down column move
together), so calibration rewrites the store in the new order before it measures anything else;
statistics, proxy and predictors are then in that order and the runtime needs nothing.

The order is the spectral one: neurons sorted by the Fiedler vector of the co-activation graph's
normalised Laplacian. It pays only where it measures to: the window's misses of calibration tokens
the order was not fitted on are planned into reads both ways and timed by the disk's cost model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_flash.runtime.costmodel import CostModel
from mlx_flash.runtime.manifest import STORE_FILE, Manifest
from mlx_flash.runtime.store import StoreReader, plan_runs

from .relayout import write_store

PLACED_STORE_FILE = "ffn_store.placed.bin"
MIN_GAIN = 0.05  # placement is applied when it saves at least this share of modelled read time


def spectral_order(active: np.ndarray) -> np.ndarray:
    """A permutation of the neurons (columns of ``active``, [tokens, neurons] bool) that puts
    neurons active on the same tokens near each other; never-active neurons go last.

    The co-activation matrix ``C = A^T A`` is neurons x neurons, but its normalised form ``B^T B``
    (``B = A D^-1/2``) shares its non-zero eigenvalues with the tokens x tokens ``B B^T``, whose
    eigenvectors map back through ``B^T``: exact, and cheap for the few thousand tokens calibration
    uses.
    """
    a = active.astype(np.float32)
    degree = a.T @ a.sum(1)  # row sums of C
    used = degree > 0
    b = a[:, used] / np.sqrt(degree[used])
    _, vectors = np.linalg.eigh(b @ b.T)
    # the largest eigenvalue (1) belongs to sqrt(degree); the Fiedler vector is the next one
    fiedler = b.T @ vectors[:, -2]
    ids = np.flatnonzero(used)
    return np.concatenate([ids[np.argsort(fiedler, kind="stable")], np.flatnonzero(~used)])


def window_misses(active: np.ndarray, window: int) -> list[np.ndarray]:
    """Per token (rows of ``active``), the neurons it needs that none of the ``window`` tokens
    before it needed: what the runtime's window would read."""
    out = []
    for t in range(len(active)):
        held = active[max(0, t - window) : t].any(0) if t and window else np.zeros_like(active[t])
        out.append(np.flatnonzero(active[t] & ~held))
    return out


@dataclass(frozen=True)
class Reads:
    """What reading a layer's misses costs: reads, bytes (gaps read through included) and the
    cost model's seconds."""

    reads: int
    nbytes: int
    seconds: float


def read_cost(
    misses: list[np.ndarray],
    position: np.ndarray,
    cost: CostModel,
    record: int,
    threads: int,
    gap_bytes: int,
) -> Reads:
    """The reads the store reader plans (``plan_runs``: gaps of up to ``gap_bytes``, the reader's,
    are read through, runs cut at its largest read) for each token's ``misses`` with neuron i
    stored at ``position[i]``, and the cost model's time for them."""
    gap = gap_bytes // record
    cap = max(1, cost.run_bytes(threads) // record)
    reads = records = 0
    seconds = 0.0
    for ids in misses:
        if ids.size:
            placed = np.sort(position[ids])
            runs = plan_runs(placed, cap, gap)
            span = sum(int(placed[b - 1] - placed[a]) + 1 for a, b in runs)
            reads, records = reads + len(runs), records + span
            seconds += cost.read_seconds(span * record, len(runs), threads)
    return Reads(reads, records * record, seconds)


@dataclass(frozen=True)
class Placement:
    """Per layer: the order fitted on all tokens, and, on the second half of the tokens, the reads
    of the stored order beside those of the order fitted on the first half."""

    orders: list[np.ndarray]
    stored: list[Reads]
    placed: list[Reads]
    tokens: int  # tokens the reads were counted on

    def gain(self) -> float:
        """Share of modelled read time the placement saves on tokens it was not fitted on."""
        before = sum(r.seconds for r in self.stored)
        return 1.0 - sum(r.seconds for r in self.placed) / before if before else 0.0

    def summary(self) -> dict:
        """The facts the manifest keeps: the gain; reads, MB and modelled ms per token both ways."""
        out = {"gain": round(self.gain(), 4), "tokens": self.tokens}
        for name, reads in (("stored", self.stored), ("placed", self.placed)):
            out[f"{name}_reads_per_token"] = round(sum(r.reads for r in reads) / self.tokens, 1)
            out[f"{name}_mb_per_token"] = round(sum(r.nbytes for r in reads) / self.tokens / 1e6, 4)
            out[f"{name}_ms_per_token"] = round(
                1e3 * sum(r.seconds for r in reads) / self.tokens, 3
            )
        return out


def fit_layer(
    active: np.ndarray, window: int, cost: CostModel, record: int, threads: int, gap_bytes: int
) -> tuple[np.ndarray, Reads, Reads]:
    """One layer's placement from its activity on consecutive tokens: the order fitted on all of
    them, and the reads of the second half's misses stored as is and in the order fitted on the
    first half (``read_cost``)."""
    half = len(active) // 2
    misses = window_misses(active[half:], window)
    trial = np.argsort(spectral_order(active[:half]))  # neuron -> its place in the store
    identity = np.arange(active.shape[1])
    return (
        spectral_order(active),
        read_cost(misses, identity, cost, record, threads, gap_bytes),
        read_cost(misses, trial, cost, record, threads, gap_bytes),
    )


def apply_placement(
    directory: Path,
    manifest: Manifest,
    orders: list[np.ndarray],
    info: dict,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Rewrite the store with layer i's records in ``orders[i]``; returns the saved manifest.

    The new store goes to the other store file name, then the manifest that names it is saved, then
    the old store is removed: an interruption leaves a consistent directory. The manifest drops
    the calibration it had (its statistics, proxy and predictors are in the old order) until the
    calibration under way saves its own.
    """
    new_name = PLACED_STORE_FILE if manifest.store_file == STORE_FILE else STORE_FILE
    new, old = directory / new_name, directory / manifest.store_file
    mb = manifest.ffn_bytes() / 1e6
    log(f"  placing neurons by co-activation: rewriting the {mb:.0f} MB store")
    try:
        with StoreReader(directory, manifest, threads=4) as reader:
            entries = write_store(reader, manifest, new, manifest.layout, orders, progress)
    except BaseException:
        new.unlink(missing_ok=True)
        raise
    extra = {
        k: v
        for k, v in manifest.extra.items()
        if k not in ("calibration", "predictor", "proxy", "quality", "allocation")
    }
    extra["placement"] = info
    placed = dataclasses.replace(
        manifest,
        store_file=new_name,
        layers=tuple(entries),
        store_size=new.stat().st_size,
        extra=extra,
    )
    placed.save(directory)
    os.unlink(old)
    return placed
