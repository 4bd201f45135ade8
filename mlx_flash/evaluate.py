"""``python -m mlx_flash.evaluate --model DIR --data FILE``: perplexity and sparsity of the
streaming runtime.

What it measures is what the runtime computes: it loads the model with ``mlx_flash.load`` and
decodes every window token by token through a KV cache (decode is where selection happens; a prefill
would be dense), scoring each next token from the runtime's own logits. The reference is the dense
perplexity of the same weights (trunk + store rebuilt as a plain mlx-lm model,
``mlx_lm.perplexity.eval_ppl``) on the same windows: the text's first ``max_windows`` windows of
``seq_len`` tokens, so numbers from different settings compare.

Per token (means over tokens, as shares of all FFN neurons of all layers): *used* (selected),
*loaded* (read from flash for this token, after windowing), *computed* (rows multiplied). And,
against the *truly active* neurons — those whose exact activation |h| is above the threshold of the
target sparsity (0 for ReLU-family FFNs) — computed by a dense FFN pass on the very input the
selector saw: the selector's recall and the predicted vs truly active shares, overall and per layer.
The truth uses the runtime's input rather than a separate dense model's, so recall measures the
selector alone, not the drift earlier sparse layers caused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.perplexity import eval_ppl
from tqdm import tqdm

from .cli import add_debug_arg, add_flash_args, load_options, run_cli
from .generate import describe_choice
from .rebuild import load_dense
from .runtime.calibration import natural_zeros
from .runtime.ffn import hidden
from .runtime.files import write_json
from .runtime.loader import FlashRuntime, load
from .runtime.options import tool_defaults
from .runtime.selectors import Selection
from .textdata import text_windows

TOOL = "evaluate"
SEQ_LEN = 256
MAX_WINDOWS = 8


class Recall:
    """Watches every decode selection (``FlashRuntime.observe``) and counts, on the very input the
    selector saw, the truly active neurons (exact |h| above the layer's threshold) it caught."""

    def __init__(self, runtime: FlashRuntime, thresholds: list[float]):
        m = runtime.manifest
        self._m, self._thresholds = m, thresholds
        self._parts = [
            {
                k: mx.array(v)
                for k, v in runtime.reader.read_layer(i).items()
                if not k.startswith("down")
            }
            for i in range(m.n_layers)
        ]
        self.selected, self.active, self.hits = (np.zeros(m.n_layers) for _ in range(3))

    def __call__(self, layer: int, x: mx.array, selection: Selection) -> None:
        m = self._m
        h = hidden(x.astype(mx.float32), self._parts[layer], m.activation, m.gated, m.quantization)
        truth = np.flatnonzero(np.array(mx.any(mx.abs(h) > self._thresholds[layer], axis=0)))
        self.selected[layer] += selection.ids.size
        self.active[layer] += truth.size
        self.hits[layer] += np.intersect1d(truth, selection.ids, assume_unique=True).size


def _thresholds(runtime: FlashRuntime, sparsity: float | None) -> list[float] | None:
    """What "truly active" means per layer: |h| above the quantile of the target sparsity, or
    non-zero for ReLU-family FFNs without calibration; None when neither is known."""
    m, calibration = runtime.manifest, runtime.calibration
    if calibration is not None:
        return [calibration.threshold(i, sparsity) for i in range(m.n_layers)]
    return [0.0] * m.n_layers if natural_zeros(m) else None


def _dense_perplexity(directory: Path, windows: np.ndarray) -> float:
    model, _ = load_dense(directory)
    with contextlib.redirect_stdout(io.StringIO()):  # eval_ppl prints progress
        ppl, _ = eval_ppl(model, mx.array(windows), batch_size=4)
    return float(ppl)


def _decode(model, windows: np.ndarray, label: str, progress: bool):
    """Next-token losses [windows, seq_len - 1] from decoding each window token by token through a
    KV cache, and per layer the requested/loaded/computed neurons summed over those tokens."""
    telemetry = model.flash.telemetry
    telemetry.reset()
    per_layer = {k: np.zeros(telemetry.n_layers) for k in ("requested", "loaded", "computed")}
    losses = np.zeros((len(windows), windows.shape[1] - 1))
    bar = tqdm(total=losses.size, desc=label, unit="tok", disable=not progress)
    for w, tokens in enumerate(windows):
        cache = make_prompt_cache(model)
        for t in range(windows.shape[1] - 1):
            logits = model(mx.array(tokens[t : t + 1])[None], cache=cache)[0, -1]
            loss = nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(tokens[t + 1]))
            losses[w, t] = loss.item()
            for i, layer in enumerate(telemetry.passes[-1].layers):
                for k in per_layer:
                    per_layer[k][i] += getattr(layer, k)
            bar.update()
    bar.close()
    return losses, per_layer


