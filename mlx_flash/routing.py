"""Routing models for expert-cache benchmarks, as traces (``mlx_flash.runtime.trace``).

- ``uniform``: each token picks top-k distinct experts uniformly at random, in every layer
  independently: the worst case (perfect load balance, reuse only by chance); every policy's hit
  rate is then the share of experts resident.
- ``skewed``: a latent router. For expert e at token t the score is
  ``b[e] + a * s[t, e] + n[t, e]``: a fixed popularity ``b ~ N(0, sigma_b^2)``, a slowly
  drifting context ``s[t] = phi * s[t-1] + sqrt(1 - phi^2) * N(0, 1)`` (temporal locality)
  and token noise ``n ~ N(0, 1)``; the token takes the top k. ``SKEWED`` was fitted to
  published decode statistics of Qwen3-30B-A3B (expert reuse from token to token, how few
  experts carry most of the routing); the statistics and how well the fit
  reproduces them are in the README (Mixture-of-experts models).
"""

from __future__ import annotations

import math

import numpy as np

from .runtime.trace import Trace

SKEWED = {"sigma_b": 1.0, "a": 1.5, "phi": 0.99}
ROUTINGS = ("uniform", "skewed")


def routing_trace(
    routing: str, tokens: int, layers: int, n_experts: int, top_k: int, seed: int = 0
) -> Trace:
    """A trace of ``tokens`` tokens through ``layers`` MoE layers (independent of each other)."""
    rng = np.random.default_rng(seed)
    draw = _uniform if routing == "uniform" else _skewed
    picks = np.stack([draw(rng, tokens, n_experts, top_k) for _ in range(layers)], axis=1)
    rows = list(picks.reshape(tokens * layers, top_k))
    meta = {"routing": routing, "seed": seed, **(SKEWED if routing == "skewed" else {})}
    return Trace.from_rows("experts", n_experts, layers, rows, meta)


def _uniform(rng: np.random.Generator, tokens: int, n_experts: int, top_k: int) -> np.ndarray:
    return np.argpartition(rng.random((tokens, n_experts)), top_k, axis=1)[:, :top_k]


def _skewed(rng: np.random.Generator, tokens: int, n_experts: int, top_k: int) -> np.ndarray:
    sigma_b, a, phi = SKEWED["sigma_b"], SKEWED["a"], SKEWED["phi"]
    popularity = rng.normal(0.0, sigma_b, n_experts)
    context = np.empty((tokens, n_experts))
    s = rng.normal(0.0, 1.0, n_experts)
    for t in range(tokens):
        s = phi * s + math.sqrt(1.0 - phi * phi) * rng.normal(0.0, 1.0, n_experts)
        context[t] = s
    scores = popularity + a * context + rng.normal(0.0, 1.0, (tokens, n_experts))
    return np.argpartition(-scores, top_k, axis=1)[:, :top_k]


def reuse(trace: Trace, window: int = 1) -> float:
    """Share of the experts a token uses that the same layer used in the ``window`` tokens before
    (the statistic the skewed model was fitted to)."""
    hits = total = 0
    for layer in range(trace.n_layers):
        for t in range(window, trace.tokens):
            recent = np.concatenate([trace.at(u, layer) for u in range(t - window, t)])
            now = trace.at(t, layer)
            hits += np.isin(now, recent).sum()
            total += now.size
    return hits / max(1, total)
