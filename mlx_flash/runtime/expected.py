"""What a decode step is expected to read and compute under a memory plan: the forecast's model of
the runtime.

Why: ``mlx_flash.forecast`` says how fast a model will run before it is converted. It takes the
plan from ``budget.plan_memory`` (what the loader plans), the disk's cost model (the probe: run
sizes), the store reader's measured cost per call and gap rule (``reader_probe``) and the compute
micro-benchmark (``compute_probe``), and follows what ``FlashFFN`` does per token:

- dense: pinned rows stay; the rest streams through the window buffer in chunks of its capacity
  (``FlashFFN._stream``), one chunk staying between tokens — alternately the short last chunk and a
  full one, since resident chunks go first (the default split leaves two full ones:
  ``budget._pinned_rows``); each chunk is contiguous, read in pieces of the cost model's run size.
  Every row is computed.
- sparse selectors: a neuron is selected with its calibration frequency (scaled to the asked
  sparsity), independently of other neurons and tokens; the hottest are pinned; a selected neuron
  is read unless the last ``window`` tokens selected it, and at least what the window buffer cannot
  hold is read. Reads coalesce neighbours and the gaps the reader reads through (none where it
  advises its runs to the kernel); gap bytes count as read. Resident rows are computed
  (``compute_rows`` "resident"), else the selected.

Each reader call (a chunk, or a layer's selection) costs what ``reader_probe`` measured the store
reader's calls to cost on this disk: per call, per read and per byte.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .budget import BudgetPlan, ModelFacts
from .costmodel import CostModel, sparse_reads
from .manifest import Manifest


@dataclass(frozen=True)
class Costs:
    """The compute micro-benchmark's constants (``compute_probe.ComputeCosts``' fields)."""

    bytes_per_s: float
    step_s: float
    layer_s: float
    flash_layer_s: float
    chunk_s: float


# no compute: the costs of reads alone (``io_s``), as ``auto`` compares operating points
READS_ONLY = Costs(math.inf, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class TokenCost:
    """Expected per decode token (all layers)."""

    loaded: float  # neurons read
    bytes: float  # read from the store
    reads: float
    io_s: float
    compute_s: float
    computed_rows: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / (self.io_s + self.compute_s)

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


@dataclass(frozen=True)
class ReaderCost:
    """A store-reader call costs ``call_s + reads * read_s + bytes / bytes_per_s`` at ``threads``
    (measured by ``mlx_flash.reader_probe``); it reads gaps of up to ``gap_bytes`` through."""

    call_s: float
    read_s: float
    bytes_per_s: float
    threads: int
    gap_bytes: int

    @classmethod
    def of_disk(
        cls, disk: CostModel, threads: int, gap_bytes: int, uncached: bool = False
    ) -> ReaderCost:
        """What the disk's probe says a read costs at ``threads``, no per-call cost: the reader's
        own per-read cost and bandwidth where the probe timed the reader as it will run (page
        cache bypassed, at that thread count), else the disk's fit at the nearest measured
        count."""
        if uncached and disk.reader_read_s is not None and threads == disk.batch_threads:
            return cls(0.0, disk.reader_read_s, disk.reader_bytes_per_s, threads, gap_bytes)
        i = disk.nearest(threads)
        return cls(0.0, disk.per_read_s[i], disk.bandwidth[i], threads, gap_bytes)

    def seconds(self, nbytes: float, reads: float) -> float:
        """Expected time of one call reading ``nbytes`` in ``reads`` reads."""
        if reads <= 0:
            return 0.0
        return self.call_s + reads * self.read_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class Layout:
    """How a neuron sits in the store and in the buffers."""

    record_read: int  # bytes read per neuron (the parts the selector needs)
    record_stride: int  # bytes between neighbouring neurons in the store
    row_bytes: int  # one neuron's rows in the buffers (compute dtype)
    threads: int  # the reader's threads
    trunk_gemv: int  # trunk bytes a step multiplies (all but an untied input embedding)
    reader: ReaderCost  # what a store-reader call costs on this disk (reader_probe)

    @classmethod
    def of_store(
        cls,
        manifest: Manifest,
        skip: tuple[str, ...],
        row_bytes: int,
        trunk_gemv: int,
        reader: ReaderCost,
    ) -> Layout:
        """A store's records (without the parts in ``skip``) and buffer rows of ``row_bytes``."""
        region = manifest.layers[0].regions
        return cls(
            record_read=sum(p.nbytes for r in region for p in r.parts if p.name not in skip),
            record_stride=sum(r.record_stride for r in region),
            row_bytes=row_bytes,
            threads=reader.threads,
            trunk_gemv=trunk_gemv,
            reader=reader,
        )


