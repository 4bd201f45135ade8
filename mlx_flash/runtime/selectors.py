"""Selectors decide, from a layer's FFN input, which neurons this token uses.

A selector is called with the FFN input flattened to [tokens, d_model] and returns a ``Selection``:
sorted unique neuron ids (numpy int64) and, when it computed them exactly, the activations of the
gate. For several tokens at once (a batch of sequences, a speculative step) the ids are the union
over the tokens, so every token gets every neuron any of them needs.

- ``dense``: every neuron (exact; the paper's naive baseline when the buffer is smaller than the
  FFN).
- ``proxy`` (gated and GELU FFNs): per token, the top neurons by |act(g~x)·(u~x)| from a low-bit
  copy of the gate and up matrices held in DRAM (``proxy.py``); only their exact records stream.
- ``gate`` (gated FFNs): the exact gate matrix in DRAM (a third of the FFN's bytes); per token the
  top neurons by |act(gate)|; the FFN reuses those exact gate values, so buffers hold no gate rows.
- ``oracle`` (gated FFNs; measurement): the exact gate and up matrices in DRAM, the top neurons by
  |act(gate)·up|: the ceiling any selector can reach at a sparsity.
- ``predictor`` (ReLU-family FFNs, the paper's): per layer a low-rank network trained at
  calibration predicts which neurons are non-zero; its weights stay in DRAM.
- ``auto``: of the operating points (selector, sparsity, rows computed) calibration measured to
  lose at most ``max_quality_loss`` perplexity on held-back text, and dense streaming (exact), the
  one whose reads the disk's cost model expects to take least time under the budget (then: that
  computes the fewest neurons); dense when none qualifies (``choose``). A point measured with the
  window's rows resident qualifies only where the budget holds that many rows.

The top-k selectors keep, per token, ``round((1 - s) * d_ffn)`` neurons of a layer whose sparsity is
``s``: calibration's per-layer allocation for the global target (``Calibration.layer_sparsities``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import mlx.core as mx
import numpy as np

from .adapters import ACTIVATIONS
from .calibration import (
    Calibration,
    OperatingPoint,
    Predictors,
    operating_points,
    read_predictors,
    sparsity_words,
)
from .errors import OptionError
from .ffn import project_in
from .manifest import Manifest, part_bytes, tensor_bytes
from .proxy import read_proxy
from .store import StoreReader

GATE_PARTS = ("gate", "gate.scales", "gate.biases", "gate_bias")
UP_PARTS = ("up", "up.scales", "up.biases", "up_bias")
RECALIBRATE = "re-run python -m mlx_flash.convert.calibrate DIR"


class Selection(NamedTuple):
    """What a selector chose for one layer and call."""

    ids: np.ndarray  # sorted unique neuron ids, the union over the call's tokens
    gate: mx.array | None = None  # exact act(gate) of every neuron, [tokens, d_ffn], if computed


class Selector(Protocol):
    """What the runtime asks of a selector."""

    name: str  # as users name it ("proxy", ...)
    nbytes: int  # DRAM it holds (counted in the memory plan)
    needs_input: bool  # whether it reads x (a selector that does not takes every neuron)
    exact_gate: bool  # whether its selections carry exact act(gate) (buffers then skip gate rows)

    def __call__(self, layer: int, x: mx.array) -> Selection: ...


def _union(mask: mx.array) -> np.ndarray:
    """Ids of the columns of a [tokens, d_ffn] boolean mask that are set for any token."""
    return np.flatnonzero(np.array(mx.any(mask, axis=0))).astype(np.int64)


def top_ids(score: mx.array, keep: int) -> np.ndarray:
    """Ids of the ``keep`` highest scores of each token ([tokens, d_ffn]), united over tokens."""
    if keep >= score.shape[-1]:
        return np.arange(score.shape[-1], dtype=np.int64)
    top = mx.argpartition(-score, kth=keep - 1, axis=-1)[:, :keep]
    return np.unique(np.array(top)).astype(np.int64)


def keep_counts(sparsities: np.ndarray, d_ffn: int) -> list[int]:
    """Neurons kept per token in each layer for the layers' sparsities."""
    return [max(1, int(round((1.0 - s) * d_ffn))) for s in sparsities]


