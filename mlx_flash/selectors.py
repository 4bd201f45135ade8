"""Selectors decide, from a layer's FFN input, which neurons this token uses.

A selector is called with the FFN input flattened to [tokens, d_model] and returns sorted unique
neuron ids (numpy int64). For several tokens at once (a batch of sequences decoding together) the
ids are the union over the tokens, so every sequence gets every neuron any of them needs.

- ``dense``: every neuron (exact; the paper's naive baseline when the buffer is smaller than the FFN).
- ``predictor`` (the paper): per layer a low-rank network trained at conversion predicts which
  neurons will be active; those above a per-layer cut calibrated on held-back text are selected. Costs
  its weights in DRAM (under 2.5% of a 7B model in the paper; small models pay a larger share).
- ``gate`` (training-free, gated FFNs only, as in CATS/TEAL): the gate matrix stays in DRAM (a third
  of the FFN weights: 106 MB for SmolLM2-135M in float32, counted in the budget), act(gate) is
  computed exactly and neurons with |act(gate)| above the layer's threshold for the target sparsity
  are selected; up/down stream only for those, and the FFN reuses
  the exact gate values, so the buffers hold no gate rows (each buffered neuron costs 2/3 as much).
- ``auto``: the gate selector for calibrated gated FFNs when the budget can hold the gate rows; else
  the predictor when the conversion trained one for the asked sparsity; else dense. Measured on
  SmolLM2-135M (SwiGLU, WikiText-2 raw test, 4 windows of 256 tokens, k=4): at sparsity 0.5 the gate
  selector costs +7.0% perplexity, the predictor +31% (held-back recall 0.69: a low-rank map of the
  FFN input cannot tell which |silu(g)*u| are large as well as the exact gate does). On relu2-8m
  (exact zeros) the predictor is within 0.03% of dense.

Thresholds come from the per-layer quantiles recorded at conversion (``mlx_flash.calibration``), for
the target ``sparsity`` (share of neurons skipped per token). For ReLU-family FFNs "active" means
non-zero (threshold 0) unless the conversion's ``--sparsity`` asked for more; the predictor learns
that threshold, so another run-time sparsity needs a re-calibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import mlx.core as mx
import numpy as np

from .adapters import ACTIVATIONS
from .calibration import Calibration, Predictors, read_calibration, read_predictors
from .errors import FlashError
from .flash_ffn import project_in
from .manifest import Manifest
from .store import StoreReader

SELECTORS = ("auto", "dense", "gate", "predictor")
GATE_PARTS = ("gate", "gate.scales", "gate.biases", "gate_bias")


class Selector(Protocol):
    needs_input: bool  # whether the selector reads x (forces evaluation of the layer input)

    def __call__(self, layer: int, x: mx.array) -> np.ndarray: ...


def _union(mask: mx.array) -> np.ndarray:
    """Ids of the columns of a [tokens, d_ffn] boolean mask that are set for any token."""
    return np.flatnonzero(np.array(mx.any(mask, axis=0))).astype(np.int64)


class DenseSelector:
    """Every neuron: the exact FFN. With a buffer smaller than the FFN it streams the whole FFN each
    token, which is the paper's naive baseline."""

    name = "dense"
    needs_input = False
    nbytes = 0

    def __init__(self, d_ffn: int):
        self._all = np.arange(d_ffn, dtype=np.int64)

    def __call__(self, layer: int, x: mx.array) -> np.ndarray:
        return self._all


class FixedSelector:
    """Ids chosen by a function of (layer, x) — for tests and experiments that inject selections."""

    name = "fixed"
    needs_input = True
    nbytes = 0

    def __init__(self, choose: Callable[[int, mx.array], np.ndarray]):
        self._choose = choose

    def __call__(self, layer: int, x: mx.array) -> np.ndarray:
        return np.unique(np.asarray(self._choose(layer, x), dtype=np.int64))


class GateSelector:
    """|act(gate)| above a per-layer threshold, with the gate matrices in DRAM (see the module docstring).

    ``gates[layer]`` holds the layer's gate parts ("gate", and for quantized stores "gate.scales" and
    "gate.biases"; "gate_bias" if the model has one) as [d_ffn, width] arrays. FlashFFN calls
    ``activations`` once and hands the result to ``select`` and to the FFN (``supplies_gate``).
    """

    name = "gate"
    needs_input = True
    supplies_gate = True

    def __init__(
        self,
        gates: list[dict[str, mx.array]],
        activation: str,
        quantization,
        thresholds: list[float],
    ):
        self._gates, self._act, self._quant = gates, ACTIVATIONS[activation], quantization
        self.thresholds = thresholds

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for parts in self._gates for a in parts.values())

    def activations(self, layer: int, x: mx.array) -> mx.array:
        """act(gate) of every neuron of ``layer`` for the tokens of ``x``: [tokens, d_ffn]."""
        return self._act(project_in(x, self._gates[layer], "gate", self._quant))

    def select(self, layer: int, gate: mx.array) -> np.ndarray:
        return _union(mx.abs(gate) > self.thresholds[layer])

    def __call__(self, layer: int, x: mx.array) -> np.ndarray:
        return self.select(layer, self.activations(layer, x))


