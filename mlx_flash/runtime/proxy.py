"""The proxy: a low-bit copy of every layer's gate and up matrices, to rank neurons cheaply.

Why: the neurons a token needs most are those with the largest |act(gate)·up| (for an FFN without a
gate, |act(up)|); the exact matrices are two thirds of the FFN, far too much to keep in DRAM, but an
affine low-bit copy ranks neurons almost as well for a small fraction of the bytes (README,
Sparsity). Activation outliers (a few input channels with huge values) spoil a plain low-bit copy:
those channels are kept aside in float16: the channels whose mean |x| on calibration text is more
than ``OUTLIER_RATIO`` times the layer's median, at most ``keep`` of them.

The copy lives in ``proxy.safetensors`` (named in the manifest's ``extra``, with its sha256). Per
layer: ``{i}.w`` (packed words of [gate rows; up rows], one quantized matrix so one matmul scores
both), ``{i}.scales``, ``{i}.biases``, and with ``keep`` > 0 ``{i}.keep`` (channel ids) and
``{i}.kept`` (those columns of [gate; up], float16).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .adapters import ACTIVATIONS
from .calibration import save_arrays
from .errors import FlashFormatError, OptionError

PROXY_FILE = "proxy.safetensors"
OUTLIER_RATIO = 16.0
BITS, GROUPS = (2, 3, 4, 5, 6, 8), (32, 64, 128)  # what MLX's affine quantization offers


@dataclass(frozen=True)
class ProxyFormat:
    """How the copy is compressed: affine ``bits`` with groups of ``group_size`` along d_model,
    and at most ``keep`` outlier input channels per layer in float16."""

    bits: int
    group_size: int
    keep: int = 0

    @property
    def name(self) -> str:
        return f"q{self.bits}g{self.group_size}" + (f"+keep{self.keep}" if self.keep else "")

    @classmethod
    def parse(cls, name: str) -> ProxyFormat:
        """The format ``name`` says ("q4g64", "q4g64+keep8")."""
        match = re.fullmatch(r"q(\d+)g(\d+)(?:\+keep(\d+))?", name.strip())
        if not match or int(match[1]) not in BITS or int(match[2]) not in GROUPS:
            raise OptionError(
                f"proxy format {name!r}: expected qBITSgGROUP[+keepN] with bits in {BITS} and "
                f"group in {GROUPS} (e.g. q4g64+keep8)"
            )
        return cls(int(match[1]), int(match[2]), int(match[3] or 0))

    def nbytes(self, rows: int, d_model: int, itemsize: int = 2) -> int:
        """Bytes of one layer's copy of ``rows`` rows (gate and up together), its scales, biases
        and kept columns held with ``itemsize`` bytes (per-neuron biases not counted)."""
        packed = rows * d_model * self.bits // 8
        groups = rows * (d_model // self.group_size) * 2 * itemsize
        return packed + groups + self.keep * (rows * itemsize + 4)


def compress(
    rows: mx.array,
    fmt: ProxyFormat,
    channels: np.ndarray | None = None,
    bias: mx.array | None = None,
) -> dict[str, mx.array]:
    """The copy of ``rows`` ([gate; up] as floats, [n, d_model]). ``channels``: the layer's outlier
    input channels, largest first (``outliers``; at most ``fmt.keep`` are kept aside); ``bias``:
    [gate bias; up bias]."""
    arrays: dict[str, mx.array] = {}
    rows = rows.astype(mx.float32)
    if fmt.keep and channels is not None and len(channels):
        ids = np.sort(np.asarray(channels)[: fmt.keep]).astype(np.uint32)
        arrays["keep"], arrays["kept"] = mx.array(ids), rows[:, mx.array(ids)].astype(mx.float16)
        aside = np.zeros(rows.shape[1], dtype=bool)
        aside[ids] = True
        rows = mx.where(mx.array(aside), 0.0, rows)
    w, scales, biases = mx.quantize(rows, fmt.group_size, fmt.bits)
    arrays.update(w=w, scales=scales.astype(mx.float16), biases=biases.astype(mx.float16))
    if bias is not None:
        arrays["bias"] = bias.astype(mx.float16)
    return arrays


def outliers(mean_abs_x: np.ndarray, ratio: float = OUTLIER_RATIO) -> np.ndarray:
    """Input channels whose mean |x| is more than ``ratio`` times the median, largest first."""
    median = float(np.median(mean_abs_x))
    big = np.flatnonzero(mean_abs_x > ratio * max(median, 1e-30))
    return big[np.argsort(-mean_abs_x[big])]


@dataclass
class Proxy:
    """Every layer's copy (``layers[i]`` as ``compress`` made it), for an FFN that is ``gated`` or
    not, with its activation. Biases of the gate and up rows, if the model has them, are exact."""

    fmt: ProxyFormat
    layers: list[dict[str, mx.array]]
    activation: str
    gated: bool
    # dequantize each call and multiply in float: the same scores up to rounding, and faster for
    # thousands of tokens at calibration, where MLX's CPU quantized matmul is slow
    unpack: bool = False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for arrays in self.layers for a in arrays.values())

    def astype(self, dtype: mx.Dtype) -> Proxy:
        """The copy with its float parts (scales, biases, kept columns) in ``dtype``."""
        cast = [
            {k: v if v.dtype == mx.uint32 else v.astype(dtype) for k, v in arrays.items()}
            for arrays in self.layers
        ]
        return Proxy(self.fmt, cast, self.activation, self.gated, self.unpack)

    def scores(self, layer: int, x: mx.array) -> mx.array:
        """|act(g~x)·(u~x)| (gated) or |act(u~x)| of every neuron, [tokens, d_ffn]."""
        p, fmt = self.layers[layer], self.fmt
        if self.unpack:  # dequantized on the fly (``unpack``)
            w = mx.dequantize(p["w"], p["scales"], p["biases"], fmt.group_size, fmt.bits)
            y = x @ w.astype(x.dtype).T
        else:
            y = mx.quantized_matmul(
                x,
                p["w"],
                p["scales"],
                p["biases"],
                transpose=True,
                group_size=fmt.group_size,
                bits=fmt.bits,
            )
        if "keep" in p:
            y = y + x[..., p["keep"]] @ p["kept"].T
        if "bias" in p:
            y = y + p["bias"]
        act = ACTIVATIONS[self.activation]
        if not self.gated:
            return mx.abs(act(y))
        gate, up = mx.split(y, 2, axis=-1)
        return mx.abs(act(gate) * up)


def save_proxy(directory: Path, proxy: Proxy) -> dict:
    """Write the copy atomically; the manifest entry that names it (file, format, bytes, sha256)."""
    arrays = {f"{i}.{k}": v for i, layer in enumerate(proxy.layers) for k, v in layer.items()}
    path = Path(directory) / PROXY_FILE
    save_arrays(path, arrays)
    return {
        "file": PROXY_FILE,
        "bits": proxy.fmt.bits,
        "group_size": proxy.fmt.group_size,
        "keep": proxy.fmt.keep,
        "bytes": proxy.nbytes,
        "sha256": file_digest(path),
    }


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_proxy(directory: Path, meta: dict, n_layers: int, activation: str, gated: bool) -> Proxy:
    """The copy a manifest's ``extra["proxy"]`` names; a missing or damaged file names itself."""
    path = Path(directory) / meta["file"]
    if not path.is_file():
        raise FlashFormatError(f"{path}: missing (the manifest names it); re-run the calibration")
    try:
        arrays = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise FlashFormatError(f"{path}: cannot read ({e})") from e
    layers: list[dict[str, mx.array]] = [{} for _ in range(n_layers)]
    for name, value in arrays.items():
        index, _, key = name.partition(".")
        if not index.isdigit() or int(index) >= n_layers:
            raise FlashFormatError(f"{path}: unexpected tensor {name!r}")
        layers[int(index)][key] = value
    if any("w" not in layer for layer in layers):
        raise FlashFormatError(f"{path}: a layer's copy is missing; re-run the calibration")
    fmt = ProxyFormat(meta["bits"], meta["group_size"], meta.get("keep", 0))
    return Proxy(fmt, layers, activation, gated)