class DenseSelector:
    """Every neuron: the exact FFN. With a buffer smaller than the FFN it streams the whole FFN each
    token, which is the paper's naive baseline."""

    name = "dense"
    nbytes = 0
    needs_input = False
    exact_gate = False

    def __init__(self, d_ffn: int):
        self._all = Selection(np.arange(d_ffn, dtype=np.int64))

    def __call__(self, layer: int, x: mx.array) -> Selection:
        return self._all


class FixedSelector:
    """Ids chosen by a function of (layer, x): for tests and experiments that inject selections."""

    name = "fixed"
    nbytes = 0
    needs_input = True
    exact_gate = False

    def __init__(self, choose: Callable[[int, mx.array], np.ndarray]):
        self._choose = choose

    def __call__(self, layer: int, x: mx.array) -> Selection:
        return Selection(np.unique(np.asarray(self._choose(layer, x), dtype=np.int64)))


class ProxySelector:
    """The top neurons by the proxy's score (see the module docstring)."""

    name = "proxy"
    needs_input = True
    exact_gate = False

    def __init__(self, proxy, keep: list[int]):
        self._proxy, self.keep = proxy, keep
        self.nbytes = proxy.nbytes

    def __call__(self, layer: int, x: mx.array) -> Selection:
        return Selection(top_ids(self._proxy.scores(layer, x), self.keep[layer]))


class GateSelector:
    """The top neurons by |act(gate)|, with the exact gate matrices in DRAM. ``gates[layer]``
    holds the layer's gate parts ("gate", for quantized stores "gate.scales" and "gate.biases";
    "gate_bias" if the model has one) as [d_ffn, width] arrays."""

    name = "gate"
    needs_input = True
    exact_gate = True

    def __init__(
        self, gates: list[dict[str, mx.array]], activation: str, quantization, keep: list[int]
    ):
        self._gates, self._act, self._quant = gates, ACTIVATIONS[activation], quantization
        self.keep = keep
        self.nbytes = sum(a.nbytes for parts in gates for a in parts.values())

    def __call__(self, layer: int, x: mx.array) -> Selection:
        gate = self._act(project_in(x, self._gates[layer], "gate", self._quant))
        return Selection(top_ids(mx.abs(gate), self.keep[layer]), gate)


class OracleSelector(GateSelector):
    """The top neurons by the exact |act(gate)·up|, with the gate and up matrices in DRAM."""

    name = "oracle"

    def __call__(self, layer: int, x: mx.array) -> Selection:
        parts = self._gates[layer]
        gate = self._act(project_in(x, parts, "gate", self._quant))
        score = mx.abs(gate * project_in(x, parts, "up", self._quant))
        return Selection(top_ids(score, self.keep[layer]), gate)


class PredictorSelector:
    """Neurons whose predicted logit is above the layer's calibrated cut (convert/predictor.py)."""

    name = "predictor"
    needs_input = True
    exact_gate = False

    def __init__(self, predictors: Predictors):
        self._predictors = predictors
        self.nbytes = predictors.nbytes

    def __call__(self, layer: int, x: mx.array) -> Selection:
        p = self._predictors
        return Selection(_union(p.logits(layer, x.astype(p.bias[layer].dtype)) > p.cut[layer]))


@dataclass(frozen=True)
class Choice:
    """What runs and why: the selector, its global sparsity (None: natural zeros or dense), the
    rows computed, the perplexity change calibration measured there (None: not measured)."""

    name: str
    sparsity: float | None
    compute_rows: str
    loss: float | None
    reason: str
    sparse: Choice | None = None  # auto running dense: the sparse point it weighed and passed over


