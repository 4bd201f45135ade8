"""The quality guard: what each selector's operating points cost in perplexity, measured end to end
on held-back calibration text (tokens nothing was fitted on).

A batched forward over whole windows is what decoding them token by token computes here: a
token's selection depends only on its own FFN input. Each FFN keeps, per token and layer, the
neurons the selector picks (the top ones by its score at the layer's allocated sparsity, or the
predictor's), computes them from the exact weights read from the store, and with ``resident`` rows
also the neurons picked for the previous ``window - 1`` tokens of the same window (what the
runtime's sliding window keeps and multiplies).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load_model
from tqdm import tqdm

from mlx_flash.runtime.adapters import ACTIVATIONS, set_ffn, spec_for
from mlx_flash.runtime.calibration import Calibration, OperatingPoint, Predictors
from mlx_flash.runtime.ffn import hidden, project_in, project_out
from mlx_flash.runtime.loader import cast_parameters
from mlx_flash.runtime.manifest import Manifest
from mlx_flash.runtime.proxy import Proxy
from mlx_flash.runtime.selectors import keep_counts
from mlx_flash.runtime.store import StoreReader

WINDOW = 4  # the runtime's default k
# windows per forward: as many as keep their logits (tokens x vocabulary, float32) near this size,
# which a calibration under the runtime's own memory budget must afford
LOGITS_BYTES = 32 << 20
LOSS_POSITIONS = 32
Score = Callable[[int, dict, mx.array, mx.array], mx.array]  # (layer, parts, x, h) -> keep mask


def trunk_model(directory: Path, manifest: Manifest, ffn: Callable[[int], nn.Module]):
    """The model of a flash directory with every FFN module replaced by ``ffn(layer)``, in
    float32. The FFN is swapped before the cast, so its unloaded weights are never made."""
    model, _ = load_model(directory, lazy=True, strict=False, model_config={"model_file": None})
    spec = spec_for(manifest.model_type)
    for i in range(manifest.n_layers):
        set_ffn(model, spec, i, ffn(i))
    cast_parameters(model, mx.float32)
    return model


class _GuardFFN(nn.Module):
    """One layer's FFN computed exactly over the neurons the current setting keeps."""

    def __init__(self, reader: StoreReader, manifest: Manifest, layer: int):
        super().__init__()
        self._reader, self._manifest, self._layer = reader, manifest, layer
        self.keep: Score | None = None  # None: every neuron (dense)
        self.window = 1
        self.computed = self.seen = 0  # neuron rows multiplied, and neurons x tokens passed

    def __call__(self, x: mx.array) -> mx.array:
        m, layer = self._manifest, self._layer
        parts = {k: mx.array(v) for k, v in self._reader.read_layer(layer).items()}
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        h = hidden(xf, parts, m.activation, m.gated, m.quantization)
        computed = mx.array(h.size)
        if self.keep is not None:
            mask = _windowed(self.keep(layer, parts, xf, h).reshape(*x.shape[:-1], -1), self.window)
            h, computed = h * mask.reshape(h.shape), mask.sum()
        out = project_out(h, parts, m.quantization)
        if "down_bias" in m.layers[layer].blobs:
            out = out + mx.array(self._reader.read_blob(layer, "down_bias", np.float32))
        out = out.astype(x.dtype).reshape(x.shape)
        # the layer's weights go now: a lazy forward would hold every layer's at once
        mx.eval(out, computed)
        self.computed, self.seen = self.computed + computed.item(), self.seen + h.size
        return out


def _windowed(mask: mx.array, window: int) -> mx.array:
    """``mask`` [windows, tokens, neurons] or'ed with the masks of the previous ``window - 1``
    tokens of the same window."""
    out = mask
    for j in range(1, min(window, mask.shape[-2])):
        out = out | mx.pad(mask[..., :-j, :], [(0, 0), (j, 0), (0, 0)])
    return out


def _top(score: mx.array, keep: int) -> mx.array:
    if keep >= score.shape[-1]:
        return mx.ones(score.shape, dtype=mx.bool_)
    kth = score.shape[-1] - keep  # the keep-th largest: a partition, not a sort (5x quicker)
    return score >= mx.partition(score, kth, axis=-1)[:, kth : kth + 1]


def scorers(
    manifest: Manifest, proxy: Proxy | None, predictors: Predictors | None
) -> dict[str, Callable[[list[int] | None], Score]]:
    """Per selector, a maker of keep-masks for given per-layer keep counts. The oracle keeps the
    top neurons by the exact |h|: the ceiling any selector can reach."""
    act = ACTIVATIONS[manifest.activation]
    out: dict[str, Callable[[list[int] | None], Score]] = {}
    out["oracle"] = lambda keep: lambda i, parts, x, h: _top(mx.abs(h), keep[i])
    if proxy is not None:
        out["proxy"] = lambda keep: lambda i, parts, x, h: _top(proxy.scores(i, x), keep[i])
    if manifest.gated:
        quant = manifest.quantization

        def gate(keep):
            return lambda i, parts, x, h: _top(
                mx.abs(act(project_in(x, parts, "gate", quant))), keep[i]
            )

        out["gate"] = gate
    if predictors is not None:
        p = predictors.astype(mx.float32)
        out["predictor"] = lambda keep: lambda i, parts, x, h: p.logits(i, x) > p.cut[i]
    return out


