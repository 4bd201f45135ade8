"""Per-token, per-layer counters of what the flash runtime did, summarised for users and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

COUNTERS = (
    "requested",
    "hits",
    "loaded",
    "dropped",
    "computed",
    "bytes_read",
    "reads",
    "io_s",
    "compute_s",
)


@dataclass
class TokenStats:
    """Totals over all layers for one forward pass (a decode token, or a whole prefill chunk)."""

    phase: str  # "prefill" or "decode"
    tokens: int
    requested: int = 0  # neurons the selector asked for (summed over layers)
    hits: int = 0  # of those, already in DRAM (pinned or buffered)
    loaded: int = 0  # neurons read from flash
    dropped: int = 0  # neurons evicted from buffers
    computed: int = 0  # neuron rows multiplied
    bytes_read: int = 0
    reads: int = 0
    io_s: float = 0.0
    compute_s: float = 0.0


@dataclass
class Telemetry:
    """Collects one ``TokenStats`` per forward pass; layer 0 opens a new entry.

    ``per_layer`` keeps the same counters per layer for the latest pass, for plots and debugging.
    """

    n_layers: int
    d_ffn: int
    enabled: bool = True
    passes: list[TokenStats] = field(default_factory=list)
    per_layer: dict[str, np.ndarray] = field(default_factory=dict)

    def begin(self, phase: str, tokens: int) -> None:
        if self.enabled:
            self.passes.append(TokenStats(phase, tokens))
            self.per_layer = {c: np.zeros(self.n_layers) for c in COUNTERS}

    def add(self, layer: int, **counts: float) -> None:
        if not self.enabled or not self.passes:
            return
        current = self.passes[-1]
        for name, value in counts.items():
            setattr(current, name, getattr(current, name) + value)
            self.per_layer[name][layer] += value

    def reset(self) -> None:
        self.passes.clear()

    def summary(self, phase: str = "decode") -> dict[str, float]:
        """Means per token over the passes of ``phase`` (fractions are of all FFN neurons of all layers)."""
        chosen = [p for p in self.passes if p.phase == phase]
        tokens = sum(p.tokens for p in chosen)
        total = {
            f.name: sum(getattr(p, f.name) for p in chosen)
            for f in fields(TokenStats)
            if f.name not in ("phase", "tokens")
        }
        neurons = max(1, tokens) * self.n_layers * self.d_ffn
        per = max(1, tokens)
        return {
            "tokens": tokens,
            "flash_bytes_per_token": total["bytes_read"] / per,
            "reads_per_token": total["reads"] / per,
            "io_ms_per_token": 1e3 * total["io_s"] / per,
            "compute_ms_per_token": 1e3 * total["compute_s"] / per,
            "buffer_hit_rate": total["hits"] / total["requested"] if total["requested"] else 0.0,
            "fraction_used": total["requested"] / neurons,
            "fraction_loaded": total["loaded"] / neurons,
            "fraction_computed": total["computed"] / neurons,
        }
