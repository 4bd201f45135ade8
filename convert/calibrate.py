"""Calibration: run the dense model over text, measure its FFN activations, train the predictors.

Runs on a flash model directory (the converter calls it on its staging directory before publishing;
``python -m mlx_flash.convert.calibrate DIR`` re-runs it in place with other text or settings). It
never holds the whole model: the trunk is loaded as the runtime would, and each layer's FFN is read
from the store when the forward pass reaches it and dropped after. The FFN inputs of every layer are
kept on disk (scratch memory maps), then each layer in turn is read once more to compute its
activations, record statistics and train its predictor.

Recorded (see ``mlx_flash.calibration``): per neuron the share of tokens on which it is active at the
conversion's target sparsity (pinning and placement use it), per layer quantiles of |h| and of
|act(gate)| (thresholds for any sparsity at run time), the share of exact zeros (natural sparsity),
and the predictors with their recall and precision on held-back calibration tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from mlx_lm.utils import load_model, load_tokenizer
from tqdm import tqdm

from mlx_flash.adapters import ACTIVATIONS, set_ffn, spec_for
from mlx_flash.calibration import (
    LEVELS,
    Calibration,
    Predictors,
    default_sparsity,
    save_calibration,
)
from mlx_flash.cli import run_cli
from mlx_flash.errors import FlashError
from mlx_flash.evaluate import encode_text
from mlx_flash.flash_ffn import ffn_hidden, ffn_rows, project_in
from mlx_flash.manifest import Manifest, read_manifest
from mlx_flash.rebuild import _layer_parts, _rows as _dense_rows
from mlx_flash.store import StoreReader

from .predictor import auto_ranks, choose_cut, score_predictor, train_predictor

SEQ_LEN = 256  # tokens per calibration window (each starts a fresh context)
MAX_TOKENS = 16384  # enough for stable quantiles and a few hundred positives per neuron
HELD_OUT = (
    0.2  # share of windows kept back: half to calibrate the predictors' cut, half to measure them
)
NATURAL_MARGIN = 1.3  # natural zeros: predict 1.3x the active share (see convert/predictor.py)
BATCH_TOKENS = 1024  # tokens per forward pass (each pass reads every layer's FFN once)
QUANTILE_TOKENS = 4096  # tokens whose activations give the quantiles


def builtin_text_path() -> Path:
    """The packaged English sample: Austen passages, public domain (mlx_flash/data/README.md)."""
    import mlx_flash

    return Path(mlx_flash.__file__).parent / "data" / "calibration.txt"


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int) -> np.ndarray:
    """[windows, seq_len] token ids from the start of ``text``; refuses text too short for two windows."""
    ids = encode_text(tokenizer, text, max_tokens)
    n = ids.size // seq_len
    if n < 2:
        raise FlashError(
            f"calibration text is too short: {ids.size} tokens, need at least {2 * seq_len}"
        )
    return ids[: n * seq_len].reshape(n, seq_len)


class _Captured(Exception):
    """Raised by the last layer's capture: the rest of the forward pass (final norm, head) is not needed."""


class _CaptureFFN(nn.Module):
    """Dense FFN of one layer read from the store per call; appends each input to a memory map."""

    def __init__(self, reader: StoreReader, manifest: Manifest, layer: int, inputs: np.ndarray):
        super().__init__()
        self._reader, self._manifest, self._layer, self._inputs = reader, manifest, layer, inputs
        self._filled = 0

    def __call__(self, x: mx.array) -> mx.array:
        m, reader = self._manifest, self._reader
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        if self._layer == m.n_layers - 1:
            self._store(xf)
            raise _Captured
        parts = _layer_parts(reader, m, self._layer)
        out = ffn_rows(xf, parts, m.activation, m.gated, m.quantization)
        if "down_bias" in m.layers[self._layer].blobs:
            out = out + mx.array(reader.read_blob(self._layer, "down_bias", np.float32))
        out = out.astype(x.dtype).reshape(x.shape)
        mx.eval(out)
        self._store(xf)
        return out

    def _store(self, xf: mx.array) -> None:
        self._inputs[self._filled : self._filled + xf.shape[0]] = np.array(xf)
        self._filled += xf.shape[0]


