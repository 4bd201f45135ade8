"""Calibration: run the dense model over text, measure its FFN activations, train the predictors.

Runs on a flash model directory (the converter calls it on its staging directory before publishing;
``python -m mlx_flash.convert.calibrate DIR`` re-runs it in place with other text or settings). It
never holds the whole model: the trunk is loaded as the runtime would, and each layer's FFN is read
from the store when the forward pass reaches it and dropped after. The FFN inputs of every layer are
kept on disk (scratch memory maps); the store may then be rewritten with each layer's neurons in
co-activation order (``placement.py``), and each layer in turn is read once more to compute its
activations, record statistics and train its predictor.

Recorded (see ``mlx_flash.runtime.calibration``): per neuron the share of tokens on which it is
active at the conversion's target sparsity (pinning uses it), per layer quantiles of
|h| and of |act(gate)| (thresholds for any sparsity at run time), the share of exact zeros (natural
sparsity), and the predictors with their recall and precision on held-back calibration tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load_tokenizer
from tqdm import tqdm

from mlx_flash.cli import add_debug_arg, run_cli
from mlx_flash.runtime.adapters import ACTIVATIONS
from mlx_flash.runtime.calibration import (
    LEVELS,
    Calibration,
    Predictors,
    default_sparsity,
    natural_zeros,
    operating_points,
    save_calibration,
    sparsity_words,
)
from mlx_flash.runtime.errors import FlashError, OptionError
from mlx_flash.runtime.ffn import dense_rows, hidden, partial_output, project_in
from mlx_flash.runtime.loader import disk_model, open_store
from mlx_flash.runtime.manifest import Manifest, read_manifest
from mlx_flash.runtime.options import FlashOptions
from mlx_flash.runtime.proxy import (
    Proxy,
    ProxyFormat,
    compress,
    outliers,
    read_proxy,
    save_proxy,
)
from mlx_flash.runtime.selectors import keep_counts
from mlx_flash.runtime.store import StoreReader
from mlx_flash.textdata import text_windows

from . import selection
from .placement import MIN_GAIN, Placement, apply_placement, fit_layer
from .predictor import auto_ranks, choose_cut, score_predictor, train_predictor
from .quality import Guard, trunk_model

SEQ_LEN = 256  # tokens per calibration window (each starts a fresh context)
MAX_TOKENS = 16384  # fitted on: enough for stable quantiles and a few hundred positives per neuron
HELD_TOKENS = 8192  # held back for the quality guard (nothing is fitted on them)
ERROR_TOKENS = 1024  # per layer, the tokens selection errors are measured on
SENSITIVITY_WINDOWS = 2  # calibration windows each layer's loss sensitivity is measured on
# the sparsity it is measured at: one layer at 0.5 moves the loss of 512 tokens by less than their
# noise (a third of SmolLM2's layers measured below zero there), at 0.8 well above it
SENSITIVITY_SPARSITY = 0.8
SENSITIVITY_FLOOR = 0.25  # no layer counts as less sensitive than this share of the median
CHECK_WINDOWS = 4  # windows the per-layer allocation is checked against uniform sparsity on
CHECK_SPARSITY = 0.4
HELD_OUT = 0.2  # share of windows kept back: half sets the predictors' cut, half measures them
NATURAL_MARGIN = 1.3  # natural zeros: predict 1.3x the active share (see convert/predictor.py)
BATCH_TOKENS = 1024  # tokens per forward pass (each pass reads every layer's FFN once)
PLACEMENT_TOKENS = 1024  # consecutive tokens placement is fitted (first half) and measured on
PLACEMENT_MIN_TOKENS = 256  # fewer say too little about which neurons fire together
QUANTILE_TOKENS = 1024  # tokens whose activations give the quantiles (1.5M values for SmolLM2)


def builtin_text_path() -> Path:
    """The packaged English sample: Austen passages, public domain (mlx_flash/data/README.md)."""
    import mlx_flash

    return Path(mlx_flash.__file__).parent / "data" / "calibration.txt"


class _Captured(Exception):
    """Raised by the last layer's capture: the rest of the pass (final norm, head) is not needed."""


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
        parts = {k: mx.array(v) for k, v in reader.read_layer(self._layer).items()}
        out = partial_output(xf, parts, m.activation, m.gated, m.quantization)
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
    """Run the dense model over ``windows``; per layer, the FFN inputs [tokens, d_model] as
    memory maps."""
    tokens = windows.size
    inputs = [
        np.lib.format.open_memmap(
            scratch / f"x{i}.npy", "w+", np.float32, (tokens, manifest.d_model)
        )
        for i in range(manifest.n_layers)
    ]
    per_batch = max(1, BATCH_TOKENS // windows.shape[1])
    with StoreReader(directory, manifest, threads=4) as reader:
        model = trunk_model(
            directory, manifest, lambda i: _CaptureFFN(reader, manifest, i, inputs[i])
        )
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
    h = hidden(xm, parts, manifest.activation, manifest.gated, manifest.quantization, g)
    return mx.abs(h), (None if g is None else mx.abs(g))


def active_mask(
    parts: dict[str, mx.array],
    manifest: Manifest,
    x: np.ndarray,
    threshold: float,
    chunk: int = 2048,
) -> np.ndarray:
    """Which neurons are active (|h| > threshold) for each token of ``x``, computed a chunk of
    tokens at a time."""
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
    tokens: _Tokens,
    sparsity: float | None,
) -> tuple[tuple, float, dict[str, float]]:
    """Train on the training tokens, set the cut on the next ones, measure on the rest."""
    train, cut_end = tokens.train, tokens.cut
    margin = NATURAL_MARGIN if sparsity is None else 1.0
    up = None if manifest.gated else np.array(dense_rows(parts, "up", manifest.quantization))
    up_bias = None if up is None or "up_bias" not in parts else np.array(parts["up_bias"][:, 0])
    weights = train_predictor(x[:train], active[:train], rank, up=up, up_bias=up_bias)
    cut = choose_cut(weights, x[train:cut_end], active[train:cut_end], margin)
    return weights, cut, score_predictor(weights, cut, x[cut_end:], active[cut_end:])


