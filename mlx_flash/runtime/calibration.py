"""What conversion measured about a model's FFN activations, as stored in its flash model directory.

``python -m mlx_flash.convert`` runs the dense model over calibration text (convert/calibrate.py)
and keeps, per layer, how often each neuron was active and quantiles of the activation
magnitudes, the per-layer sparsities that reach each global target at the least cost, the
proxy (``proxy.py``), the low-rank predictors of ReLU-family FFNs, and the quality guard: the
perplexity change each selector's operating points cost on held-back calibration text. The
runtime reads them back: thresholds from the quantiles, pinned neurons from the frequencies,
``auto`` from the quality guard. Arrays live in safetensors files; the manifest's ``extra``
names them and carries the small facts.

Terms: a neuron's activation is ``h = act(gate)*up`` (gated FFNs) or ``act(up)``; it is *active* for
a token when ``|h|`` is above the layer's threshold: 0 for ReLU-family FFNs (exact zeros) unless a
sparsity is asked for, else the quantile of ``|h|`` at the target sparsity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import FlashFormatError
from .files import atomic_path
from .manifest import Manifest

CALIBRATION_FILE = "calibration.safetensors"
PREDICTOR_FILE = "predictors.safetensors"
# quantile levels; fine steps so thresholds near 0.99 are exact
LEVELS = np.linspace(0.0, 1.0, 1001)
NATURAL_ACTIVATIONS = ("relu", "relu2")  # exact zeros: active means h != 0


def natural_zeros(manifest: Manifest) -> bool:
    """Whether the FFN has exact zeros (ReLU family, no gate), so threshold 0 is a real sparsity."""
    return not manifest.gated and manifest.activation in NATURAL_ACTIVATIONS


def default_sparsity(manifest: Manifest) -> float | None:
    """The conversion target when none is given: natural zeros for ReLU-family FFNs, else 0.5."""
    return None if natural_zeros(manifest) else 0.5


@dataclass
class Calibration:
    """Per-layer activation statistics (arrays are [layers, ...]); ``sparsity`` None means
    natural zeros."""

    # [layers, d_ffn]: share of calibration tokens on which each neuron was active
    frequency: np.ndarray
    magnitude: np.ndarray  # [layers, levels]: quantiles of |h|, pooled over tokens and neurons
    gate: np.ndarray | None  # [layers, levels]: quantiles of |act(gate)| (gated FFNs only)
    zero_fraction: np.ndarray  # [layers]: share of activations exactly zero
    sparsity: float | None
    tokens: int
    # [targets, layers]: per-layer sparsities whose mean is each of ``targets`` (global sparsities)
    allocation: np.ndarray | None = None
    targets: np.ndarray | None = None

    def layer_sparsities(self, sparsity: float, n_layers: int) -> np.ndarray:
        """Each layer's sparsity for the global ``sparsity``: the stored allocation (interpolated
        between its targets), else the same for every layer."""
        if self.allocation is None or not self.targets.min() <= sparsity <= self.targets.max():
            return np.full(n_layers, sparsity)
        return np.array([np.interp(sparsity, self.targets, col) for col in self.allocation.T])

    def threshold(self, layer: int, sparsity: float | None, of: str = "magnitude") -> float:
        """|h| (or |act(gate)| with ``of="gate"``) above which a neuron counts as active at
        ``sparsity``."""
        if sparsity is None:
            return 0.0
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        table = self.magnitude if of == "magnitude" else self.gate
        if table is None:
            raise ValueError("this calibration has no gate quantiles (the FFN has no gate)")
        return float(np.interp(sparsity, LEVELS, table[layer]))


def selection_frequency(
    manifest: Manifest, calibration: Calibration, name: str, sparsity: float | None
) -> tuple[np.ndarray, str]:
    """Per layer and neuron, the chance that selector ``name`` at global ``sparsity`` (None: the
    calibration's own) selects it on a token, and where that came from: calibration's activation
    frequencies, scaled to the kept share."""
    trained = manifest.extra.get("predictor", {})
    if name == "predictor" and "predicted" in trained:  # it keeps more than is active (recall ~1)
        over = np.array(trained["predicted"]) / np.maximum(np.array(trained["active"]), 1e-9)
        note = "calibration frequencies scaled by the predictors' predicted/active share"
        return np.clip(calibration.frequency * over[:, None], 0.0, 1.0), note
    base = None if name == "predictor" else calibration.sparsity
    if sparsity is None or base is None or sparsity == base:
        return calibration.frequency, f"calibration frequencies ({sparsity_words(base)})"
    scale = (1.0 - sparsity) / (1.0 - base)
    note = f"calibration frequencies at sparsity {base:g}, scaled to {sparsity:g}"
    return np.clip(calibration.frequency * scale, 0.0, 1.0), note


@dataclass
class Predictors:
    """Per layer ``logits = (x @ w_in) @ w_out + bias``; a neuron is predicted active where
    ``logits > cut`` (``cut`` 0 is probability 0.5; conversion calibrates it per layer)."""

    w_in: list[mx.array]  # [d_model, rank]
    w_out: list[mx.array]  # [rank, d_ffn]
    bias: list[mx.array]  # [d_ffn]
    cut: list[float]

    @property
    def ranks(self) -> list[int]:
        return [w.shape[1] for w in self.w_in]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for group in (self.w_in, self.w_out, self.bias) for a in group)

    def logits(self, layer: int, x: mx.array) -> mx.array:
        return (x @ self.w_in[layer]) @ self.w_out[layer] + self.bias[layer]

    def astype(self, dtype: mx.Dtype) -> Predictors:
        cast = lambda arrays: [a.astype(dtype) for a in arrays]  # noqa: E731
        return Predictors(cast(self.w_in), cast(self.w_out), cast(self.bias), self.cut)


def save_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    """Write a safetensors file atomically."""
    with atomic_path(path) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata={"format": "mlx_flash"})


def save_calibration(
    directory: Path,
    manifest: Manifest,
    calibration: Calibration,
    predictors: Predictors | None,
    info: dict,
) -> Manifest:
    """Write the arrays, then the manifest whose ``extra`` points at them; returns that manifest.

    ``info`` holds the facts worth reading without the arrays (text, per-layer predictor quality).
    """
    directory = Path(directory)
    arrays = {
        "frequency": calibration.frequency,
        "magnitude": calibration.magnitude,
        "zero_fraction": calibration.zero_fraction,
    }
    if calibration.gate is not None:
        arrays["gate"] = calibration.gate
    if calibration.allocation is not None:
        arrays["allocation"], arrays["targets"] = calibration.allocation, calibration.targets
    save_arrays(
        directory / CALIBRATION_FILE, {k: mx.array(v.astype(np.float32)) for k, v in arrays.items()}
    )
    extra = dict(manifest.extra)
    extra["calibration"] = {
        "file": CALIBRATION_FILE,
        "sparsity": calibration.sparsity,
        "tokens": calibration.tokens,
        "levels": len(LEVELS),
        **info.get("calibration", {}),
    }
    for key in ("predictor", "proxy", "quality", "allocation"):
        extra.pop(key, None)
    extra.update({k: v for k, v in info.items() if k in ("proxy", "quality", "allocation")})
    if predictors is not None:
        weights = {}
        for i in range(len(predictors.w_in)):
            weights[f"{i}.w_in"], weights[f"{i}.w_out"] = predictors.w_in[i], predictors.w_out[i]
            weights[f"{i}.bias"] = predictors.bias[i]
            weights[f"{i}.cut"] = mx.array([predictors.cut[i]], dtype=mx.float32)
        save_arrays(directory / PREDICTOR_FILE, weights)
        extra["predictor"] = {
            "file": PREDICTOR_FILE,
            "sparsity": calibration.sparsity,
            "ranks": predictors.ranks,
            "bytes": predictors.nbytes,
            **info.get("predictor", {}),
        }
    elif (directory / PREDICTOR_FILE).exists():
        (directory / PREDICTOR_FILE).unlink()
    manifest = dataclasses.replace(manifest, extra=extra)
    manifest.save(directory)
    return manifest


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FlashFormatError(f"{path}: missing (the manifest names it); re-run the calibration")
    try:
        return dict(mx.load(str(path)))
    except (RuntimeError, ValueError) as e:
        raise FlashFormatError(f"{path}: cannot read ({e})") from e


def read_calibration(directory: Path, manifest: Manifest) -> Calibration | None:
    """The stored calibration, or None if the model was converted without one."""
    meta = manifest.extra.get("calibration")
    if not meta:
        return None
    path = Path(directory) / meta["file"]
    arrays = {k: np.array(v) for k, v in _load_arrays(path).items()}
    calibration = Calibration(
        arrays["frequency"],
        arrays["magnitude"],
        arrays.get("gate"),
        arrays["zero_fraction"],
        meta.get("sparsity"),
        int(meta.get("tokens", 0)),
        arrays.get("allocation"),
        arrays.get("targets"),
    )
    if calibration.frequency.shape != (
        manifest.n_layers,
        manifest.d_ffn,
    ) or calibration.magnitude.shape[1] != len(LEVELS):
        raise FlashFormatError(f"{path}: shapes do not match the manifest (re-run the calibration)")
    return calibration


def read_predictors(directory: Path, manifest: Manifest) -> Predictors | None:
    """The stored predictors (as saved, float16), or None if none were trained."""
    meta = manifest.extra.get("predictor")
    if not meta:
        return None
    path = Path(directory) / meta["file"]
    arrays = _load_arrays(path)
    try:
        layers = range(manifest.n_layers)
        predictors = Predictors(
            [arrays[f"{i}.w_in"] for i in layers],
            [arrays[f"{i}.w_out"] for i in layers],
            [arrays[f"{i}.bias"] for i in layers],
            [arrays[f"{i}.cut"].item() for i in layers],
        )
    except KeyError as e:
        raise FlashFormatError(f"{path}: no predictor {e} (re-run the calibration)") from e
    if any(w.shape[0] != manifest.d_model for w in predictors.w_in) or any(
        b.shape != (manifest.d_ffn,) for b in predictors.bias
    ):
        raise FlashFormatError(f"{path}: predictor shapes do not match the manifest")
    return predictors


def sparsity_words(sparsity: float | None) -> str:
    """A sparsity target as messages name it (None: the predictor's natural zeros)."""
    return "natural zeros" if sparsity is None else f"sparsity {sparsity:g}"


@dataclass(frozen=True)
class OperatingPoint:
    """A selector setting whose cost in quality calibration measured: the perplexity change
    (``loss``, 0.012 = +1.2%) on held-back calibration text."""

    selector: str
    sparsity: float | None  # global target (None: the predictor's natural zeros)
    compute_rows: str
    window: int
    loss: float
    # mean share of a layer's neurons multiplied per token (resident rows: the window's union, which
    # the loss assumes the buffers hold); None in calibrations older than the field
    rows_share: float | None = None


def operating_points(manifest: Manifest) -> list[OperatingPoint]:
    """The quality guard's measurements stored in the manifest (none for older calibrations)."""
    points = (manifest.extra.get("quality") or {}).get("points", [])
    return [OperatingPoint(**p) for p in points]
