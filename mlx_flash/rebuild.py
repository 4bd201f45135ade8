"""Rebuild the dense FFN weights (mlx-lm names and shapes) from a flash store.

Used to check a conversion end to end (trunk + store through plain mlx-lm must reproduce the source)
and to compare the streaming runtime with plain mlx-lm on the very same weights.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import load_config, load_model, load_tokenizer

from .adapters import spec_for
from .manifest import Manifest, read_manifest
from .store import StoreReader


def _layer_parts(reader: StoreReader, manifest: Manifest, layer: int) -> dict[str, mx.array]:
    """Every part of every neuron of ``layer`` as MLX arrays [d_ffn, length] (float parts as float32)."""
    dest = {}
    for region in manifest.layers[layer].regions:
        for p in region.parts:
            dest[p.name] = np.zeros(
                (manifest.d_ffn, p.length), np.uint32 if p.dtype == "uint32" else np.float32
            )
    ids = np.arange(manifest.d_ffn)
    reader.read_neurons(layer, ids, dest, ids)
    return {k: mx.array(v) for k, v in dest.items()}


def _rows(parts: dict[str, mx.array], name: str, manifest: Manifest) -> mx.array:
    q = manifest.quantization
    if q is None:
        return parts[name]
    return mx.dequantize(
        parts[name],
        parts[f"{name}.scales"],
        parts[f"{name}.biases"],
        group_size=q.group_size,
        bits=q.bits,
    )


def dense_ffn_weights(directory: str | Path) -> dict[str, mx.array]:
    """FFN weights of every layer as the mlx-lm model names them (float32, dequantized if quantized)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = spec_for(manifest.model_type)
    weights: dict[str, mx.array] = {}
    with StoreReader(directory, manifest, threads=4) as reader:
        for entry in manifest.layers:
            parts = _layer_parts(reader, manifest, entry.index)
            base = entry.prefix
            up = _rows(parts, "up", manifest)
            down = _rows(parts, "down", manifest).T
            if spec.fused_gate_up:
                weights[f"{base}.{spec.fused_gate_up}.weight"] = mx.concatenate(
                    [_rows(parts, "gate", manifest), up]
                )
                if "up_bias" in parts:
                    weights[f"{base}.{spec.fused_gate_up}.bias"] = mx.concatenate(
                        [parts["gate_bias"][:, 0], parts["up_bias"][:, 0]]
                    )
            else:
                weights[f"{base}.{spec.up}.weight"] = up
                if spec.gate:
                    weights[f"{base}.{spec.gate}.weight"] = _rows(parts, "gate", manifest)
                if "gate_bias" in parts:
                    weights[f"{base}.{spec.gate}.bias"] = parts["gate_bias"][:, 0]
                if "up_bias" in parts:
                    weights[f"{base}.{spec.up}.bias"] = parts["up_bias"][:, 0]
            weights[f"{base}.{spec.down}.weight"] = down
            if "down_bias" in entry.blobs:
                weights[f"{base}.{spec.down}.bias"] = mx.array(
                    reader.read_blob(entry.index, "down_bias", np.float32)
                )
    return weights


def load_dense(directory: str | Path, dtype: mx.Dtype = mx.float32):
    """The whole model as a plain mlx-lm model (trunk + rebuilt FFN) in ``dtype``, with its tokenizer."""
    directory = Path(directory)
    ffn = dense_ffn_weights(directory)
    config = load_config(directory)
    model, _ = load_model(directory, lazy=True, strict=False, model_config={"model_file": None})
    missing = {
        k
        for k in dict(tree_flatten(model.parameters()))
        if k.startswith(tuple(ffn_prefixes_of(ffn)))
    } - ffn.keys()
    if missing:
        raise ValueError(f"{directory}: store lacks FFN weights {sorted(missing)[:3]}")
    model.load_weights(list(ffn.items()), strict=False)
    model.update(
        tree_map(
            lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )
    mx.eval(model.parameters())
    return model, load_tokenizer(directory, eos_token_ids=config.get("eos_token_id"))


def ffn_prefixes_of(ffn: dict[str, mx.array]) -> set[str]:
    return {name.rsplit(".", 2)[0] + "." for name in ffn}