def points_to_measure(available: dict) -> list[tuple[str, float | None, str]]:
    """(selector, global sparsity, rows) settings the guard measures for what can be built, each a
    forward over every held-back token. The proxy computing only its selection where a 2% bound
    lands (0.3, 0.4), and with the window's rows only at 0.5: at lower sparsities the union of a
    window's selections is nearly the whole FFN (README), a point dense streaming serves as well.
    The gate, which the proxy outranks at every sparsity, only where no proxy was written."""
    points = []
    if "predictor" in available:
        points += [("predictor", None, rows) for rows in ("resident", "selected")]
    if "proxy" in available:
        points += [("proxy", s, "selected") for s in (0.3, 0.4)]
        points += [("proxy", 0.5, "resident")]
    elif "gate" in available:
        points += [("gate", 0.3, "resident")]
    return points


class Guard:
    """The model of a flash directory with every FFN computed exactly over the neurons a setting
    keeps, to measure what settings cost in loss. Use as a context manager."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        proxy: Proxy | None,
        predictors: Predictors | None,
    ):
        # freed buffers go back to the OS: the guard's forwards must fit where the runtime does
        self._cache_limit = mx.set_cache_limit(0)
        if proxy is not None:
            proxy = dataclasses.replace(proxy.astype(mx.float32), unpack=True)
        self.manifest, self.makers = manifest, scorers(manifest, proxy, predictors)
        # uncached: each forward reads the whole store once, more than a budget leaves to cache
        self._reader = StoreReader(directory, manifest, threads=4, page_cache=False)
        self._ffns = [_GuardFFN(self._reader, manifest, i) for i in range(manifest.n_layers)]
        self._model = trunk_model(directory, manifest, lambda i: self._ffns[i])

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        mx.set_cache_limit(self._cache_limit)
        self._reader.close()

    def loss(
        self,
        windows: np.ndarray,
        name: str | None = None,
        keep: list | None = None,
        window: int = 1,
        layers: set[int] | None = None,
    ) -> float:
        """Mean next-token loss over ``windows`` with ``name`` keeping ``keep[i]`` neurons of layer
        i (in ``layers``, default all; the others dense), unioned over ``window`` tokens."""
        for i, f in enumerate(self._ffns):
            on = name is not None and (layers is None or i in layers)
            f.keep, f.window = (self.makers[name](keep) if on else None), window
            f.computed = f.seen = 0
        return _mean_loss(self._model, windows)

    def rows_share(self) -> float:
        """The share of the FFNs' neuron rows the last ``loss`` multiplied per token."""
        return sum(f.computed for f in self._ffns) / max(1, sum(f.seen for f in self._ffns))

    def sensitivity(self, windows: np.ndarray, name: str, sparsity: float) -> np.ndarray:
        """Per layer, the loss increase when only that layer runs ``name`` at ``sparsity``."""
        m = self.manifest
        keep = keep_counts(np.full(m.n_layers, sparsity), m.d_ffn)
        dense = self.loss(windows)
        return np.array(
            [self.loss(windows, name, keep, layers={i}) - dense for i in range(m.n_layers)]
        )

    def operating_points(
        self, windows: np.ndarray, calibration: Calibration, progress: bool = True
    ) -> tuple[float, list[OperatingPoint]]:
        """The dense perplexity of ``windows`` and the perplexity change of every setting
        ``points_to_measure`` lists for what can be built."""
        settings = points_to_measure(self.makers)
        bar = tqdm([None, *settings], desc="quality guard", unit="setting", disable=not progress)
        measured = [
            (self._point_loss(windows, setting, calibration), self.rows_share()) for setting in bar
        ]
        dense = math.exp(measured[0][0])
        points = [
            OperatingPoint(name, sparsity, rows, WINDOW, math.exp(loss) / dense - 1, share)
            for (name, sparsity, rows), (loss, share) in zip(settings, measured[1:], strict=True)
        ]
        return dense, points

    def _point_loss(self, windows: np.ndarray, setting, calibration: Calibration) -> float:
        if setting is None:
            return self.loss(windows)
        name, sparsity, rows = setting
        keep = None
        if sparsity is not None:
            sparsities = calibration.layer_sparsities(sparsity, self.manifest.n_layers)
            keep = keep_counts(sparsities, self.manifest.d_ffn)
        return self.loss(windows, name, keep, WINDOW if rows == "resident" else 1)


def _mean_loss(model, windows: np.ndarray) -> float:
    """Mean next-token cross-entropy over ``windows``, a few windows per forward and the loss of a
    few positions at a time (its temporaries are logits-sized)."""
    total, count, b, step = 0.0, 0, 0, 1  # the first window alone: its logits give the size
    while b < len(windows):
        batch = mx.array(windows[b : b + step])
        logits = model(batch[:, :-1]).astype(mx.float32)
        mx.eval(logits)
        targets = batch[:, 1:]
        for p in range(0, targets.shape[1], LOSS_POSITIONS):
            part = slice(p, p + LOSS_POSITIONS)
            loss = nn.losses.cross_entropy(logits[:, part], targets[:, part], reduction="sum")
            total += loss.item()
        count += targets.size
        b += step
        step = max(1, LOGITS_BYTES // (logits.nbytes // len(batch)))
        del logits
    return total / count
