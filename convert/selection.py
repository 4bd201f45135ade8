"""Choosing, at calibration, how neurons will be selected: the proxy's compression and each layer's
sparsity.

Both are judged by the error a selection causes in a layer's FFN output on calibration tokens:
``|y - y_kept|^2 / |y|^2`` where ``y_kept`` sums only the kept neurons. Per layer this is cheap
(no forward pass through the model), and the quality guard (``quality.py``) then checks the result
end to end on held-back text.

- The proxy: candidates from the cheapest up; the first whose error stays within ``PROXY_SLACK``
  of the oracle's (the top neurons by the exact |act(gate)·up|) at the sparsities that matter is
  taken; when none does, no proxy is written. Every candidate keeps a layer's outlier input
  channels aside in float16 (``proxy.outliers``). Below 4 bits a gated FFN's copy loses several
  points of perplexity for little saved DRAM (README, Sparsity), so gated candidates start at 4.
- Per-layer sparsity: starting from none, repeatedly raise by ``STEP`` the sparsity of the layer
  whose error grows least, and record the allocation each time the mean reaches a target. Layers
  differ: some lose little at 0.65 when others lose much at 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_flash.runtime.adapters import ACTIVATIONS
from mlx_flash.runtime.ffn import Parts, dense_rows, hidden, project_in, project_out
from mlx_flash.runtime.manifest import Manifest
from mlx_flash.runtime.proxy import Proxy, ProxyFormat, compress

# cheapest first
GATED = (ProxyFormat(4, 64, keep=8), ProxyFormat(5, 64, keep=8), ProxyFormat(8, 64, keep=8))
UNGATED = (ProxyFormat(2, 32, keep=8), *GATED)
CHEAP = (ProxyFormat(2, 64, keep=8), ProxyFormat(2, 32, keep=8))  # for stores of <= 4 bits
CHECKED_SPARSITIES = (0.3, 0.5)
PROXY_SLACK = 1.15  # a proxy's mean error may be this many times the oracle's (README, Sparsity)
STEP = 0.05
TARGETS = np.round(np.arange(0.05, 0.85, STEP), 2)  # global sparsities the allocation covers
GRID = np.round(np.arange(0.0, 0.95 + 1e-9, STEP), 2)  # per-layer sparsities allocated
MEASURED = np.round(np.arange(0.0, 0.9 + 1e-9, 0.1), 1)  # those measured (GRID interpolates)


def gate_up_rows(parts: Parts, manifest: Manifest) -> tuple[mx.array, mx.array | None]:
    """[gate rows; up rows] (or the up rows of an FFN without a gate) as floats, and their
    per-neuron biases if the model has them."""
    quant = manifest.quantization
    names = ("gate", "up") if manifest.gated else ("up",)
    rows = mx.concatenate([dense_rows(parts, n, quant) for n in names])
    biases = [parts[f"{n}_bias"][:, 0] for n in names if f"{n}_bias" in parts]
    return rows, (mx.concatenate(biases) if biases else None)


def output_errors(
    h: mx.array, parts: Parts, manifest: Manifest, score: mx.array, sparsities
) -> np.ndarray:
    """Relative error of the FFN output at each sparsity, when each token keeps only its
    top-scored neurons (``h``: the exact activations, [tokens, d_ffn])."""
    quant, d_ffn = manifest.quantization, h.shape[-1]
    y = project_out(h, parts, quant)
    norm = mx.maximum(mx.sum(mx.square(y)), 1e-30)
    ranked = mx.sort(score, axis=-1)
    out = []
    for s in sparsities:
        keep = max(1, int(round((1 - s) * d_ffn)))
        kept = project_out(mx.where(score >= ranked[:, -keep][:, None], h, 0.0), parts, quant)
        out.append(float(mx.sum(mx.square(y - kept)) / norm))
    return np.array(out)


@dataclass
class LayerErrors:
    """One layer's output errors at ``CHECKED_SPARSITIES``: the oracle's and each proxy
    candidate's."""

    oracle: np.ndarray
    candidates: dict[str, np.ndarray]


