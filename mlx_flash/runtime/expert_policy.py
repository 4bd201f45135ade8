"""Which resident experts a MoE layer evicts when it needs room.

- ``lru`` (default): least recently used first.
- ``lfu``: least frequently used, with ageing: an expert's score is the sum over its uses of
  2^(-age / half_life), age counted in calls of its layer; ties go to the least recently used.

The default is provisional: it was chosen on uniform routing and on a routing model calibrated to
published Qwen3-30B-A3B decode traces (README, Mixture-of-experts models), not on traces of a real
MoE run here; record some with ``--record-trace`` and compare. A call's own experts are never
evicted: callers pass only the others as candidates.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

LFU_HALF_LIFE = 16.0  # calls: the one setting never much worse than LRU in the simulations


class Policy(Protocol):
    name: str

    def touch(self, experts: np.ndarray, counts: np.ndarray) -> None: ...

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray: ...


class LRU:
    """Evicts the candidates used longest ago."""

    name = "lru"

    def __init__(self, n_experts: int) -> None:
        self.last = np.full(n_experts, -1, dtype=np.int64)
        self.t = 0

    def touch(self, experts: np.ndarray, counts: np.ndarray) -> None:
        """One call of the layer used ``experts`` (``counts`` tokens each)."""
        self.t += 1
        self.last[experts] = self.t

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        """The ``n`` candidates to evict, least recently used first."""
        order = np.argsort(self.last[candidates], kind="stable")
        return candidates[order[: max(0, n)]]


class LFUAged(LRU):
    """Evicts the candidates with the lowest aged use count (see the module docstring).

    Scores are kept as logarithms referred to call 0, so ageing needs no pass over all experts.
    """

    name = "lfu"

    def __init__(self, n_experts: int, half_life: float = LFU_HALF_LIFE) -> None:
        super().__init__(n_experts)
        self.rate = math.log(2.0) / half_life
        self.log_score = np.full(n_experts, -np.inf)

    def touch(self, experts: np.ndarray, counts: np.ndarray) -> None:
        super().touch(experts, counts)
        gain = np.log(np.asarray(counts, dtype=np.float64)) + self.rate * self.t
        self.log_score[experts] = np.logaddexp(self.log_score[experts], gain)

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        order = np.lexsort((self.last[candidates], self.log_score[candidates]))
        return candidates[order[: max(0, n)]]


def make_policy(name: str, n_experts: int) -> Policy:
    """The eviction policy ``name`` ("lru" or "lfu") for a layer of ``n_experts``."""
    return {"lru": LRU, "lfu": LFUAged}[name](n_experts)