def dense_cost(
    plan: BudgetPlan, facts: ModelFacts, layout: Layout, disk: CostModel, costs: Costs
) -> TokenCost:
    """Every neuron of every layer, pinned rows resident, the rest streamed (module docstring)."""
    needed, cap = plan.d_ffn - plan.pinned_rows, plan.window_rows
    if needed <= cap:  # the buffer holds the whole remainder: nothing read once warm
        return _token_cost(facts, layout, costs, [], plan.d_ffn * facts.n_layers, 1, 0)
    chunks = math.ceil(needed / cap)
    last = needed - cap * (chunks - 1)
    run = disk.run_bytes(layout.threads)
    full, short = (_call(n, layout, run) for n in (cap, last))
    # one chunk stays between tokens: alternately the short last one and a full one
    calls = [full] * (chunks - 2) + [_mean(full, short)]
    per_token = [c for c in calls for _ in range(facts.n_layers)]
    return _token_cost(facts, layout, costs, per_token, plan.d_ffn * facts.n_layers, chunks, 0)


def _call(records: float, layout: Layout, run: int) -> Read:
    """One reader call for a contiguous run of ``records`` neurons, read in pieces of ``run``."""
    nbytes = records * layout.record_read
    reads = math.ceil(records * layout.record_stride / run)
    return Read(records, nbytes, reads, layout.reader.seconds(nbytes, reads))


def sparse_cost(
    plan: BudgetPlan,
    facts: ModelFacts,
    layout: Layout,
    disk: CostModel,
    costs: Costs,
    frequency: np.ndarray,
    window: int,
    compute_rows: str,
    selector_bytes: int,
) -> TokenCost:
    """A selector choosing each neuron with ``frequency`` [layers, d_ffn] (module docstring)."""
    gap = layout.reader.gap_bytes // layout.record_stride
    calls, rows = [], 0.0
    for f in frequency:
        f = np.sort(np.clip(f, 0.0, 1.0))[::-1]
        rest = f[plan.pinned_rows :]
        depth = _window_depth(rest, window, plan.window_rows)
        new = float(np.sum(rest * (1.0 - rest) ** depth))
        records, reads = (plan.d_ffn * x for x in sparse_reads(new / plan.d_ffn, gap))
        reads = max(reads, min(1.0, new))  # a call with records to read reads at least once
        nbytes = new * layout.record_read + (records - new) * layout.record_stride
        calls.append(Read(new, nbytes, reads, layout.reader.seconds(nbytes, reads)))
        union = float(np.sum(1.0 - (1.0 - rest) ** (depth + 1)))
        resident = plan.pinned_rows + min(plan.window_rows, union)
        rows += resident if compute_rows == "resident" else float(f.sum())
    return _token_cost(facts, layout, costs, calls, rows, 1, selector_bytes)


def _window_depth(frequency: np.ndarray, window: int, capacity: int) -> int:
    """Tokens back the buffer keeps: ``window``, or fewer when their selections (with the current
    token's) outgrow its rows; 0 when even one token's do (everything is read)."""
    for depth in range(window, 0, -1):
        if np.sum(1.0 - (1.0 - frequency) ** (depth + 1)) <= capacity:
            return depth
    return 0


@dataclass(frozen=True)
class Read:
    """One reader call: neurons, bytes, reads and seconds."""

    records: float
    nbytes: float
    reads: float
    seconds: float


def _mean(a: Read, b: Read) -> Read:
    return Read(*((x + y) / 2 for x, y in zip(asdict(a).values(), asdict(b).values(), strict=True)))


def _token_cost(
    facts: ModelFacts,
    layout: Layout,
    costs: Costs,
    calls: list[Read],
    rows: float,
    chunks: int,
    selector_bytes: int,
) -> TokenCost:
    """A token's reader calls, computed rows (all layers) and streamed chunks per layer."""
    n = facts.n_layers
    weights = layout.trunk_gemv + rows * layout.row_bytes + selector_bytes
    compute = (
        costs.step_s
        + n * (costs.layer_s + costs.flash_layer_s + chunks * costs.chunk_s)
        + weights / costs.bytes_per_s
    )
    return TokenCost(
        loaded=sum(c.records for c in calls),
        bytes=sum(c.nbytes for c in calls),
        reads=sum(c.reads for c in calls),
        io_s=sum(c.seconds for c in calls),
        compute_s=compute,
        computed_rows=rows,
    )