def layer_errors(
    parts: Parts,
    manifest: Manifest,
    x: np.ndarray,
    channels: np.ndarray,
    candidates: tuple[ProxyFormat, ...],
) -> LayerErrors:
    """The errors of one layer on calibration FFN inputs ``x`` ([tokens, d_model]); ``channels``:
    its input channels by decreasing mean |x|."""
    xm = mx.array(x)
    h = hidden(xm, parts, manifest.activation, manifest.gated, manifest.quantization)
    oracle = output_errors(h, parts, manifest, mx.abs(h), CHECKED_SPARSITIES)
    found = {
        fmt.name: output_errors(
            h,
            parts,
            manifest,
            layer_proxy(parts, manifest, fmt, channels).scores(0, xm),
            CHECKED_SPARSITIES,
        )
        for fmt in candidates
    }
    return LayerErrors(oracle, found)


def layer_proxy(parts: Parts, manifest: Manifest, fmt: ProxyFormat, channels: np.ndarray) -> Proxy:
    """A one-layer proxy of these rows (float32), to score with."""
    rows, bias = gate_up_rows(parts, manifest)
    layer = compress(rows, fmt, channels, bias)
    return Proxy(fmt, [layer], manifest.activation, manifest.gated, unpack=True).astype(mx.float32)


def error_curve(h: mx.array, parts: Parts, manifest: Manifest, score: mx.array) -> np.ndarray:
    """A layer's output error over ``GRID``, measured at ``MEASURED`` and interpolated."""
    measured = output_errors(h, parts, manifest, score, MEASURED)
    return np.interp(GRID, MEASURED, measured)


def choose_proxy(
    errors: list[LayerErrors], candidates: tuple[ProxyFormat, ...]
) -> tuple[ProxyFormat | None, dict[str, float]]:
    """The cheapest candidate whose mean error is within ``PROXY_SLACK`` of the oracle's, None when
    none is; and every candidate's error ratio, for the record."""
    oracle = np.mean([e.oracle for e in errors])
    ratios = {
        fmt.name: float(np.mean([e.candidates[fmt.name] for e in errors]) / max(oracle, 1e-12))
        for fmt in candidates
    }
    good = [fmt for fmt in candidates if ratios[fmt.name] <= PROXY_SLACK]
    return (good[0] if good else None), ratios


def candidates(manifest: Manifest) -> tuple[ProxyFormat, ...]:
    """The candidates worth trying for this store. For a store of 4 bits or fewer only copies
    costing at most a quarter of its FFN bytes (a 4-bit copy would be two thirds of it): on
    SmolLM2 none of those comes within 2 points of the oracle (README, Sparsity)."""
    pool = GATED if manifest.gated else UNGATED
    if manifest.quantization is None or manifest.quantization.bits > 4:
        return pool
    rows = (2 if manifest.gated else 1) * manifest.d_ffn
    limit = manifest.neuron_bytes() * manifest.d_ffn / 4
    return tuple(f for f in CHEAP + pool if f.nbytes(rows, manifest.d_model) <= limit)


def allocate(curves: np.ndarray) -> np.ndarray:
    """Per-layer sparsities [targets, layers] for every global target in ``TARGETS``, from each
    layer's error curve over ``GRID`` ([layers, grid]): greedy, the cheapest step first."""
    n = curves.shape[0]
    level = np.zeros(n, dtype=int)  # index into GRID per layer
    out = np.zeros((len(TARGETS), n))
    t = 0
    while t < len(TARGETS):
        mean = GRID[level].mean()
        while t < len(TARGETS) and mean >= TARGETS[t] - 1e-9:
            out[t] = GRID[level]
            t += 1
        if t == len(TARGETS):
            break
        can = level < len(GRID) - 1
        cost = np.where(can, curves[np.arange(n), np.minimum(level + 1, len(GRID) - 1)], np.inf)
        cost = cost - curves[np.arange(n), level]
        level[int(np.argmin(cost))] += 1
    return out


def gate_score(parts: Parts, manifest: Manifest, x: mx.array) -> mx.array:
    """|act(gate)| of every neuron, [tokens, d_ffn]: the gate selector's score."""
    act = ACTIVATIONS[manifest.activation]
    return mx.abs(act(project_in(x, parts, "gate", manifest.quantization)))