def available(manifest: Manifest, calibration: Calibration | None) -> dict[str, str]:
    """The selectors this directory can build, and for the others why not."""
    why = {"dense": ""}
    why["proxy"] = "" if manifest.extra.get("proxy") else f"this model has no proxy ({RECALIBRATE})"
    needs = "a gated FFN (SwiGLU/GeGLU); this model has none"
    for name in ("gate", "oracle"):
        why[name] = "" if manifest.gated else f"the {name} selector needs {needs}"
        if manifest.gated and calibration is None:
            why[name] = f"the {name} selector needs calibration ({RECALIBRATE})"
    has_predictor = bool(manifest.extra.get("predictor"))
    why["predictor"] = (
        "" if has_predictor else f"this model has no trained predictors ({RECALIBRATE})"
    )
    return why


# (point) -> seconds per token its reads are expected to take under the budget; None when the
# budget cannot hold the selector, or the rows the point's loss was measured with
Cost = Callable[[OperatingPoint], float | None]


def choose(options, manifest: Manifest, calibration: Calibration | None, cost: Cost) -> Choice:
    """The operating point ``options`` stand for (``cost``: see ``Cost``)."""
    rows = options.compute_rows or "resident"
    if options.selector == "auto":
        return _choose_auto(options, manifest, calibration, cost)
    name = options.selector
    why = available(manifest, calibration).get(name, "")
    if why:
        raise OptionError(why)
    if name == "dense":
        return Choice("dense", None, rows, 0.0, "asked for (exact)")
    if name == "predictor":
        return _predictor_choice(options, manifest, rows)
    points = [
        p for p in operating_points(manifest) if p.selector == name and p.compute_rows == rows
    ]
    sparsity = options.sparsity
    if sparsity is None:  # the highest measured sparsity within the bound, else the default
        good = [p for p in points if p.loss <= options.max_quality_loss]
        sparsity = max((p.sparsity for p in good), default=calibration.sparsity or 0.5)
    loss = next((p.loss for p in points if p.sparsity == sparsity), None)
    if loss is not None and loss > options.max_quality_loss:
        warnings.warn(
            f"{name} at sparsity {sparsity:g} costs {100 * loss:+.1f}% perplexity on held-back "
            f"calibration text, more than max_quality_loss {100 * options.max_quality_loss:g}%",
            UserWarning,
            stacklevel=2,
        )
    return Choice(name, sparsity, rows, loss, "asked for")


def _predictor_choice(options, manifest: Manifest, rows: str) -> Choice:
    trained = manifest.extra["predictor"].get("sparsity")
    if options.sparsity not in (None, trained):
        raise OptionError(
            f"the predictors were trained for sparsity {trained}, not {options.sparsity} "
            f"({RECALIBRATE} --sparsity {options.sparsity})"
        )
    measured = [p for p in operating_points(manifest) if p.selector == "predictor"]
    loss = next((p.loss for p in measured if p.compute_rows == rows), None)
    return Choice("predictor", trained, rows, loss, "asked for")


def _choose_auto(
    options, manifest: Manifest, calibration: Calibration | None, cost: Cost
) -> Choice:
    rows = options.compute_rows or "resident"
    if calibration is None:
        return Choice("dense", None, rows, 0.0, "no calibration: runs dense (exact)")
    bound, why = options.max_quality_loss, available(manifest, calibration)
    points = [
        p
        for p in operating_points(manifest)
        if not why.get(p.selector, "unknown") and options.compute_rows in (None, p.compute_rows)
    ]
    if options.sparsity is not None:
        exact = [p for p in points if p.sparsity == options.sparsity]
        if not exact:
            return _unmeasured(options, why, rows)
        points = exact
    reads = {p: cost(p) for p in points if p.loss <= bound}
    good = [p for p, read in reads.items() if read is not None]
    if not good:
        best = min(points, key=lambda p: p.loss, default=None)
        detail = f"; best measured: {_describe(best)}" if best else ""
        return Choice(
            "dense",
            None,
            rows,
            0.0,
            f"no measured setting within {100 * bound:g}% fits{detail}: runs dense",
        )
    # the quickest reads per token; then the fewest neurons multiplied
    best = min(
        good,
        key=lambda p: (reads[p], -(p.sparsity or 1.0), p.compute_rows != "selected"),
    )
    reason = (
        f"measured {100 * best.loss:+.1f}% perplexity on held-back text (bound {100 * bound:g}%)"
    )
    sparse = Choice(best.selector, best.sparsity, best.compute_rows, best.loss, reason)
    dense = cost(OperatingPoint("dense", None, rows, options.window, 0.0))
    if options.sparsity is None and dense is not None and dense <= reads[best]:
        return Choice(
            "dense",
            None,
            rows,
            0.0,
            f"dense streaming reads no slower than {_describe(best)} under this budget "
            f"({1e3 * dense:.0f} vs {1e3 * reads[best]:.0f} ms per token expected): runs dense",
            sparse,
        )
    return sparse