def collect_ffn_inputs(
    directory: Path, manifest: Manifest, windows: np.ndarray, scratch: Path, progress: bool = True
) -> list[np.ndarray]:
    """Run the dense model over ``windows``; per layer, the FFN inputs [tokens, d_model] as memory maps."""
    model, _ = load_model(directory, lazy=True, strict=False, model_config={"model_file": None})
    model.update(
        tree_map(
            lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )
    tokens = windows.size
    inputs = [
        np.lib.format.open_memmap(
            scratch / f"x{i}.npy", "w+", np.float32, (tokens, manifest.d_model)
        )
        for i in range(manifest.n_layers)
    ]
    spec = spec_for(manifest.model_type)
    per_batch = max(1, BATCH_TOKENS // windows.shape[1])
    with StoreReader(directory, manifest, threads=4) as reader:
        for i in range(manifest.n_layers):
            set_ffn(model, spec, i, _CaptureFFN(reader, manifest, i, inputs[i]))
        for b in tqdm(
            range(0, len(windows), per_batch),
            desc="calibration forward",
            unit="batch",
            disable=not progress,
        ):
            try:
                model(mx.array(windows[b : b + per_batch]))
            except _Captured:
                pass
    for x in inputs:
        x.flush()
    return inputs


def layer_activations(
    parts: dict[str, mx.array], manifest: Manifest, x: np.ndarray
) -> tuple[mx.array, mx.array | None]:
    """|h| [tokens, d_ffn] and, for gated FFNs, |act(gate)| of the FFN inputs ``x``."""
    xm = mx.array(x)
    g = (
        ACTIVATIONS[manifest.activation](project_in(xm, parts, "gate", manifest.quantization))
        if manifest.gated
        else None
    )
    h = ffn_hidden(xm, parts, manifest.activation, manifest.gated, manifest.quantization, g)
    return mx.abs(h), (None if g is None else mx.abs(g))


def active_mask(
    parts: dict[str, mx.array],
    manifest: Manifest,
    x: np.ndarray,
    threshold: float,
    chunk: int = 2048,
) -> np.ndarray:
    """Which neurons are active (|h| > threshold) for each token of ``x``, computed a chunk of tokens at a time."""
    return np.concatenate(
        [
            np.array(layer_activations(parts, manifest, x[a : a + chunk])[0] > threshold)
            for a in range(0, len(x), chunk)
        ]
    )


def _layer_predictor(
    parts: dict[str, mx.array],
    manifest: Manifest,
    x: np.ndarray,
    active: np.ndarray,
    rank: int,
    n_train: int,
    n_cut: int,
    margin: float,
) -> tuple[tuple, float, dict[str, float]]:
    """Train on tokens [0, n_train), set the cut on [n_train, n_cut), measure on the rest."""
    up = None if manifest.gated else np.array(_dense_rows(parts, "up", manifest))
    up_bias = None if up is None or "up_bias" not in parts else np.array(parts["up_bias"][:, 0])
    weights = train_predictor(x[:n_train], active[:n_train], rank, up=up, up_bias=up_bias)
    cut = choose_cut(weights, x[n_train:n_cut], active[n_train:n_cut], margin)
    return weights, cut, score_predictor(weights, cut, x[n_cut:], active[n_cut:])


def _quantiles(values: np.ndarray) -> np.ndarray:
    return np.quantile(values.reshape(-1), LEVELS).astype(np.float32)


def calibrate(
    directory: str | Path,
    text: str | Path | None = None,
    *,
    sparsity: float | None = None,
    ranks: list[int] | int | None = None,
    predictors: bool = True,
    seq_len: int = SEQ_LEN,
    max_tokens: int = MAX_TOKENS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Calibrate the flash model directory in place; returns its updated manifest.

    ``text``: a text file (default: the built-in English sample). ``sparsity``: the conversion's target
    (default: natural zeros for ReLU-family FFNs, else 0.5), the threshold the predictors learn.
    ``ranks``: predictor rank for every layer (an int or one per layer; default: ``auto_ranks``).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    path = Path(text) if text is not None else builtin_text_path()
    if not path.is_file():
        raise FlashError(f"{path}: calibration text not found")
    if sparsity is None:
        sparsity = default_sparsity(manifest)
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise FlashError(f"--sparsity must be in [0, 1), got {sparsity}")
    tokenizer = load_tokenizer(directory)
    windows = token_windows(
        tokenizer, path.read_text(encoding="utf-8", errors="replace"), seq_len, max_tokens
    )
    n_held = max(2, int(round(len(windows) * HELD_OUT)))
    n_train = (len(windows) - n_held) * seq_len
    n_cut = n_train + n_held // 2 * seq_len  # tokens [n_train, n_cut) set the cut, the rest measure
    if len(windows) - n_held < 1:
        raise FlashError(
            f"calibration text is too short: {windows.size} tokens, need at least {3 * seq_len}"
        )
    rank_list = (
        auto_ranks(manifest)
        if ranks is None
        else ([ranks] * manifest.n_layers if isinstance(ranks, int) else list(ranks))
    )
    if len(rank_list) != manifest.n_layers:
        raise FlashError(
            f"--predictor-rank needs one rank or {manifest.n_layers}, got {len(rank_list)}"
        )
    log(
        f"Calibrating on {windows.size} tokens of {path.name} ({n_held * seq_len} held back), target sparsity "
        + ("natural (exact zeros)" if sparsity is None else f"{sparsity:g}")
    )

    scratch = Path(tempfile.mkdtemp(prefix=".calibration-", dir=directory))
    try:
        inputs = collect_ffn_inputs(directory, manifest, windows, scratch, progress)
        frequency = np.zeros((manifest.n_layers, manifest.d_ffn), np.float32)
        magnitude = np.zeros((manifest.n_layers, len(LEVELS)), np.float32)
        gate_q = np.zeros_like(magnitude) if manifest.gated else None
        zeros = np.zeros(manifest.n_layers, np.float32)
        weights, cuts, quality = [], [], []
        margin = NATURAL_MARGIN if sparsity is None else 1.0
        sample = np.linspace(0, n_train - 1, min(n_train, QUANTILE_TOKENS)).astype(np.int64)
        with StoreReader(directory, manifest, threads=4) as reader:
            bar = tqdm(
                range(manifest.n_layers),
                desc="activations + predictors",
                unit="layer",
                disable=not progress,
            )
            for i in bar:
                parts = _layer_parts(reader, manifest, i)
                h, g = (
                    None if a is None else np.array(a)
                    for a in layer_activations(parts, manifest, inputs[i][sample])
                )
                magnitude[i] = _quantiles(h)
                if g is not None:
                    gate_q[i] = _quantiles(g)
                zeros[i] = float((h == 0).mean())
                del h, g
                threshold = (
                    0.0 if sparsity is None else float(np.interp(sparsity, LEVELS, magnitude[i]))
                )
                active = active_mask(parts, manifest, inputs[i], threshold)
                frequency[i] = active[:n_train].mean(0)
                if predictors:
                    x = np.asarray(inputs[i])
                    p, cut, q = _layer_predictor(
                        parts, manifest, x, active, rank_list[i], n_train, n_cut, margin
                    )
                    weights.append(p)
                    cuts.append(cut)
                    quality.append(q)  # noqa: E702
                    bar.set_postfix(recall=f"{q['recall']:.3f}", predicted=f"{q['predicted']:.3f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    calibration = Calibration(frequency, magnitude, gate_q, zeros, sparsity, int(windows.size))
    info = {
        "calibration": {"text": path.name, "held_out_tokens": n_held * seq_len, "seq_len": seq_len},
        "predictor": {"cut": cuts, "margin": margin},
    }
    stored = None
    if predictors:
        stored = Predictors(*(list(w) for w in zip(*weights)), cuts)
        info["predictor"].update({k: [q[k] for q in quality] for k in quality[0]})
        params = sum(r * (manifest.d_model + manifest.d_ffn) + manifest.d_ffn for r in stored.ranks)
        info["predictor"]["share_of_parameters"] = params / model_parameters(directory, manifest)
    manifest = save_calibration(directory, manifest, calibration, stored, info)
    _report(directory, manifest, log)
    return manifest


def model_parameters(directory: Path, manifest: Manifest) -> int:
    """Parameters of the whole model: the trunk's (from the safetensors headers; packed quantized words
    count as the weights they hold) plus the FFN's (from its shape)."""
    bits = manifest.quantization.bits if manifest.quantization else 32
    total = manifest.n_layers * manifest.d_ffn * manifest.d_model * (3 if manifest.gated else 2)
    for path in directory.glob("model*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                total += int(np.prod(meta["shape"])) * (32 // bits if meta["dtype"] == "U32" else 1)
    return total


def _report(directory: Path, manifest: Manifest, log: Callable[[str], None]) -> None:
    meta = manifest.extra.get("predictor")
    if not meta:
        return
    log(
        f"  predictors: ranks {meta['ranks']}, {meta['bytes'] / 1e6:.2f} MB, {100 * meta['share_of_parameters']:.1f}% of the "
        f"model's parameters; held-back recall {np.mean(meta['recall']):.3f}, precision {np.mean(meta['precision']):.3f}, "
        f"predicted {np.mean(meta['predicted']):.3f} vs active {np.mean(meta['active']):.3f} of neurons"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.convert.calibrate",
        description="Re-run the calibration (statistics + predictors) of a flash model directory in place.",
    )
    p.add_argument("directory")
    p.add_argument(
        "--calibration", metavar="FILE", help="text file (default: the built-in English sample)"
    )
    p.add_argument(
        "--sparsity",
        type=float,
        help="target share of FFN neurons skipped (default: exact zeros for ReLU FFNs, else 0.5)",
    )
    p.add_argument(
        "--predictor-rank", type=int, help="rank of every layer's predictor (default: by layer)"
    )
    p.add_argument("--no-predictor", action="store_true", help="statistics only")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="calibration tokens to use")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def run(args: argparse.Namespace) -> int:
    calibrate(
        args.directory,
        args.calibration,
        sparsity=args.sparsity,
        ranks=args.predictor_rank,
        predictors=not args.no_predictor,
        max_tokens=args.max_tokens,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