def _quantiles(values: np.ndarray) -> np.ndarray:
    return np.quantile(values.reshape(-1), LEVELS).astype(np.float32)


@dataclass(frozen=True)
class _Tokens:
    """The calibration tokens, in windows, and how they are used: [0, train) fit everything,
    [train, cut) set the predictors' cut, [cut, end) measure the predictors."""

    windows: np.ndarray
    train: int
    cut: int

    @classmethod
    def split(cls, windows: np.ndarray) -> _Tokens:
        held = max(2, int(round(len(windows) * HELD_OUT)))
        if len(windows) - held < 1:
            raise FlashError(
                f"calibration text is too short: {windows.size} tokens, need at least "
                f"{(held + 1) * windows.shape[1]}"
            )
        train = (len(windows) - held) * windows.shape[1]
        return cls(windows, train, train + held // 2 * windows.shape[1])

    @property
    def held_out(self) -> int:
        return self.windows.size - self.train


def calibrate(
    directory: str | Path,
    text: str | Path | None = None,
    *,
    sparsity: float | None = None,
    ranks: list[int] | int | None = None,
    predictors: bool | None = None,
    seq_len: int = SEQ_LEN,
    max_tokens: int = MAX_TOKENS,
    held_tokens: int = HELD_TOKENS,
    proxy: str | None = None,
    placement: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Calibrate the flash model directory in place; returns its updated manifest.

    ``text``: a text file (default: the built-in English sample). ``sparsity``: the target the
    predictors learn (default: natural zeros for ReLU-family FFNs, else 0.5). ``predictors``:
    train them (default: for ReLU-family FFNs, or when ``ranks`` are given; the proxy serves the
    others). ``ranks``: predictor rank for every layer. ``held_tokens``: tokens held back for the
    quality guard (0 skips it; then ``auto`` runs dense). ``proxy``: the proxy's format (e.g.
    "q4g64+keep8"; default: chosen by measuring, see ``selection.py``). ``placement``: store
    neurons by co-activation where that measures to save read time (``placement.py``).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    sparsity = _target(manifest, sparsity)
    train = (natural_zeros(manifest) or ranks is not None) if predictors is None else predictors
    rank_list = _rank_list(manifest, ranks) if train else None
    path, fit, held = _text(directory, text, seq_len, max_tokens, held_tokens)
    tokens = _Tokens.split(fit)
    target = "natural (exact zeros)" if sparsity is None else f"{sparsity:g}"
    log(
        f"Calibrating on {fit.size} tokens of {path.name} ({held.size} more held back for the "
        f"quality guard), target sparsity {target}"
    )
    forced = None if proxy is None else ProxyFormat.parse(proxy)
    pool = _pool(manifest, forced)
    scratch = Path(tempfile.mkdtemp(prefix=".calibration-", dir=directory))
    try:
        inputs = collect_ffn_inputs(directory, manifest, fit, scratch, progress)
        if placement:
            manifest = _place(directory, manifest, inputs, sparsity, progress, log)
        calibration, trained, errors, channels = _measure(
            directory, manifest, inputs, tokens, sparsity, rank_list, pool, progress
        )
        proxy, proxy_info, curves = _proxy(
            directory, manifest, inputs, errors, channels, pool, forced, log
        )
        del inputs  # their mappings (every layer's inputs) must not outlive the scratch files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info = {
        "calibration": {"text": path.name, "held_out_tokens": tokens.held_out, "seq_len": seq_len}
    }
    stored = None
    if trained:
        stored, info["predictor"] = _predictors(directory, manifest, trained, sparsity)
    if proxy is not None:
        info["proxy"] = {**save_proxy(directory, proxy), **proxy_info}
    # the guard gets the copy as written and keeps only what it scores with (its packed words, its
    # float parts in float32); nothing here holds the packed float16 parts while the trunk loads
    del proxy
    with Guard(directory, manifest, _saved_proxy(directory, manifest, info), stored) as guard:
        if curves is not None:
            info["allocation"] = _allocate(guard, fit, curves, calibration, log)
        if held.size:
            dense, points = guard.operating_points(held, calibration, progress)
            info["quality"] = {
                "tokens": int(held.size),
                "text": path.name,
                "dense_perplexity": dense,
                "points": [asdict(p) for p in points],
            }
    manifest = save_calibration(directory, manifest, calibration, stored, info)
    _report(manifest, log)
    return manifest


