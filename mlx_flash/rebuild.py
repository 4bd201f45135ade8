"""Rebuild the dense FFN weights (mlx-lm names and shapes) from a flash store.

Used to check a conversion end to end (trunk + store through plain mlx-lm must reproduce the
source), to compare the streaming runtime with plain mlx-lm on the very same weights, and to
export a flash model as a plain mlx-lm directory (``python -m mlx_flash.rebuild FLASH OUT``): for a
model that exists only as a GGUF, that is the way to the comparable mlx-lm model (then
``mlx_lm.convert --hf-path OUT -q`` for its 4-bit twin).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import load_config, load_model, load_tokenizer, save_config, save_model

from .runtime.adapters import spec_for
from .runtime.errors import FlashFormatError
from .runtime.ffn import dense_rows
from .runtime.files import staged
from .runtime.loader import cast_parameters
from .runtime.manifest import MX_DTYPES, Manifest, read_manifest
from .runtime.store import StoreReader


def dense_ffn_weights(directory: str | Path) -> dict[str, mx.array]:
    """FFN weights of every layer as the mlx-lm model names them (float32, dequantized); for a MoE
    store, the stacked experts of every MoE layer."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.moe is not None:
        return expert_weights(directory, manifest)
    spec, quant = spec_for(manifest.model_type), manifest.quantization
    weights: dict[str, mx.array] = {}
    with StoreReader(directory, manifest, threads=4) as reader:
        for entry in manifest.layers:
            parts = {k: mx.array(v) for k, v in reader.read_layer(entry.index).items()}
            base = entry.prefix
            rows = {
                name: dense_rows(parts, name, quant) for name in ("gate", "up") if name in parts
            }
            biases = {name: parts[f"{name}_bias"][:, 0] for name in rows if f"{name}_bias" in parts}
            if spec.fused_gate_up:
                weights[f"{base}.{spec.fused_gate_up}.weight"] = mx.concatenate(
                    [rows["gate"], rows["up"]]
                )
                if biases:
                    weights[f"{base}.{spec.fused_gate_up}.bias"] = mx.concatenate(
                        [biases["gate"], biases["up"]]
                    )
            else:
                for name, linear in (("gate", spec.gate), ("up", spec.up)):
                    if name in rows:
                        weights[f"{base}.{linear}.weight"] = rows[name]
                    if name in biases:
                        weights[f"{base}.{linear}.bias"] = biases[name]
            weights[f"{base}.{spec.down}.weight"] = dense_rows(parts, "down", quant).T
            if "down_bias" in entry.blobs:
                bias = reader.read_blob(entry.index, "down_bias", np.float32)
                weights[f"{base}.{spec.down}.bias"] = mx.array(bias)
    return weights


def load_dense(directory: str | Path, dtype: mx.Dtype = mx.float32):
    """The whole model as a plain mlx-lm model (trunk + rebuilt FFN) in ``dtype``, and its
    tokenizer."""
    directory = Path(directory)
    ffn = dense_ffn_weights(directory)
    config = load_config(directory)
    model, _ = load_model(directory, lazy=True, strict=False, model_config={"model_file": None})
    prefixes = tuple({name.rsplit(".", 2)[0] + "." for name in ffn})
    expected = {k for k, _ in tree_flatten(model.parameters()) if k.startswith(prefixes)}
    missing = expected - ffn.keys()
    if missing:
        raise FlashFormatError(f"{directory}: store lacks FFN weights {sorted(missing)[:3]}")
    model.load_weights(list(ffn.items()), strict=False)
    cast_parameters(model, dtype)
    return model, load_tokenizer(directory, eos_token_ids=config.get("eos_token_id"))


def expert_weights(directory: Path, manifest: Manifest) -> dict[str, mx.array]:
    """Every MoE layer's experts as mlx-lm's SwitchGLU names them, stacked ``[E, ...]``, float32
    (quantized projections dequantized in their own mode)."""
    weights: dict[str, mx.array] = {}
    with StoreReader(directory, manifest, threads=4) as reader:
        for entry, experts in zip(manifest.layers, manifest.moe.layers, strict=True):
            parts = {
                name: mx.array(a).reshape(-1, *experts.shapes[name])
                for name, a in reader.read_layer(entry.index).items()
            }
            for linear, quant in experts.quant.items():
                base = f"{entry.prefix}.{linear}"
                weight = parts[f"{linear}.weight"]
                if quant is not None:
                    weight = mx.dequantize(
                        weight,
                        parts[f"{linear}.scales"],
                        parts.get(f"{linear}.biases"),
                        group_size=quant.group_size,
                        bits=quant.bits,
                        mode=quant.mode,
                    )
                weights[f"{base}.weight"] = weight.astype(mx.float32)
                if f"{linear}.bias" in parts:
                    weights[f"{base}.bias"] = parts[f"{linear}.bias"]
    return weights


def export_mlx_lm(
    directory: str | Path, out: str | Path, dtype: str = "float16", force: bool = False
) -> Path:
    """Write a flash model as a plain mlx-lm directory (trunk + rebuilt FFN in ``dtype``, config
    without the flash entry point, tokenizer). The whole model passes through memory once."""
    directory, out = Path(directory), Path(out).absolute()
    model, tokenizer = load_dense(directory, MX_DTYPES[dtype])
    config = {k: v for k, v in load_config(directory).items() if k != "model_file"}
    config["torch_dtype"] = dtype
    with staged(out, force) as tmp:
        save_model(tmp, model, donate_model=True)
        save_config(config, tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
    return out


def main(argv: list[str] | None = None) -> int:
    from .cli import add_debug_arg, run_cli

    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.rebuild",
        description="Export a flash model directory as a plain mlx-lm model directory "
        "(dense weights; the whole model passes through memory).",
    )
    p.add_argument("flash", help="flash model directory")
    p.add_argument("out", help="mlx-lm model directory to write")
    p.add_argument("--dtype", choices=sorted(MX_DTYPES), default="float16")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_debug_arg(p)

    def run(args: argparse.Namespace) -> int:
        print(export_mlx_lm(args.flash, args.out, args.dtype, args.force))
        return 0

    return run_cli(run, p, argv)


if __name__ == "__main__":
    sys.exit(main())