def _unmeasured(options, why: dict[str, str], rows: str) -> Choice:
    """auto at a sparsity calibration did not measure: the best selector built for it, its cost in
    quality unknown."""
    name = next((n for n in ("proxy", "gate") if not why[n]), "dense")
    sparsity = None if name == "dense" else options.sparsity
    reason = f"sparsity {options.sparsity:g} asked for; calibration did not measure it"
    return Choice(name, sparsity, rows, None if name != "dense" else 0.0, reason)


def _describe(p) -> str:
    rows = f"({p.compute_rows} rows)"
    return f"{p.selector} at {sparsity_words(p.sparsity)} {rows} {100 * p.loss:+.1f}%"


def holds_bytes(name: str, directory: Path, manifest: Manifest, itemsize: int) -> int:
    """DRAM the selector ``name`` will hold, known before building it (its files' float tensors
    are held in the compute dtype)."""
    if name in ("gate", "oracle"):
        parts = GATE_PARTS + (UP_PARTS if name == "oracle" else ())
        row = sum(part_bytes(p, itemsize) for p in manifest.layers[0].parts() if p.name in parts)
        return manifest.n_layers * manifest.d_ffn * row
    if name == "proxy":
        return tensor_bytes(Path(directory) / manifest.extra["proxy"]["file"], itemsize)
    if name == "predictor":
        d_model, d_ffn = manifest.d_model, manifest.d_ffn
        return (
            sum((d_model + d_ffn) * r + d_ffn for r in manifest.extra["predictor"]["ranks"])
            * itemsize
        )
    return 0


def build(
    choice: Choice,
    directory: Path,
    manifest: Manifest,
    calibration: Calibration | None,
    reader: StoreReader,
    dtype: mx.Dtype,
) -> Selector:
    """The selector of ``choice`` for a flash model directory."""
    if choice.name == "dense":
        return DenseSelector(manifest.d_ffn)
    if choice.name == "predictor":
        return PredictorSelector(read_predictors(directory, manifest).astype(dtype))
    sparsities = calibration.layer_sparsities(choice.sparsity, manifest.n_layers)
    keep = keep_counts(sparsities, manifest.d_ffn)
    if choice.name == "proxy":
        proxy = read_proxy(
            directory,
            manifest.extra["proxy"],
            manifest.n_layers,
            manifest.activation,
            manifest.gated,
        )
        return ProxySelector(proxy.astype(dtype), keep)
    parts = GATE_PARTS + (UP_PARTS if choice.name == "oracle" else ())
    rows = []
    for layer in range(manifest.n_layers):
        arrays = reader.read_layer(layer, parts)
        rows.append(
            {
                k: mx.array(v) if v.dtype == np.uint32 else mx.array(v).astype(dtype)
                for k, v in arrays.items()
            }
        )
        mx.eval(rows[-1])
    kind = OracleSelector if choice.name == "oracle" else GateSelector
    return kind(rows, manifest.activation, manifest.quantization, keep)
