"""Split a memory budget between the trunk, the KV cache, temporaries and the neuron buffers.

The budget bounds the bytes MLX holds for the model (not the Python process). Everything the model
needs besides the FFN is fixed; what is left becomes per-layer neuron rows, split into pinned rows
(resident for the whole run) and the sliding-window buffer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import BudgetError
from .sizes import format_size, parse_size

MIN_WINDOW_ROWS = 16  # below this, streaming chunks get too small to read efficiently


@dataclass(frozen=True)
class BudgetPlan:
    total: int
    trunk: int
    kv_cache: int
    temporaries: int
    selector: int  # predictors / gate matrices kept in DRAM
    neuron_bytes: int  # one neuron's rows in the buffers (compute dtype), per layer
    n_layers: int
    d_ffn: int
    pinned_rows: int  # per layer
    window_rows: int  # per layer

    @property
    def buffers(self) -> int:
        return (self.pinned_rows + self.window_rows) * self.neuron_bytes * self.n_layers

    @property
    def used(self) -> int:
        return self.trunk + self.kv_cache + self.temporaries + self.selector + self.buffers

    @property
    def ffn_share(self) -> float:
        """Share of each layer's FFN rows that the buffers hold."""
        return (self.pinned_rows + self.window_rows) / self.d_ffn

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "buffers": self.buffers,
            "used": self.used,
            "ffn_share": self.ffn_share,
        }

    def describe(self) -> str:
        return (
            f"budget {format_size(self.total)}: trunk {format_size(self.trunk)}, KV cache {format_size(self.kv_cache)}, "
            f"buffers {format_size(self.buffers)} ({self.pinned_rows} pinned + {self.window_rows} window rows of "
            f"{self.d_ffn} per layer, {100 * self.ffn_share:.0f}% of the FFN), selector {format_size(self.selector)}, "
            f"temporaries {format_size(self.temporaries)}"
        )


def plan_budget(
    budget: str | int,
    *,
    trunk: int,
    kv_cache: int,
    temporaries: int,
    selector: int,
    neuron_bytes: int,
    n_layers: int,
    d_ffn: int,
    pin_share: float,
    ffn_share: float | None = None,
) -> BudgetPlan:
    """Rows per layer that ``budget`` allows; refuses, with the bytes needed, a budget below the minimum.

    ``ffn_share`` (benchmarks) fixes the buffers' share of each layer's FFN instead of filling the budget.
    """
    total = parse_size(budget)
    fixed = trunk + kv_cache + temporaries + selector
    min_rows = min(d_ffn, MIN_WINDOW_ROWS)
    needed = fixed + min_rows * neuron_bytes * n_layers
    if total < needed:
        raise BudgetError(
            f"memory budget {format_size(total)} is too small: this model needs at least {format_size(needed)} "
            f"(trunk {format_size(trunk)}, KV cache {format_size(kv_cache)}, selector {format_size(selector)}, "
            f"temporaries {format_size(temporaries)}, minimal neuron buffers {format_size(min_rows * neuron_bytes * n_layers)})"
        )
    rows = (total - fixed) // (neuron_bytes * n_layers)
    if ffn_share is not None:
        rows = min(rows, max(min_rows, int(round(ffn_share * d_ffn))))
    if rows >= d_ffn:
        return BudgetPlan(
            total, trunk, kv_cache, temporaries, selector, neuron_bytes, n_layers, d_ffn, d_ffn, 0
        )
    pinned = int(rows * pin_share)
    window = rows - pinned
    if window < min_rows:
        window, pinned = min_rows, max(0, rows - min_rows)
    return BudgetPlan(
        total, trunk, kv_cache, temporaries, selector, neuron_bytes, n_layers, d_ffn, pinned, window
    )
