"""Make an activation-outlier variant of a llama-family flash model, to test selectors against.

    python tools/outlier_variant.py FLASH_DIR OUT_DIR [--channels 4] [--factor 50]

Per layer, a few input channels of the FFN get huge activations without changing the model's
outputs: those entries of ``post_attention_layernorm.weight`` are multiplied by ``factor`` and the
matching input columns of the gate and up projections divided by it. Real models show such outlier
channels; a plain low-bit copy of gate and up then ranks neurons badly (README, Sparsity). Writes a
plain mlx-lm directory (float32); convert it with ``python -m mlx_flash.convert OUT_DIR FLASH``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config, save_model

from mlx_flash.rebuild import load_dense
from mlx_flash.runtime.manifest import read_manifest


def make_variant(flash: Path, out: Path, channels: int, factor: float, seed: int = 0) -> None:
    manifest = read_manifest(flash)
    model, _ = load_dense(flash)
    rng = np.random.default_rng(seed)
    weights = dict(tree_flatten(model.parameters()))
    for entry in manifest.layers:
        base = entry.prefix.rsplit(".", 1)[0]  # model.layers.N
        ids = mx.array(rng.choice(manifest.d_model, channels, replace=False))
        norm = f"{base}.post_attention_layernorm.weight"
        weights[norm] = weights[norm].at[ids].multiply(factor)
        for linear in ("gate_proj", "up_proj"):
            name = f"{entry.prefix}.{linear}.weight"
            weights[name] = weights[name].at[:, ids].multiply(1.0 / factor)
    model.load_weights(list(weights.items()))
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    config = json.loads((flash / "config.json").read_text())
    config.pop("model_file", None)
    save_config(config, out / "config.json")
    for tokenizer_file in flash.glob("tokenizer*"):
        shutil.copy2(tokenizer_file, out / tokenizer_file.name)
    for extra in ("special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        if (flash / extra).is_file():
            shutil.copy2(flash / extra, out / extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("flash", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--channels", type=int, default=4, help="outlier channels per layer")
    p.add_argument("--factor", type=float, default=50.0)
    args = p.parse_args()
    make_variant(args.flash, args.out, args.channels, args.factor)


if __name__ == "__main__":
    main()
