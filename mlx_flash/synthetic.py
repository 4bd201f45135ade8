"""Synthetic stores at real shapes, with random weights, for ``mlx_flash.bench --synthetic``: MoE
experts (``Shape``) and dense FFN neurons (``DenseShape``).

Why: what streaming costs is set by the record size, the records and layers, the routing or
selection and the disk, not by what the weights say; a store laid out as the converter lays out a
real model measures it without the model. FFN only: no trunk (attention, embeddings, head) is
written. Built once into the cache (``$MLX_FLASH_CACHE/synthetic/NAME``, ``NAME-unbundled`` for the
dense stores' other layout), with a free-space check, and reused while its manifest and size match.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .convert.writer import StoreWriter
from .runtime.errors import FlashError, FlashFormatError
from .runtime.files import cache_root, staged
from .runtime.manifest import (
    EXPERT_LINEARS,
    MANIFEST_FILE,
    STORE_FILE,
    ExpertLayer,
    LinearQuant,
    Manifest,
    MoELayout,
    Quantization,
    read_manifest,
)
from .runtime.sizes import format_size


@dataclass(frozen=True)
class Shape:
    """A MoE model's expert geometry: affine-quantized experts, bfloat16 scales and biases."""

    model_type: str
    layers: int
    n_experts: int
    top_k: int
    d_model: int
    d_expert: int
    bits: int = 4
    group_size: int = 64

    def part_shapes(self) -> dict[str, tuple[int, ...]]:
        """One expert's tensors as mlx-lm's QuantizedSwitchLinear holds them."""
        shapes = {}
        for linear in EXPERT_LINEARS:
            rows, cols = (self.d_model, self.d_expert) if linear == "down_proj" else (
                self.d_expert, self.d_model
            )  # fmt: skip
            shapes[f"{linear}.weight"] = (rows, cols * self.bits // 32)
            shapes[f"{linear}.scales"] = (rows, cols // self.group_size)
            shapes[f"{linear}.biases"] = (rows, cols // self.group_size)
        return shapes

    @property
    def record_bytes(self) -> int:
        return sum(
            4 * r * c if n.endswith("weight") else 2 * r * c
            for n, (r, c) in self.part_shapes().items()
        )

    @property
    def layer_bytes(self) -> int:
        return self.n_experts * self.record_bytes

    @property
    def store_bytes(self) -> int:
        return self.layers * self.layer_bytes


@dataclass(frozen=True)
class DenseShape:
    """A dense model's gated (SwiGLU) FFN: float16 records (gate row, up row, down column), or
    affine-quantized ones (``bits``, float16 scales and biases), as the converter writes them."""

    model_type: str
    layers: int
    d_model: int
    d_ffn: int
    bits: int | None = None
    group_size: int = 64

    def parts(self) -> dict[str, tuple[int, str]]:
        """One neuron's record parts: (elements, dtype)."""
        if self.bits is None:
            return {name: (self.d_model, "float16") for name in ("gate", "up", "down")}
        packed, groups = self.d_model * self.bits // 32, self.d_model // self.group_size
        return {
            f"{name}{suffix}": (groups, "float16") if suffix else (packed, "uint32")
            for name in ("gate", "up", "down")
            for suffix in ("", ".scales", ".biases")
        }

    @property
    def record_bytes(self) -> int:
        return sum(n * (4 if dtype == "uint32" else 2) for n, dtype in self.parts().values())

    @property
    def layer_bytes(self) -> int:
        return self.d_ffn * self.record_bytes

    @property
    def store_bytes(self) -> int:
        return self.layers * self.layer_bytes


SHAPES = {
    # Qwen3-30B-A3B: 48 layers, 128 experts, 8 per token, d_model 2048, expert width 768
    "qwen3-30b-a3b": Shape("qwen3_moe", 48, 128, 8, 2048, 768),
    # Llama-2-7B's FFN: 32 layers, d_model 4096, d_ffn 11008, SwiGLU (24 KiB per float16 neuron)
    "llama-2-7b": DenseShape("llama", 32, 4096, 11008),
    "llama-2-7b-q4": DenseShape("llama", 32, 4096, 11008, bits=4),
}


def synthetic_store(
    name: str,
    root: Path | None = None,
    progress: bool = True,
    log: Callable = print,
    layout: str = "bundled",
) -> Path:
    """The synthetic store ``name`` (see ``SHAPES``) in ``layout`` (dense stores: bundled or
    unbundled, the same bytes), built under ``root`` if not there yet."""
    if name not in SHAPES:
        raise FlashError(f"unknown synthetic model {name!r} (known: {', '.join(SHAPES)})")
    shape = SHAPES[name]
    suffix = "" if layout == "bundled" else f"-{layout}"
    directory = (root or cache_root() / "synthetic") / f"{name}{suffix}"
    if (directory / MANIFEST_FILE).is_file():
        try:
            manifest = read_manifest(directory)
            if (directory / STORE_FILE).stat().st_size == manifest.store_size:
                return directory
        except (FlashFormatError, OSError):
            pass  # damaged or half-removed: build it again
    _check_room(directory, shape, name)
    log(f"building the synthetic {name} store ({format_size(shape.store_bytes)}) in {directory}")
    with staged(directory, force=True) as tmp:
        if isinstance(shape, DenseShape):
            _write_dense(tmp, shape, name, progress, layout)
        else:
            _write(tmp, shape, name, progress)
    return directory


def _check_room(directory: Path, shape: Shape | DenseShape, name: str) -> None:
    """Refuse before writing when the disk cannot hold the store; say the largest that fits."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    need = shape.store_bytes + (1 << 30)
    if free < need:
        fits = max(0, (free - (1 << 30)) // shape.layer_bytes)
        raise FlashError(
            f"{existing}: the synthetic {name} store needs {format_size(need)} of free disk, "
            f"{format_size(free)} are free; the largest that fits has {fits} of {shape.layers} "
            "layers (no reduced shape is built: free some space)"
        )


def _write(tmp: Path, shape: Shape, name: str, progress: bool) -> None:
    """Random experts, layer by layer, then the manifest that describes them."""
    rng = np.random.default_rng(0)
    shapes = shape.part_shapes()
    quant = LinearQuant("affine", shape.bits, shape.group_size)
    entries, layers = [], []
    with open(tmp / STORE_FILE, "wb") as f:
        writer = StoreWriter(f, "bundled", 0)
        for i in tqdm(
            range(shape.layers), desc=f"synthetic {name}", unit="layer", disable=not progress
        ):
            vectors, dtypes = _random_layer(rng, shape.n_experts, shapes)
            prefix = f"model.layers.{i}.mlp.switch_mlp"
            entries.append(writer.write_layer(i, prefix, vectors, {}, dtypes))
            layers.append(ExpertLayer(i, shapes, dict.fromkeys(EXPERT_LINEARS, quant)))
    Manifest(
        model_type=shape.model_type,
        d_model=shape.d_model,
        d_ffn=shape.d_expert,
        gated=True,
        activation="swiglu",
        layout="bundled",
        dtype="bfloat16",
        align=0,
        store_file=STORE_FILE,
        store_size=(tmp / STORE_FILE).stat().st_size,
        layers=tuple(entries),
        source=f"synthetic {name} (random weights)",
        moe=MoELayout(shape.n_experts, shape.top_k, shape.d_expert, "swiglu", tuple(layers)),
    ).save(tmp)


def _random_layer(rng: np.random.Generator, n_experts: int, shapes: dict):
    """Random packed 4-bit words; bfloat16 scales near 0.01 and biases near -8 scales, so the
    weights are of a trained model's size."""
    vectors, dtypes = {}, {}
    for name, (rows, cols) in shapes.items():
        if name.endswith("weight"):
            vectors[name] = rng.integers(0, 2**32, (n_experts, rows * cols), dtype=np.uint32)
            dtypes[name] = "uint32"
            continue
        scale = rng.normal(0.01, 0.002, (n_experts, rows * cols)).astype(np.float32)
        value = scale if name.endswith("scales") else -8 * scale
        vectors[name] = (value.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits
        dtypes[name] = "bfloat16"
    return vectors, dtypes


def _write_dense(tmp: Path, shape: DenseShape, name: str, progress: bool, layout: str) -> None:
    """Random neurons, layer by layer (the same bytes in either layout), then the manifest."""
    rng = np.random.default_rng(0)
    parts = shape.parts()
    entries = []
    with open(tmp / STORE_FILE, "wb") as f:
        writer = StoreWriter(f, layout, 0)
        for i in tqdm(
            range(shape.layers), desc=f"synthetic {name}", unit="layer", disable=not progress
        ):
            vectors = {n: _random_part(rng, shape.d_ffn, n, k, t) for n, (k, t) in parts.items()}
            dtypes = {n: dtype for n, (_, dtype) in parts.items()}
            entries.append(writer.write_layer(i, f"model.layers.{i}.mlp", vectors, {}, dtypes))
    quant = None if shape.bits is None else Quantization(shape.bits, shape.group_size)
    Manifest(
        model_type=shape.model_type,
        d_model=shape.d_model,
        d_ffn=shape.d_ffn,
        gated=True,
        activation="silu",
        layout=layout,
        dtype="float16",
        align=0,
        store_file=STORE_FILE,
        store_size=(tmp / STORE_FILE).stat().st_size,
        layers=tuple(entries),
        quantization=quant,
        source=f"synthetic {name} (random weights, FFN only)",
    ).save(tmp)


def _random_part(rng: np.random.Generator, rows: int, name: str, length: int, dtype: str):
    """Random packed words, or float16 weights of a trained model's size (scales near 0.002 and
    biases near -8 scales for quantized ones)."""
    if dtype == "uint32":
        return rng.integers(0, 2**32, (rows, length), dtype=np.uint32)
    if name.endswith((".scales", ".biases")):
        scale = rng.normal(0.002, 0.0004, (rows, length)).astype(np.float32)
        return (scale if name.endswith("scales") else -8 * scale).astype(np.float16)
    return (0.02 * rng.standard_normal((rows, length), dtype=np.float32)).astype(np.float16)