class PredictorSelector:
    """Neurons whose predicted logit is above the layer's calibrated cut (see ``convert/predictor.py``)."""

    name = "predictor"
    needs_input = True

    def __init__(self, predictors: Predictors):
        self._predictors = predictors

    @property
    def nbytes(self) -> int:
        return self._predictors.nbytes

    def __call__(self, layer: int, x: mx.array) -> np.ndarray:
        p = self._predictors
        return _union(p.logits(layer, x.astype(p.bias[layer].dtype)) > p.cut[layer])


def read_gates(
    reader: StoreReader, manifest: Manifest, dtype: mx.Dtype
) -> list[dict[str, mx.array]]:
    """Every layer's gate parts from the store, in ``dtype`` (packed quantized words stay uint32)."""
    gates = []
    ids = np.arange(manifest.d_ffn)
    for layer in manifest.layers:
        dest = {
            p.name: np.zeros(
                (manifest.d_ffn, p.length), np.uint32 if p.dtype == "uint32" else np.float32
            )
            for r in layer.regions
            for p in r.parts
            if p.name in GATE_PARTS
        }
        reader.read_neurons(layer.index, ids, dest, ids)
        gates.append(
            {
                k: mx.array(v) if v.dtype == np.uint32 else mx.array(v).astype(dtype)
                for k, v in dest.items()
            }
        )
    mx.eval(gates)
    return gates


def resolve(
    name: str,
    manifest: Manifest,
    calibration: Calibration | None,
    predictor_sparsity: float | None,
    has_predictor: bool,
    sparsity: float | None,
    gate_fits: bool = True,
) -> str:
    """The concrete selector ``name`` stands for ("auto" picks; the others are checked). ``gate_fits``: whether
    the budget can hold the gate matrix; when it cannot, "auto" passes over the gate selector."""
    if name not in SELECTORS:
        raise FlashError(f"unknown selector {name!r} (available: {', '.join(SELECTORS)})")
    predictor_ok = has_predictor and (sparsity is None or sparsity == predictor_sparsity)
    if name == "auto":  # measured: see the module docstring
        if manifest.gated and calibration is not None and gate_fits:
            return "gate"
        return "predictor" if predictor_ok else "dense"
    recalibrate = "re-run python -m mlx_flash.convert.calibrate DIR"
    if name == "gate":
        if not manifest.gated:
            raise FlashError(
                "the gate selector needs a gated FFN (SwiGLU/GeGLU); this model has none"
            )
        if calibration is None:
            raise FlashError(
                f"the gate selector needs calibration thresholds; this model has none ({recalibrate})"
            )
    if name == "predictor" and not predictor_ok:
        if not has_predictor:
            raise FlashError(f"this model has no trained predictors ({recalibrate})")
        raise FlashError(
            f"the predictors were trained for sparsity {predictor_sparsity}, not {sparsity} "
            f"({recalibrate} --sparsity {sparsity})"
        )
    return name


def make_selector(
    name: str,
    directory: Path,
    manifest: Manifest,
    reader: StoreReader,
    dtype: mx.Dtype,
    sparsity: float | None = None,
) -> Selector:
    """Build the selector ``name`` for a flash model directory; ``sparsity`` None means the conversion's."""
    calibration = read_calibration(directory, manifest)
    meta = manifest.extra.get("predictor") or {}
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise FlashError(f"sparsity must be in [0, 1), got {sparsity}")
    name = resolve(name, manifest, calibration, meta.get("sparsity"), bool(meta), sparsity)
    if name == "dense":
        return DenseSelector(manifest.d_ffn)
    if name == "predictor":
        return PredictorSelector(read_predictors(directory, manifest).astype(dtype))
    if sparsity is None:
        sparsity = calibration.sparsity
    thresholds = [calibration.threshold(i, sparsity, of="gate") for i in range(manifest.n_layers)]
    return GateSelector(
        read_gates(reader, manifest, dtype), manifest.activation, manifest.quantization, thresholds
    )
