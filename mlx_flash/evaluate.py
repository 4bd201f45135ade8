"""``python -m mlx_flash.evaluate --model DIR --data FILE``: perplexity and sparsity of the streaming runtime.

What it measures is what the runtime computes: it loads the model with ``mlx_flash.load`` and decodes
every window token by token through a KV cache (decode is where selection happens; a prefill would be
dense), scoring each next token from the runtime's own logits. The reference is the dense perplexity
of the same weights (trunk + store rebuilt as a plain mlx-lm model, ``mlx_lm.perplexity.eval_ppl``)
on the same windows: the text's first ``max_windows`` windows of ``seq_len`` tokens, so numbers from
different settings compare.

Per token (means over tokens, as shares of all FFN neurons of all layers): *used* (selected), *loaded*
(read from flash for this token, after windowing), *computed* (rows multiplied). And, against the
*truly active* neurons — those whose exact activation |h| is above the threshold of the target sparsity
(0 for ReLU-family FFNs) — computed by a dense FFN pass on the very input the selector saw: the
selector's recall and the predicted vs truly active shares, overall and per layer. The truth uses the
runtime's input rather than a separate dense model's, so recall measures the selector alone, not the
drift earlier sparse layers caused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.perplexity import eval_ppl
from tqdm import tqdm

from .calibration import natural_zeros, read_calibration
from .cli import run_cli
from .errors import FlashError
from .flash_ffn import ffn_hidden
from .loader import load
from .manifest import Manifest, read_manifest
from .rebuild import _layer_parts, load_dense
from .store import StoreReader

SEQ_LEN = 256
MAX_WINDOWS = 8


def encode_text(tokenizer, text: str, max_tokens: int, piece_chars: int = 4000) -> np.ndarray:
    """The first ``max_tokens`` token ids of ``text``, encoded some lines at a time (tokenizers warn
    about, and slow down on, megabyte inputs)."""
    ids: list[int] = []
    lines = text.splitlines(keepends=True)
    start = 0
    while start < len(lines) and len(ids) < max_tokens:
        stop, size = start, 0
        while stop < len(lines) and size < piece_chars:
            size += len(lines[stop])
            stop += 1
        ids += tokenizer.encode("".join(lines[start:stop]), add_special_tokens=False)
        start = stop
    return np.array(ids[:max_tokens], dtype=np.int64)


def text_windows(tokenizer, path: str | Path, seq_len: int, max_windows: int | None) -> np.ndarray:
    """[windows, seq_len] consecutive token windows from the start of the file."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    limit = seq_len * max_windows if max_windows else 1 << 62
    ids = encode_text(tokenizer, text, limit)
    n = ids.size // seq_len
    if n == 0:
        raise FlashError(f"{path}: {ids.size} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


class _Audit:
    """Wraps the runtime's selector: records each selection and the truly active neurons for the same input.

    Delegates everything else (``supplies_gate``, ``activations``, ``nbytes``) so the runtime behaves as
    without it.
    """

    def __init__(
        self,
        inner,
        parts: list[dict[str, mx.array]],
        manifest: Manifest,
        thresholds: list[float] | None,
    ):
        self.inner, self._parts, self._m, self._thresholds = inner, parts, manifest, thresholds
        self._x: mx.array | None = None
        n = manifest.n_layers
        self.selected, self.active, self.hits = np.zeros(n), np.zeros(n), np.zeros(n)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def activations(self, layer: int, x: mx.array) -> mx.array:
        self._x = x
        return self.inner.activations(layer, x)

    def select(self, layer: int, gate: mx.array) -> np.ndarray:
        return self._record(layer, self._x, self.inner.select(layer, gate))

    def __call__(self, layer: int, x: mx.array) -> np.ndarray:
        return self._record(layer, x, self.inner(layer, x))

    def _record(self, layer: int, x: mx.array, ids: np.ndarray) -> np.ndarray:
        self.selected[layer] += ids.size
        if self._thresholds is not None:
            m = self._m
            h = ffn_hidden(
                x.astype(mx.float32), self._parts[layer], m.activation, m.gated, m.quantization
            )
            truth = np.flatnonzero(np.array(mx.any(mx.abs(h) > self._thresholds[layer], axis=0)))
            self.active[layer] += truth.size
            self.hits[layer] += np.intersect1d(truth, ids, assume_unique=True).size
        return ids


def _truth_parts(directory: Path, manifest: Manifest) -> list[dict[str, mx.array]]:
    """Every layer's gate/up rows (what |h| needs), read once from the store."""
    wanted = ("down",)
    with StoreReader(directory, manifest, threads=4) as reader:
        parts = []
        for i in range(manifest.n_layers):
            layer = _layer_parts(reader, manifest, i)
            parts.append({k: v for k, v in layer.items() if not k.startswith(wanted)})
    return parts


def _dense_perplexity(directory: Path, windows: np.ndarray) -> float:
    model, _ = load_dense(directory)
    with contextlib.redirect_stdout(io.StringIO()):  # eval_ppl prints progress
        ppl, _ = eval_ppl(model, mx.array(windows), batch_size=4)
    return float(ppl)


def _decode(
    model, windows: np.ndarray, label: str, progress: bool
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Next-token losses [windows, seq_len - 1] from decoding each window token by token through a KV cache,
    and the telemetry's per-layer requested/loaded/computed counts summed over those tokens."""
    telemetry = model.flash.telemetry
    telemetry.reset()
    per_layer = {k: np.zeros(telemetry.n_layers) for k in ("requested", "loaded", "computed")}
    losses = np.zeros((len(windows), windows.shape[1] - 1))
    bar = tqdm(total=losses.size, desc=label, unit="tok", disable=not progress)
    for w, tokens in enumerate(windows):
        cache = make_prompt_cache(model)
        for t in range(windows.shape[1] - 1):
            logits = model(mx.array(tokens[t : t + 1])[None], cache=cache)[0, -1].astype(mx.float32)
            losses[w, t] = nn.losses.cross_entropy(logits, mx.array(tokens[t + 1])).item()
            for k in per_layer:
                per_layer[k] += telemetry.per_layer[k]
            bar.update()
    bar.close()
    return losses, per_layer


def evaluate(
    directory: str | Path,
    data: str | Path,
    *,
    selector: str = "auto",
    sparsity: float | None = None,
    window: int = 4,
    seq_len: int = SEQ_LEN,
    max_windows: int | None = MAX_WINDOWS,
    memory_budget: str | int | None = "4GB",
    ffn_share: float | None = 0.95,
    pin_share: float = 0.0,
    compute_rows: str = "resident",
    progress: bool = True,
) -> dict:
    """Perplexity and per-token sparsity of the flash model at ``directory`` on the text ``data``.

    Defaults buffer 95% of each layer's FFN and pin nothing, so what is computed is the selection and
    the window's union (pinned rows would be computed for every token whatever the selector says).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    model, tokenizer = load(
        directory,
        memory_budget,
        selector=selector,
        sparsity=sparsity,
        window=window,
        ffn_share=ffn_share,
        pin_share=pin_share,
        compute_rows=compute_rows,
    )
    runtime = model.flash
    try:
        windows = text_windows(tokenizer, data, seq_len, max_windows)
        calibration = read_calibration(directory, manifest)
        target = (
            sparsity if sparsity is not None else (calibration.sparsity if calibration else None)
        )
        thresholds = None
        if calibration is not None:
            thresholds = [calibration.threshold(i, target) for i in range(manifest.n_layers)]
        elif natural_zeros(manifest):
            thresholds = [0.0] * manifest.n_layers
        audit = _Audit(runtime.selector, _truth_parts(directory, manifest), manifest, thresholds)
        runtime.selector = audit
        losses, per_layer = _decode(model, windows, f"decode ({selector})", progress)
        dense = _dense_perplexity(directory, windows)
    finally:
        runtime.close()

    n_tokens = losses.size
    neurons = n_tokens * manifest.d_ffn
    perplexity = math.exp(losses.mean())
    summary = runtime.telemetry.summary()
    result = {
        "model": str(directory),
        "data": str(data),
        "selector": getattr(audit.inner, "name", type(audit.inner).__name__),
        "sparsity": target,
        "window": window,
        "compute_rows": compute_rows,
        "seq_len": seq_len,
        "windows": len(windows),
        "tokens": n_tokens,
        "plan": runtime.plan.as_dict(),
        "perplexity": perplexity,
        "dense_perplexity": dense,
        "perplexity_change": perplexity / dense - 1,
        "fraction_used": summary["fraction_used"],
        "fraction_loaded": summary["fraction_loaded"],
        "fraction_computed": summary["fraction_computed"],
        "loaded_per_used": summary["fraction_loaded"] / summary["fraction_used"]
        if summary["fraction_used"]
        else 0.0,
        "flash_bytes_per_token": summary["flash_bytes_per_token"],
        "per_layer": {
            "fraction_used": (per_layer["requested"] / neurons).tolist(),
            "fraction_loaded": (per_layer["loaded"] / neurons).tolist(),
            "fraction_computed": (per_layer["computed"] / neurons).tolist(),
        },
    }
    if thresholds is not None:
        result.update(
            {
                "fraction_truly_active": float(audit.active.sum() / (neurons * manifest.n_layers)),
                "fraction_predicted": float(audit.selected.sum() / (neurons * manifest.n_layers)),
                "recall": float(audit.hits.sum() / max(1.0, audit.active.sum())),
            }
        )
        result["per_layer"].update(
            {
                "fraction_truly_active": (audit.active / neurons).tolist(),
                "recall": (audit.hits / np.maximum(1.0, audit.active)).tolist(),
                "precision": (audit.hits / np.maximum(1.0, audit.selected)).tolist(),
            }
        )
    return result


def _print(r: dict) -> None:
    print(
        f"{r['model']}: selector {r['selector']}, sparsity {r['sparsity']}, window k={r['window']}, "
        f"{r['windows']} windows of {r['seq_len']} tokens ({r['tokens']} scored)"
    )
    print(
        f"perplexity {r['perplexity']:.3f} vs dense {r['dense_perplexity']:.3f} ({100 * r['perplexity_change']:+.2f}%)"
    )
    print(
        f"per token: used {r['fraction_used']:.3f}, loaded {r['fraction_loaded']:.3f}, computed "
        f"{r['fraction_computed']:.3f} of FFN neurons (loaded/used {r['loaded_per_used']:.3f})"
    )
    if "recall" in r:
        print(
            f"truly active {r['fraction_truly_active']:.3f}, predicted {r['fraction_predicted']:.3f}, recall {r['recall']:.3f}"
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
            )
        ):
            print(f"{i:5d}  {a:.3f}  {u:.3f}  {rc:.3f}   {pr:.3f}     {ld:.3f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="flash model directory")
    p.add_argument("--data", required=True, help="text file (e.g. WikiText-2 raw test)")
    p.add_argument("--selector", default="auto", choices=["auto", "dense", "gate", "predictor"])
    p.add_argument(
        "--sparsity", type=float, help="target share of neurons skipped (default: the conversion's)"
    )
    p.add_argument("--window", type=int, default=4, help="tokens of history kept resident (k)")
    p.add_argument(
        "--compute-rows",
        choices=["resident", "selected"],
        default="resident",
        help="compute every resident row (default) or only this token's selection",
    )
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per window")
    p.add_argument(
        "--max-windows", type=int, default=MAX_WINDOWS, help="windows to score (0: the whole text)"
    )
    p.add_argument(
        "--ffn-share", type=float, default=0.95, help="share of each layer's FFN rows buffered"
    )
    p.add_argument("--pin-share", type=float, default=0.0, help="share of the buffer pinned")
    p.add_argument("--memory-budget", default="4GB")
    p.add_argument(
        "--json", metavar="OUT", help="write the full result (with per-layer numbers) here"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def run(args: argparse.Namespace) -> int:
    result = evaluate(
        args.model,
        args.data,
        selector=args.selector,
        sparsity=args.sparsity,
        window=args.window,
        seq_len=args.seq_len,
        max_windows=args.max_windows or None,
        memory_budget=args.memory_budget,
        ffn_share=args.ffn_share,
        pin_share=args.pin_share,
        compute_rows=args.compute_rows,
    )
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