def evaluate(
    directory: str | Path,
    data: str | Path,
    *,
    seq_len: int = SEQ_LEN,
    max_windows: int | None = MAX_WINDOWS,
    progress: bool = True,
    **options,
) -> dict:
    """Perplexity and per-token sparsity of the flash model at ``directory`` on the text ``data``.

    ``options`` are ``mlx_flash.load``'s, over this tool's defaults: 95% of each layer's FFN
    buffered and nothing pinned, so what is computed is the selection and the window's union
    (pinned rows would be computed for every token whatever the selector says).
    """
    directory = Path(directory)
    model, tokenizer = load(directory, **{**tool_defaults(TOOL), **options})
    runtime = model.flash
    try:
        windows = text_windows(tokenizer, data, seq_len, max_windows)
        sparsity = runtime.choice.sparsity
        thresholds = _thresholds(runtime, sparsity)
        recall = runtime.observe = None if thresholds is None else Recall(runtime, thresholds)
        losses, per_layer = _decode(model, windows, f"decode ({runtime.selector.name})", progress)
        dense = _dense_perplexity(directory, windows)
    finally:
        runtime.close()
    result = {
        "model": str(directory),
        "data": str(data),
        "selector": runtime.selector.name,
        "sparsity": sparsity,
        "measured_quality_loss": runtime.choice.loss,
        "selector_reason": runtime.choice.reason,
        "window": runtime.options.window,
        "compute_rows": runtime.compute_rows,
        "seq_len": seq_len,
        "windows": len(windows),
        "tokens": losses.size,
        "plan": runtime.plan.as_dict(),
        "perplexity": math.exp(losses.mean()),
        "dense_perplexity": dense,
        "perplexity_change": math.exp(losses.mean()) / dense - 1,
    }
    return _sparsity_report(result, runtime, per_layer, recall)


def _sparsity_report(
    result: dict, runtime: FlashRuntime, per_layer: dict, recall: Recall | None
) -> dict:
    """``result`` with the per-token shares of neurons used, loaded and computed, and the recall."""
    summary = runtime.telemetry.summary()
    neurons = result["tokens"] * runtime.manifest.d_ffn
    used = summary["fraction_used"]
    result.update(
        {k: summary[k] for k in ("fraction_used", "fraction_loaded", "fraction_computed")}
    )
    result["loaded_per_used"] = summary["fraction_loaded"] / used if used else 0.0
    result["flash_bytes_per_token"] = summary["flash_bytes_per_token"]
    result["per_layer"] = {
        "fraction_used": (per_layer["requested"] / neurons).tolist(),
        "fraction_loaded": (per_layer["loaded"] / neurons).tolist(),
        "fraction_computed": (per_layer["computed"] / neurons).tolist(),
    }
    if recall is not None:
        all_neurons = neurons * runtime.manifest.n_layers
        result["fraction_truly_active"] = float(recall.active.sum() / all_neurons)
        result["fraction_predicted"] = float(recall.selected.sum() / all_neurons)
        result["recall"] = float(recall.hits.sum() / max(1.0, recall.active.sum()))
        result["per_layer"]["fraction_truly_active"] = (recall.active / neurons).tolist()
        result["per_layer"]["recall"] = (recall.hits / np.maximum(1.0, recall.active)).tolist()
        result["per_layer"]["precision"] = (recall.hits / np.maximum(1.0, recall.selected)).tolist()
    return result


def _print(r: dict) -> None:
    print(
        f"{r['model']}: selector {r['selector']}, sparsity {r['sparsity']}, "
        f"window k={r['window']}, {r['windows']} windows of {r['seq_len']} tokens "
        f"({r['tokens']} scored)"
    )
    print(f"Selector: {describe_choice(r)}")
    print(
        f"perplexity {r['perplexity']:.3f} vs dense {r['dense_perplexity']:.3f} "
        f"({100 * r['perplexity_change']:+.2f}%)"
    )
    print(
        f"per token: used {r['fraction_used']:.3f}, loaded {r['fraction_loaded']:.3f}, computed "
        f"{r['fraction_computed']:.3f} of FFN neurons (loaded/used {r['loaded_per_used']:.3f})"
    )
    if "recall" in r:
        print(
            f"truly active {r['fraction_truly_active']:.3f}, predicted "
            f"{r['fraction_predicted']:.3f}, recall {r['recall']:.3f}"
        )
        pl = r["per_layer"]
        print("layer  active  used  recall  precision  loaded")
        for i, (a, u, rc, pr, ld) in enumerate(
            zip(
                pl["fraction_truly_active"],
                pl["fraction_used"],
                pl["recall"],
                pl["precision"],
                pl["fraction_loaded"],
                strict=True,
            )
        ):
            print(f"{i:5d}  {a:.3f}  {u:.3f}  {rc:.3f}   {pr:.3f}     {ld:.3f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="flash model directory")
    p.add_argument("--data", required=True, help="text file (e.g. WikiText-2 raw test)")
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=MAX_WINDOWS, help="windows to score (0: all)")
    p.add_argument(
        "--json", metavar="OUT", help="write the full result (with per-layer numbers) here"
    )
    add_flash_args(p, TOOL)
    add_debug_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    result = evaluate(
        args.model,
        args.data,
        seq_len=args.seq_len,
        max_windows=args.max_windows or None,
        **load_options(args, TOOL),
    )
    _print(result)
    if args.json:
        write_json(args.json, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
