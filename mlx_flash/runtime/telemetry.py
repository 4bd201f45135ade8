"""What the flash runtime did, per layer and per forward pass, summarised for users and
benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .store import ReadCount


@dataclass
class LayerStats:
    """One layer's FFN in one forward pass (a decode step, or a prefill chunk)."""

    requested: int = 0  # neurons the selector asked for (every neuron in a prefill)
    hits: int = 0  # of those, already in DRAM (pinned or buffered)
    dropped: int = 0  # neurons evicted from the buffer
    computed: int = 0  # neuron rows multiplied
    read: ReadCount = field(default_factory=ReadCount)  # what was read from flash
    seconds: float = 0.0  # wall time of the call, reads included
    advised: int = 0  # of the neurons read, those the look-ahead had advised (lookahead.py)

    @property
    def loaded(self) -> int:
        """Neurons read from flash."""
        return self.read.records

    @property
    def compute_s(self) -> float:
        """Time not spent inside reads: selection, bookkeeping and the FFN's matrix products."""
        return max(0.0, self.seconds - self.read.seconds)

    def __add__(self, other: LayerStats) -> LayerStats:
        return LayerStats(
            self.requested + other.requested,
            self.hits + other.hits,
            self.dropped + other.dropped,
            self.computed + other.computed,
            self.read + other.read,
            self.seconds + other.seconds,
            self.advised + other.advised,
        )


@dataclass
class Pass:
    """One forward pass of the model: its phase, tokens, and every layer's stats."""

    phase: str  # "prefill" or "decode"
    tokens: int
    layers: list[LayerStats]
    limit_s: float = 0.0  # the physical limit of its reads (``limit``)

    @property
    def total(self) -> LayerStats:
        return sum(self.layers, LayerStats())


@dataclass
class Telemetry:
    """A ``Pass`` per forward pass; layer 0 opens a new one (``begin``), each layer ``record``s."""

    n_layers: int
    d_ffn: int
    enabled: bool = True
    passes: list[Pass] = field(default_factory=list)
    # MoE: layers are the MoE layers, d_ffn the experts per layer; ``summary`` adds expert keys
    experts: bool = False

    def begin(self, phase: str, tokens: int) -> None:
        if self.enabled:
            self.passes.append(Pass(phase, tokens, [LayerStats() for _ in range(self.n_layers)]))

    def record(self, layer: int, stats: LayerStats) -> None:
        if self.enabled and self.passes:
            self.passes[-1].layers[layer] = stats

    def add_limit(self, seconds: float) -> None:
        """Add a read's physical limit (``limit.limit_seconds``) to the current pass."""
        if self.enabled and self.passes:
            self.passes[-1].limit_s += seconds

    def reset(self) -> None:
        self.passes.clear()

    def lookahead_recall_per_layer(self, phase: str = "decode") -> list[float]:
        """Per layer, the share of the neurons it read that the look-ahead had advised."""
        chosen = [p for p in self.passes if p.phase == phase]
        totals = [sum((p.layers[i] for p in chosen), LayerStats()) for i in range(self.n_layers)]
        return [t.advised / t.loaded if t.loaded else 0.0 for t in totals]

    def summary(self, phase: str = "decode") -> dict[str, float]:
        """Means per token over the passes of ``phase`` (fractions are of all FFN neurons of all
        layers; for MoE models of all experts of all MoE layers, and experts used and loaded are
        summed over the MoE layers)."""
        chosen = [p for p in self.passes if p.phase == phase]
        tokens = sum(p.tokens for p in chosen)
        total = sum((p.total for p in chosen), LayerStats())
        per = max(1, tokens)
        neurons = per * self.n_layers * self.d_ffn
        experts = {
            "experts_used_per_token": total.requested / per,
            "experts_loaded_per_token": total.loaded / per,
            "expert_hit_rate": total.hits / total.requested if total.requested else 0.0,
        }
        return {
            **(experts if self.experts else {}),
            "tokens": tokens,
            "flash_bytes_per_token": total.read.bytes / per,
            "reads_per_token": total.read.reads / per,
            "io_ms_per_token": 1e3 * total.read.seconds / per,
            "limit_ms_per_token": 1e3 * sum(p.limit_s for p in chosen) / per,
            "compute_ms_per_token": 1e3 * total.compute_s / per,
            "buffer_hit_rate": total.hits / total.requested if total.requested else 0.0,
            "fraction_used": total.requested / neurons,
            "fraction_loaded": total.loaded / neurons,
            "fraction_computed": total.computed / neurons,
            "lookahead_recall": total.advised / total.loaded if total.loaded else 0.0,
        }
