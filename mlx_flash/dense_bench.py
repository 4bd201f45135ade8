"""``python -m mlx_flash.bench --synthetic llama-2-7b --trace FILE``: the paper's ablation at a 7B
FFN's shape.

Why: the paper's numbers (Table 2: OPT-6.7B, naive 2196 ms of flash I/O per token down to 87 ms)
are for 7B models, whose records and layers we cannot run here with real weights. The disk's side
of the method depends on the store's geometry and on which neurons tokens select, not on the
weights: this bench runs the five configurations of ``bench`` (naive, hybrid, +selector, +window,
+bundling) on a synthetic store of Llama-2-7B's FFN shape (``synthetic``: random weights, FFN only)
with the selections of a real model's run, recorded with ``--record-trace`` and scaled to the
larger shape (``trace_scaling``).

FFN-only harness: per token, every layer's ``FlashFFN`` (the runtime's own, with its buffers,
window, pinning and store reader, built by ``loader.open_dense``) runs on one fixed random input;
the sparse configurations' selector answers with the trace's ids for that token and layer. No
attention, embeddings or head run. The first ``--warmup`` tokens fill the buffers and pinned rows
(the most frequent neurons of those tokens are pinned), the next ``--tokens`` are timed. Reads
bypass the page cache and the store is dropped from it before each run. The buffers hold the
runtime's compute dtype: on a CPU float32, so the reader converts each float16 record as it lands
(I/O time); ``--compute-dtype float16`` keeps records as stored, as a Mac's GPU does.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .bench import SETUPS, Setup, _median_rows, _pin_share, setup_options
from .runtime.budget import ModelFacts, plan_memory
from .runtime.errors import OptionError
from .runtime.limit import LIMIT
from .runtime.loader import (
    buffer_parts,
    default_compute_dtype,
    disk_model,
    open_dense,
    open_store,
    row_bytes,
)
from .runtime.manifest import MX_DTYPES, read_manifest
from .runtime.options import FlashOptions
from .runtime.pagecache import drop_from_page_cache
from .runtime.selectors import Choice, FixedSelector
from .runtime.sizes import format_size
from .runtime.trace import Trace, load_trace
from .synthetic import SHAPES, DenseShape, synthetic_store
from .trace_scaling import density, overlap, scale_trace

# The paper's Table 2 (OPT-6.7B, M1 Max, about half the model in DRAM): I/O ms per token, and the
# read rate it states where it states one (MB/token = ms x rate, derived).
PAPER = (
    ("naive", 2196, 6.1e9),
    ("hybrid", 1090, None),
    ("+selector", 738, 1.25e9),
    ("+window", 164, None),
    ("+bundling", 87, 2.25e9),
)


def dense_synthetic(name: str) -> bool:
    """Whether ``--synthetic name`` is a dense shape (this bench) rather than a MoE one."""
    return isinstance(SHAPES.get(name), DenseShape)


def run_dense_synthetic(
    args: argparse.Namespace, flash: dict[str, Any], progress: bool = True
) -> dict:
    """Build (once) the stores the chosen configurations read, scale the trace, run every
    configuration ``args.repeat`` times with the flash options ``flash`` (the flags given); the
    report as JSON-ready data."""
    if args.trace is None:
        raise OptionError(
            f"--synthetic {args.synthetic} replays a neuron trace: give --trace FILE (recorded "
            "with --record-trace on generate or bench)"
        )
    chosen = [s for s in SETUPS if s.index in {int(c) for c in args.configs.split(",")}]
    dirs = {
        layout: synthetic_store(args.synthetic, args.synthetic_dir, progress, layout=layout)
        for layout in sorted({s.layout for s in chosen})
    }
    manifest = read_manifest(next(iter(dirs.values())))
    tokens, warmup = args.tokens or 16, 8 if args.warmup is None else args.warmup
    source = load_trace(args.trace)
    trace = scale_trace(source, manifest.d_ffn, manifest.n_layers, warmup + tokens)
    trace.save(next(iter(dirs.values())) / f"trace-{Path(args.trace).stem}.npz")
    options = {"ffn_cache": 0.5, "window": 4, **flash}  # the harness's defaults
    rounds = []
    bar = tqdm(total=args.repeat * len(chosen), desc="bench", unit="run", disable=not progress)
    for _ in range(args.repeat):
        rounds.append([])
        for setup in chosen:
            bar.set_postfix_str(setup.name)
            rounds[-1].append(measure(setup, dirs[setup.layout], trace, options, warmup, tokens))
            gc.collect()  # the last run's buffers (runtime <-> layers is a cycle)
            mx.clear_cache()
            bar.update()
    bar.close()
    rows = _median_rows(rounds)
    return {
        "synthetic": args.synthetic,
        "directories": {k: str(v) for k, v in dirs.items()},
        "store_bytes": manifest.store_size,
        "record_bytes": manifest.neuron_bytes(),
        "shape": [manifest.n_layers, manifest.d_ffn],
        "trace": _trace_facts(args.trace, source, trace),
        "settings": {"tokens": tokens, "warmup": warmup, "repeat": args.repeat, **options},
        "cost_model": rounds[0][0]["cost_model"],
        "configs": rows,
        "paper": [
            {"name": n, "io_ms_per_token": ms, "mb_per_token": rate and ms * rate / 1e9}
            for n, ms, rate in PAPER
        ],
    }


def measure(
    setup: Setup, directory: Path, trace: Trace, options: dict, warmup: int, tokens: int
) -> dict:
    """One configuration on the harness (see the module docstring); its per-token metrics."""
    manifest = read_manifest(directory)
    drop_from_page_cache(directory / manifest.store_file)
    at = [0]
    replay = FixedSelector(lambda layer, x: trace.at(at[0], layer))
    opts = FlashOptions.build(setup_options(setup, {**options, "selector": replay}))
    dtype = MX_DTYPES[opts.compute_dtype or default_compute_dtype(manifest)]
    facts = ModelFacts(
        manifest.n_layers, manifest.d_model, manifest.d_ffn, 0, 1, dtype.size, 0, 0, ()
    )
    plan = plan_memory(facts, opts, 0, row_bytes(manifest, dtype.size, ()), not setup.sparse)
    choice = Choice(
        "trace" if setup.sparse else "dense", None, "selected", None, "a replayed trace"
    )
    cost, threads = disk_model(directory, manifest, opts.threads)
    reader = open_store(directory, manifest, opts, cost, threads)
    runtime = open_dense(
        directory, manifest, opts, plan, dtype, choice, buffer_parts(manifest, dtype, ()), cost,
        reader, hot=_counts(trace, warmup),
    )  # fmt: skip
    try:
        x = 0.1 * mx.random.normal((1, 1, manifest.d_model), key=mx.random.key(0)).astype(dtype)
        for t in range(warmup if setup.sparse else 1):  # dense: the first token pins
            at[0] = t
            _token(runtime, x)
        runtime.telemetry.reset()
        mx.reset_peak_memory()
        begin = time.perf_counter()
        for t in range(warmup, warmup + tokens):
            at[0] = t
            _token(runtime, x)
        wall = time.perf_counter() - begin
        return _row(setup, runtime, wall, tokens)
    finally:
        runtime.close()


def _token(runtime, x: mx.array) -> None:
    for layer in runtime.layers:
        layer(x)


def _counts(trace: Trace, warmup: int) -> np.ndarray:
    """How often each neuron was selected in the warm-up tokens, per layer (the pinned ones are
    the most frequent, as calibration's statistics pick them in a converted model)."""
    counts = np.zeros((trace.n_layers, trace.n_ids))
    for t in range(warmup):
        for layer in range(trace.n_layers):
            counts[layer, trace.at(t, layer)] += 1
    return counts


def _row(setup: Setup, runtime, wall: float, tokens: int) -> dict:
    """The run's metrics, under the names ``bench`` reports (no prompt, no sampling here)."""
    s = runtime.telemetry.summary("decode")
    reads = s["reads_per_token"]
    ms = 1e3 * wall / tokens
    return {
        "index": setup.index,
        "name": setup.name,
        "what": setup.what,
        "layout": runtime.manifest.layout,
        "selector": runtime.selector.name,
        "window": runtime.window,
        "pinned_rows": runtime.plan.pinned_rows,
        "window_rows": runtime.plan.window_rows,
        "threads": runtime.reader.threads,
        "cache_mode": runtime.reader.cache_mode,
        "cost_model": runtime.cost.source,
        "tokens": [],
        "ffn_bytes_per_token": s["flash_bytes_per_token"],
        "reads_per_token": reads,
        "mean_read_bytes": s["flash_bytes_per_token"] / reads if reads else 0.0,
        "io_ms_per_token": s["io_ms_per_token"],
        "limit_ms_per_token": s["limit_ms_per_token"],
        "ffn_compute_ms_per_token": s["compute_ms_per_token"],
        "lookahead_recall": s["lookahead_recall"],
        "other_ms_per_token": ms - s["io_ms_per_token"] - s["compute_ms_per_token"],
        "ms_per_token": ms,
        "tokens_per_s": tokens / wall,
        "prompt_tps": 0.0,
        "peak_memory": mx.get_peak_memory(),
        "fraction_used": s["fraction_used"],
        "fraction_loaded": s["fraction_loaded"],
        "buffer_memory": runtime.plan.buffers,
    }


def _trace_facts(path: Path, source: Trace, scaled: Trace) -> dict:
    """Where the trace came from and what the scaling kept (mean over layers)."""

    def mean(f, t: Trace) -> float:
        return float(np.mean([f(t, layer) for layer in range(t.n_layers)]))

    return {
        "file": str(path),
        "source": source.meta,
        "source_shape": [source.n_layers, source.n_ids, source.tokens],
        "density": [mean(density, source), mean(density, scaled)],
        "overlap": [mean(overlap, source), mean(overlap, scaled)],
    }


def format_dense_synthetic(report: dict) -> str:
    """Ours beside the paper's Table 2, with what the harness is."""
    s, tr = report["settings"], report["trace"]
    rows = report["configs"]
    src = tr["source"]
    out = [
        f"synthetic {report['synthetic']}: Llama-2-7B's FFN shape, random weights, "
        f"{report['record_bytes']:,} B per neuron record, store "
        f"{format_size(report['store_bytes'])}. FFN-only harness: no attention, embeddings or "
        "head (the paper's naive reads the whole model, ours the FFN); per token every layer's "
        "FlashFFN runs on one random input with the trace's selection",
        f"trace {tr['file']} ({src.get('selector', '?')} selector of {src.get('model', '?')}: "
        f"{tr['source_shape'][0]} layers x {tr['source_shape'][1]} neurons, "
        f"{tr['source_shape'][2]} tokens) scaled to {report['shape'][0]} layers x "
        f"{report['shape'][1]} neurons: density {100 * tr['density'][0]:.1f}% -> "
        f"{100 * tr['density'][1]:.1f}%, "
        f"overlap with the token before {100 * tr['overlap'][0]:.1f}% -> "
        f"{100 * tr['overlap'][1]:.1f}% (means over layers)",
        f"FFN cache {100 * s['ffn_cache']:.0f}% of each layer, window k={s['window']}, pin share "
        f"{_pin_share(s)}, {rows[-1]['threads']} threads"
        f"{'' if s.get('lookahead', True) else ', look-ahead off'}, {s['warmup']} warm-up + "
        f"{s['tokens']} timed tokens, median of {s['repeat']} round(s), ratios within a round",
        f"{'':<13}{'--- paper (OPT-6.7B, M1 Max) ---':>33}  {'--- ours ---'}",
        f"{'config':<13}{'I/O ms':>9}{'x':>7}{'MB/tok':>9}{'':>8}  {'I/O ms':>9}{'x':>7}"
        f"{'MB/tok':>9}{'reads':>8}{'KB/read':>9}{'limit ms':>10}{'FFN ms':>9}{'loaded':>8}",
    ]
    paper = {p["name"]: p for p in report["paper"]}
    naive = report["paper"][0]["io_ms_per_token"]
    for r in rows:
        p = paper[r["name"]]
        mb = f"{p['mb_per_token']:9.0f}" if p["mb_per_token"] else f"{'—':>9}"
        out.append(
            f"{r['index']}. {r['name']:<10}{p['io_ms_per_token']:9.0f}"
            f"{naive / p['io_ms_per_token']:7.1f}{mb}{'':>8}  {r['io_ms_per_token']:9.1f}"
            f"{r['io_ms_per_token_vs_naive']:7.1f}{r['ffn_bytes_per_token'] / 1e6:9.1f}"
            f"{r['reads_per_token']:8.0f}{r['mean_read_bytes'] / 1e3:9.1f}"
            f"{r['limit_ms_per_token']:10.1f}{r['ffn_compute_ms_per_token']:9.1f}"
            f"{100 * r['fraction_loaded']:7.1f}%"
        )
    out.append(
        "columns: x = naive / config (I/O time); paper MB/tok = its I/O time x the read rate it "
        f"states (blank where it states none); {LIMIT} ({report['cost_model']}); FFN ms = the "
        "layers' time outside reads (compute on the selected rows, window, buffer work); loaded "
        "= FFN neurons read per token"
    )
    return "\n".join(out)
