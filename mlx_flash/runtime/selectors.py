"""Selectors decide, from a layer's FFN input, which neurons this token uses.

A selector is called with the FFN input flattened to [tokens, d_model] and returns a ``Selection``:
sorted unique neuron ids (numpy int64) and, when it computed them exactly, the activations of the
gate. For several tokens at once (a batch of sequences decoding together) the ids are the union over
the tokens, so every sequence gets every neuron any of them needs.

- ``dense``: every neuron (exact; the paper's naive baseline when the buffer is
  smaller than the FFN).
- ``predictor`` (the paper): per layer a low-rank network trained at conversion predicts which
  neurons will be active; those above a per-layer cut calibrated on held-back text are selected. Its
  weights stay in DRAM.
- ``gate`` (training-free, gated FFNs only): the gate matrix stays in DRAM (a third of the FFN's
  bytes), act(gate) is computed exactly and neurons with |act(gate)| above the layer's threshold for
  the target sparsity are selected; only their up rows and down columns stream, and the FFN reuses
  the exact gate values, so the buffers hold no gate rows.
- ``auto``: the gate selector for calibrated gated FFNs when the budget can hold the gate rows; else
  the predictor when the conversion trained one for the asked sparsity; else dense. The README's
  sparsity section has the measurements behind this order.

Thresholds come from the per-layer quantiles recorded at calibration (``calibration.py``), for the
target ``sparsity`` (share of neurons skipped per token). For ReLU-family FFNs "active" means
non-zero (threshold 0) unless calibration asked for more; the predictor learns that threshold, so
another run-time sparsity needs a re-calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

import mlx.core as mx
import numpy as np

from .adapters import ACTIVATIONS
from .calibration import Calibration, Predictors, read_predictors
from .errors import OptionError
from .ffn import project_in
from .manifest import Manifest, part_bytes
from .store import StoreReader

GATE_PARTS = ("gate", "gate.scales", "gate.biases", "gate_bias")
RECALIBRATE = "re-run python -m mlx_flash.convert.calibrate DIR"


class Selection(NamedTuple):
    """What a selector chose for one layer and call."""

    ids: np.ndarray  # sorted unique neuron ids, the union over the call's tokens
    gate: mx.array | None = None  # exact act(gate) of every neuron, [tokens, d_ffn], if computed


class Selector(Protocol):
    """What the runtime asks of a selector."""

    name: str  # as users name it ("gate", ...)
    nbytes: int  # DRAM it holds (counted in the memory plan)
    needs_input: bool  # whether it reads x (a selector that does not takes every neuron)
    exact_gate: bool  # whether its selections carry exact act(gate) (buffers then skip gate rows)

    def __call__(self, layer: int, x: mx.array) -> Selection: ...


def _union(mask: mx.array) -> np.ndarray:
    """Ids of the columns of a [tokens, d_ffn] boolean mask that are set for any token."""
    return np.flatnonzero(np.array(mx.any(mask, axis=0))).astype(np.int64)


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


class GateSelector:
    """|act(gate)| above a per-layer threshold, with the gate matrices in DRAM.

    ``gates[layer]`` holds the layer's gate parts ("gate", and for quantized stores "gate.scales"
    and "gate.biases"; "gate_bias" if the model has one) as [d_ffn, width] arrays.
    """

    name = "gate"
    needs_input = True
    exact_gate = True

    def __init__(
        self,
        gates: list[dict[str, mx.array]],
        activation: str,
        quantization,
        thresholds: list[float],
    ):
        self._gates, self._act, self._quant = gates, ACTIVATIONS[activation], quantization
        self.thresholds = thresholds
        self.nbytes = sum(a.nbytes for parts in gates for a in parts.values())

    def __call__(self, layer: int, x: mx.array) -> Selection:
        gate = self._act(project_in(x, self._gates[layer], "gate", self._quant))
        return Selection(_union(mx.abs(gate) > self.thresholds[layer]), gate)


class PredictorSelector:
    """Neurons whose predicted logit is above the layer's calibrated cut
    (``convert/predictor.py``)."""

    name = "predictor"
    needs_input = True
    exact_gate = False

    def __init__(self, predictors: Predictors):
        self._predictors = predictors
        self.nbytes = predictors.nbytes

    def __call__(self, layer: int, x: mx.array) -> Selection:
        p = self._predictors
        return Selection(_union(p.logits(layer, x.astype(p.bias[layer].dtype)) > p.cut[layer]))


def choose(
    name: str,
    manifest: Manifest,
    calibration: Calibration | None,
    sparsity: float | None,
    gate_fits: bool,
) -> str:
    """The concrete selector ``name`` stands for ("auto" picks; the others are checked).

    ``gate_fits``: whether the budget can hold the gate matrix; when it cannot, "auto" passes over
    the gate selector.
    """
    predictor = manifest.extra.get("predictor") or {}
    predictor_ok = bool(predictor) and sparsity in (None, predictor.get("sparsity"))
    if name == "auto":
        if manifest.gated and calibration is not None and gate_fits:
            return "gate"
        return "predictor" if predictor_ok else "dense"
    if name == "gate":
        if not manifest.gated:
            raise OptionError(
                "the gate selector needs a gated FFN (SwiGLU/GeGLU); this model has none"
            )
        if calibration is None:
            raise OptionError(f"the gate selector needs calibration thresholds ({RECALIBRATE})")
    if name == "predictor" and not predictor_ok:
        if not predictor:
            raise OptionError(f"this model has no trained predictors ({RECALIBRATE})")
        raise OptionError(
            f"the predictors were trained for sparsity {predictor.get('sparsity')}, not {sparsity} "
            f"({RECALIBRATE} --sparsity {sparsity})"
        )
    return name


def holds_bytes(name: str, manifest: Manifest, itemsize: int) -> int:
    """DRAM the selector ``name`` will hold, known before building it."""
    if name == "gate":
        return manifest.n_layers * manifest.d_ffn * gate_row_bytes(manifest, itemsize)
    if name == "predictor":
        ranks = manifest.extra["predictor"]["ranks"]
        return (
            sum((manifest.d_model + manifest.d_ffn) * r + manifest.d_ffn for r in ranks) * itemsize
        )
    return 0


def gate_row_bytes(manifest: Manifest, itemsize: int) -> int:
    """Bytes of one neuron's gate parts in memory."""
    parts = manifest.layers[0].parts()
    return sum(part_bytes(p, itemsize) for p in parts if p.name in GATE_PARTS)


def build(
    name: str,
    directory: Path,
    manifest: Manifest,
    calibration: Calibration | None,
    reader: StoreReader,
    dtype: mx.Dtype,
    sparsity: float | None,
) -> Selector:
    """The selector ``name`` (as ``choose`` returned it) for a flash model directory."""
    if name == "dense":
        return DenseSelector(manifest.d_ffn)
    if name == "predictor":
        return PredictorSelector(read_predictors(directory, manifest).astype(dtype))
    sparsity = calibration.sparsity if sparsity is None else sparsity
    thresholds = [calibration.threshold(i, sparsity, of="gate") for i in range(manifest.n_layers)]
    gates = []
    for layer in range(manifest.n_layers):
        parts = reader.read_layer(layer, GATE_PARTS)
        gates.append(
            {
                k: mx.array(v) if v.dtype == np.uint32 else mx.array(v).astype(dtype)
                for k, v in parts.items()
            }
        )
        mx.eval(gates[-1])
    return GateSelector(gates, manifest.activation, manifest.quantization, thresholds)