def _place(
    directory: Path,
    manifest: Manifest,
    inputs: list[np.ndarray],
    sparsity: float | None,
    progress: bool,
    log: Callable[[str], None],
) -> Manifest:
    """Measure co-activation placement on the first ``PLACEMENT_TOKENS`` calibration tokens and
    rewrite the store in its order if it saves read time; returns the manifest in force."""
    tokens = min(PLACEMENT_TOKENS, len(inputs[0]))
    if tokens < PLACEMENT_MIN_TOKENS:
        log(f"  placement: not measured (needs {PLACEMENT_MIN_TOKENS} calibration tokens)")
        return manifest
    cost, threads = disk_model(directory, manifest)
    record, options = manifest.neuron_bytes(), FlashOptions()
    orders, stored, placed = [], [], []
    # the runtime's reader for the default options: placement plans runs with its gap rule
    with open_store(directory, manifest, options, cost, threads) as reader:
        bar = tqdm(range(manifest.n_layers), desc="placement", unit="layer", disable=not progress)
        for i in bar:
            parts = {k: mx.array(v) for k, v in reader.read_layer(i).items()}
            h = np.array(layer_activations(parts, manifest, np.asarray(inputs[i][:tokens]))[0])
            threshold = 0.0 if sparsity is None else float(np.quantile(h, sparsity))
            order, before, after = fit_layer(
                h > threshold, options.window, cost, record, threads, reader.gap_bytes
            )
            orders.append(order)
            stored.append(before)
            placed.append(after)
    result = Placement(orders, stored, placed, tokens - tokens // 2)
    info = result.summary()
    log(
        f"  placement by co-activation: {info['placed_reads_per_token']:g} vs "
        f"{info['stored_reads_per_token']:g} reads per token as stored, modelled read time "
        f"{-100 * result.gain():+.1f}% on tokens it was not fitted on"
    )
    if result.gain() < MIN_GAIN:
        return manifest
    return apply_placement(directory, manifest, result.orders, info, progress, log)


def _saved_proxy(directory: Path, manifest: Manifest, info: dict) -> Proxy | None:
    """The proxy calibration wrote (``info["proxy"]`` names it), read back."""
    if "proxy" not in info:
        return None
    m = manifest
    return read_proxy(directory, info["proxy"], m.n_layers, m.activation, m.gated)


def _target(manifest: Manifest, sparsity: float | None) -> float | None:
    if sparsity is None:
        return default_sparsity(manifest)
    if not 0.0 <= sparsity < 1.0:
        raise OptionError(f"--sparsity must be in [0, 1), got {sparsity}")
    return sparsity


def _text(
    directory: Path, text: str | Path | None, seq_len: int, max_tokens: int, held_tokens: int
) -> tuple[Path, np.ndarray, np.ndarray]:
    """The calibration text, in windows: those fitted on, and those held back for the guard
    (at most a third of them)."""
    path = Path(text) if text is not None else builtin_text_path()
    if not path.is_file():
        raise FlashError(f"{path}: calibration text not found")
    tokenizer = load_tokenizer(directory)
    windows = text_windows(tokenizer, path, seq_len, (max_tokens + held_tokens) // seq_len, 2)
    held = min(held_tokens // seq_len, len(windows) // 3)
    fit = windows[: len(windows) - held][: max(1, max_tokens // seq_len)]
    return path, fit, windows[len(windows) - held :]


def _proxy(
    directory: Path,
    manifest: Manifest,
    inputs: list[np.ndarray],
    errors: list,
    channels: list[np.ndarray],
    pool: tuple[ProxyFormat, ...],
    forced: ProxyFormat | None,
    log: Callable[[str], None],
) -> tuple[Proxy | None, dict, np.ndarray | None]:
    """The proxy (None for ReLU-family FFNs, which the predictor serves, and when no affordable
    candidate ranks neurons well enough), the facts worth keeping about the choice, and each
    layer's output error over ``selection.GRID`` with the selector that will run (None for
    ReLU-family FFNs)."""
    if natural_zeros(manifest):
        return None, {}, None
    fmt, ratios = selection.choose_proxy(errors, pool) if pool else (None, {})
    fmt = forced or fmt
    curves, layers = [], []
    with StoreReader(directory, manifest, threads=4) as reader:
        for i in range(manifest.n_layers):
            parts = {k: mx.array(v) for k, v in reader.read_layer(i).items()}
            x = mx.array(np.asarray(inputs[i][_spread(len(inputs[i]), ERROR_TOKENS)]))
            h = hidden(x, parts, manifest.activation, manifest.gated, manifest.quantization)
            if fmt is None:  # the gate selector (or dense) will run
                score = selection.gate_score(parts, manifest, x) if manifest.gated else mx.abs(h)
            else:
                rows, bias = selection.gate_up_rows(parts, manifest)
                layers.append(compress(rows, fmt, channels[i], bias))
                one = Proxy(fmt, [layers[-1]], manifest.activation, manifest.gated, unpack=True)
                score = one.astype(mx.float32).scores(0, x)
            curves.append(selection.error_curve(h, parts, manifest, score))
    names = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    if fmt is None:
        why = f"error vs the oracle's: {names}" if pool else "none costs a quarter of the FFN"
        log(f"  proxy: none here ({why})")
        return None, {}, np.array(curves)
    log(f"  proxy: {fmt.name} (error vs the oracle's: {names})")
    proxy = Proxy(fmt, layers, manifest.activation, manifest.gated)
    return proxy, {"error_vs_oracle": ratios}, np.array(curves)


def _allocate(
    guard: Guard,
    fit: np.ndarray,
    curves: np.ndarray,
    calibration: Calibration,
    log: Callable[[str], None],
) -> dict:
    """Per-layer sparsities: each layer's output-error curve scaled by what sparsifying that layer
    alone costs in loss, then allocated greedily; kept only when it beats the same sparsity in
    every layer on calibration tokens (layer-local errors alone misjudge layers)."""
    name = "proxy" if "proxy" in guard.makers else "gate" if "gate" in guard.makers else None
    if name is None:
        return {"used": False}
    sensitivity = guard.sensitivity(fit[:SENSITIVITY_WINDOWS], name, SENSITIVITY_SPARSITY)
    at = curves[:, list(selection.GRID).index(SENSITIVITY_SPARSITY)]
    scale = np.maximum(sensitivity, 0.0) / np.maximum(at, 1e-12)
    scale = np.maximum(scale, SENSITIVITY_FLOOR * np.median(scale))
    allocation = selection.allocate(curves * scale[:, None])
    check = fit[SENSITIVITY_WINDOWS : SENSITIVITY_WINDOWS + CHECK_WINDOWS]
    n, d_ffn = guard.manifest.n_layers, guard.manifest.d_ffn
    target = list(selection.TARGETS).index(CHECK_SPARSITY)
    allocated = guard.loss(check, name, keep_counts(allocation[target], d_ffn))
    uniform = guard.loss(check, name, keep_counts(np.full(n, CHECK_SPARSITY), d_ffn))
    used = allocated < uniform
    if used:
        calibration.allocation, calibration.targets = allocation, selection.TARGETS
    log(
        f"  per-layer sparsity: {'used' if used else 'not used'} (loss at {CHECK_SPARSITY:g}: "
        f"{allocated:.4f} allocated, {uniform:.4f} uniform)"
    )
    return {
        "used": bool(used),
        "selector": name,
        "check_loss_allocated": allocated,
        "check_loss_uniform": uniform,
        "sensitivity": sensitivity.tolist(),
    }


def _spread(n: int, k: int) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)``."""
    return np.linspace(0, n - 1, min(n, k)).astype(np.int64)


def _predictors(
    directory: Path, manifest: Manifest, trained: tuple, sparsity: float | None
) -> tuple[Predictors, dict]:
    """The trained layers' predictors as stored, and their facts for the manifest: cuts, margin,
    held-back quality per layer, and their share of the model's parameters."""
    weights, cuts, quality = trained
    stored = Predictors(*(list(w) for w in zip(*weights, strict=True)), cuts)
    params = sum(r * (manifest.d_model + manifest.d_ffn) + manifest.d_ffn for r in stored.ranks)
    return stored, {
        "cut": cuts,
        "margin": NATURAL_MARGIN if sparsity is None else 1.0,
        **{k: [q[k] for q in quality] for k in quality[0]},
        "share_of_parameters": params / model_parameters(directory, manifest),
    }


def _rank_list(manifest: Manifest, ranks: list[int] | int | None) -> list[int]:
    if ranks is None:
        return auto_ranks(manifest)
    rank_list = [ranks] * manifest.n_layers if isinstance(ranks, int) else list(ranks)
    if len(rank_list) != manifest.n_layers:
        raise OptionError(
            f"--predictor-rank needs one rank or {manifest.n_layers}, got {len(rank_list)}"
        )
    return rank_list


def _pool(manifest: Manifest, forced: ProxyFormat | None) -> tuple[ProxyFormat, ...]:
    """The proxy formats whose selection errors calibration measures: the candidates for this
    store, and a forced one (so its error is reported beside theirs)."""
    if natural_zeros(manifest):
        return ()
    pool = selection.candidates(manifest)
    return pool + (forced,) if forced is not None and forced not in pool else pool


def _measure(
    directory: Path,
    manifest: Manifest,
    inputs: list[np.ndarray],
    tokens: _Tokens,
    sparsity: float | None,
    ranks: list[int] | None,
    pool: tuple[ProxyFormat, ...],
    progress: bool,
):
    """Per layer, reading its FFN once: activation statistics, outlier input channels, the
    selection errors the proxy candidates and the oracle cause, and (with ``ranks``) a trained
    predictor with its cut and held-back quality."""
    n, levels = manifest.n_layers, len(LEVELS)
    frequency = np.zeros((n, manifest.d_ffn), np.float32)
    magnitude = np.zeros((n, levels), np.float32)
    gate_q = np.zeros((n, levels), np.float32) if manifest.gated else None
    zeros = np.zeros(n, np.float32)
    trained, errors, channels = [], [], []
    sample = _spread(tokens.train, QUANTILE_TOKENS)
    with StoreReader(directory, manifest, threads=4) as reader:
        bar = tqdm(range(n), desc="activations + selection", unit="layer", disable=not progress)
        for i in bar:
            parts = {k: mx.array(v) for k, v in reader.read_layer(i).items()}
            x = np.asarray(inputs[i][sample])
            h, g = (
                None if a is None else np.array(a) for a in layer_activations(parts, manifest, x)
            )
            magnitude[i], zeros[i] = _quantiles(h), float((h == 0).mean())
            if g is not None:
                gate_q[i] = _quantiles(g)
            del h, g
            channels.append(outliers(np.abs(x).mean(0)))
            if pool:
                x_err = x[_spread(len(x), ERROR_TOKENS)]
                errors.append(selection.layer_errors(parts, manifest, x_err, channels[i], pool))
            threshold = (
                0.0 if sparsity is None else float(np.interp(sparsity, LEVELS, magnitude[i]))
            )
            active = active_mask(parts, manifest, inputs[i], threshold)
            frequency[i] = active[: tokens.train].mean(0)
            if ranks is not None:
                x_all = np.asarray(inputs[i])
                trained.append(
                    _layer_predictor(parts, manifest, x_all, active, ranks[i], tokens, sparsity)
                )
                bar.set_postfix(recall=f"{trained[-1][2]['recall']:.3f}")
    calibration = Calibration(
        frequency, magnitude, gate_q, zeros, sparsity, int(tokens.windows.size)
    )
    trained = tuple(list(t) for t in zip(*trained, strict=True)) if trained else None
    return calibration, trained, errors, channels


def model_parameters(directory: Path, manifest: Manifest) -> int:
    """Parameters of the whole model: the trunk's (from the safetensors headers; packed quantized
    words count as the weights they hold) plus the FFN's (from its shape)."""
    bits = manifest.quantization.bits if manifest.quantization else 32
    total = manifest.n_layers * manifest.d_ffn * manifest.d_model * (3 if manifest.gated else 2)
    for path in directory.glob("model*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                total += int(np.prod(meta["shape"])) * (32 // bits if meta["dtype"] == "U32" else 1)
    return total


def _report(manifest: Manifest, log: Callable[[str], None]) -> None:
    quality = manifest.extra.get("quality")
    if quality:
        log(
            f"  quality guard on {quality['tokens']} held-back tokens (dense perplexity "
            f"{quality['dense_perplexity']:.3f}):"
        )
        for p in operating_points(manifest):
            target = sparsity_words(p.sparsity)
            log(f"    {p.selector:>9} {target:>14}, {p.compute_rows} rows: {100 * p.loss:+.2f}%")
    meta = manifest.extra.get("predictor")
    if not meta:
        return
    log(
        f"  predictors: ranks {meta['ranks']}, {meta['bytes'] / 1e6:.2f} MB, "
        f"{100 * meta['share_of_parameters']:.1f}% of the model's parameters; held-back recall "
        f"{np.mean(meta['recall']):.3f}, precision {np.mean(meta['precision']):.3f}, predicted "
        f"{np.mean(meta['predicted']):.3f} vs active {np.mean(meta['active']):.3f} of neurons"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.convert.calibrate",
        description="Re-run the calibration (statistics + predictors) of a flash model directory "
        "in place.",
    )
    p.add_argument("directory")
    p.add_argument(
        "--calibration", metavar="FILE", help="text file (default: the built-in English sample)"
    )
    add_calibration_flags(p)
    p.add_argument(
        "--predictor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the low-rank predictors (default: for ReLU-family FFNs only)",
    )
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="tokens to fit on")
    p.add_argument(
        "--held-tokens",
        type=int,
        default=HELD_TOKENS,
        help="tokens held back to measure each selector's quality (0: skip; auto then runs dense)",
    )
    p.add_argument(
        "--proxy",
        metavar="FORMAT",
        help="the proxy's format, e.g. q4g64+keep8 (default: the cheapest that ranks neurons "
        f"within {selection.PROXY_SLACK:g}x of the exact score's error)",
    )
    add_debug_arg(p)
    return p


def add_calibration_flags(p: argparse.ArgumentParser) -> None:
    """The calibration flags convert and calibrate share: what the predictors learn, and
    placement."""
    p.add_argument(
        "--sparsity",
        type=float,
        help="target share of FFN neurons skipped per token, which the predictors learn "
        "(default: exact zeros for ReLU-family FFNs, else 0.5)",
    )
    p.add_argument(
        "--predictor-rank",
        type=int,
        help="rank of every layer's predictor (default: about d_model/4, 4x for the last layers)",
    )
    p.add_argument(
        "--no-placement",
        dest="placement",
        action="store_false",
        help="keep the neurons in the source's order (default: store neurons often active "
        f"together side by side when that saves {100 * MIN_GAIN:g}%% or more of the read time)",
    )


def run(args: argparse.Namespace) -> int:
    calibrate(
        args.directory,
        args.calibration,
        sparsity=args.sparsity,
        ranks=args.predictor_rank,
        predictors=args.predictor,
        max_tokens=args.max_tokens,
        held_tokens=args.held_tokens,
        proxy=args.proxy,
        placement=args.placement,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
