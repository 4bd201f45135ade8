"""What a decode step is expected to read and compute under a memory plan: the forecast's model of
the runtime.

Why: ``mlx_flash.forecast`` says how fast a model will run before it is converted. It takes the
plan from ``budget.plan_memory`` (what the loader plans), the disk's cost model (the probe) and the
compute micro-benchmark (``compute_probe``), and follows what ``FlashFFN`` does per token:

- dense: pinned rows stay; the rest streams through the window buffer in chunks of its capacity
  (``FlashFFN._stream``), one chunk staying between tokens — alternately the short last chunk and a
  full one, since resident chunks go first; each chunk is contiguous, read in pieces of the cost
  model's run size. Every row is computed.
- sparse selectors: a neuron is selected with its calibration frequency (scaled to the asked
  sparsity), independently of other neurons and tokens; the hottest are pinned; a selected neuron
  is read unless the last ``window`` tokens selected it, and at least what the window buffer cannot
  hold is read. Reads coalesce neighbours and gaps shorter than the cost model's gap; gap bytes
  count as read. Resident rows are computed (``compute_rows`` "resident"), else the selected.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .budget import BudgetPlan, ModelFacts
from .costmodel import CostModel


@dataclass(frozen=True)
class Costs:
    """The compute micro-benchmark's constants (``compute_probe.ComputeCosts``' fields)."""

    bytes_per_s: float
    step_s: float
    layer_s: float
    flash_layer_s: float
    chunk_s: float


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
class Layout:
    """How a neuron sits in the store and in the buffers."""

    record_read: int  # bytes read per neuron (the parts the selector needs)
    record_stride: int  # bytes between neighbouring neurons in the store
    row_bytes: int  # one neuron's rows in the buffers (compute dtype)
    threads: int  # the reader's threads
    trunk_gemv: int  # trunk bytes a step multiplies (all but an untied input embedding)


def dense_cost(
    plan: BudgetPlan, facts: ModelFacts, layout: Layout, disk: CostModel, costs: Costs
) -> TokenCost:
    """Every neuron of every layer, pinned rows resident, the rest streamed (module docstring)."""
    needed, cap = plan.d_ffn - plan.pinned_rows, plan.window_rows
    run = disk.run_bytes(layout.threads)
    if needed <= cap:  # the buffer holds the whole remainder: nothing read once warm
        loaded = reads = 0.0
        chunks = 1
    else:
        chunks = math.ceil(needed / cap)
        last = needed - cap * (chunks - 1)
        loaded = needed - (last + cap) / 2
        per_chunk = [math.ceil(n * layout.record_stride / run) for n in [cap] * (chunks - 1)]
        per_chunk.append(math.ceil(last * layout.record_stride / run))
        reads = sum(per_chunk) - (per_chunk[-1] + per_chunk[0]) / 2
    return _token_cost(
        facts, layout, disk, costs, loaded, reads, loaded * layout.record_read, plan.d_ffn, chunks,
        0,
    )  # fmt: skip


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
    gap = disk.gap_bytes(layout.threads) // layout.record_stride
    loaded = reads = read_bytes = rows = 0.0
    for f in frequency:
        f = np.sort(np.clip(f, 0.0, 1.0))[::-1]
        rest = f[plan.pinned_rows :]
        union = float(np.sum(1.0 - (1.0 - rest) ** (window + 1)))
        new = max(
            float(np.sum(rest * (1.0 - rest) ** window)), float(rest.sum()) - plan.window_rows
        )
        share = new / plan.d_ffn
        distances = np.arange(1, gap + 2)
        merged = share * (1.0 - share) ** (distances - 1)  # the previous read neuron is d back
        loaded += new
        reads += new * (1.0 - merged.sum())
        read_bytes += new * (
            layout.record_read + layout.record_stride * float(np.sum((distances - 1) * merged))
        )
        resident = plan.pinned_rows + min(plan.window_rows, union)
        rows += resident if compute_rows == "resident" else float(f.sum())
    return _token_cost(facts, layout, disk, costs, loaded, reads, read_bytes, rows, 1,
                       selector_bytes, per_layer_rows=False)  # fmt: skip


def _token_cost(
    facts: ModelFacts,
    layout: Layout,
    disk: CostModel,
    costs: Costs,
    loaded: float,
    reads: float,
    read_bytes: float,
    rows: float,
    chunks: int,
    selector_bytes: int,
    per_layer_rows: bool = True,
) -> TokenCost:
    """Per-layer figures (``rows``: per layer, or summed over layers) to a token's cost."""
    n = facts.n_layers
    if per_layer_rows:
        loaded, reads, read_bytes, rows = loaded * n, reads * n, read_bytes * n, rows * n
    weights = layout.trunk_gemv + rows * layout.row_bytes + selector_bytes
    compute = (
        costs.step_s
        + n * (costs.layer_s + costs.flash_layer_s + chunks * costs.chunk_s)
        + weights / costs.bytes_per_s
    )
    io = disk.read_seconds(read_bytes, reads, layout.threads)
    return TokenCost(loaded, read_bytes, reads, io, compute, rows)
