"""``python -m mlx_flash.bench``: the paper's ablation, each configuration a real run of the
runtime.

Why: users ask first how much faster than loading the weights the naive way, at what memory, and how
close to what the disk allows. Every configuration generates the same greedy tokens from the same
prompt at the same FFN cache share, with the page cache bypassed and the store dropped from it
before each run, so every counted byte comes from the disk. Attention and embeddings stay in memory
in all of them: the ratios are about FFN I/O.

    python -m mlx_flash.bench --model DIR --ffn-cache 50% --tokens 64 \\
        --json bench.json --plot bench.png
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.utils import load_tokenizer
from tqdm import tqdm

from .cli import add_debug_arg, add_flash_args, load_options, run_cli, write_outputs
from .moe_bench import add_synthetic_args, format_model, format_synthetic, run_model, run_synthetic
from .plots import plot_ablation
from .runtime.calibration import sparsity_words
from .runtime.costmodel import CostModel, cost_model_for
from .runtime.errors import FlashError, OptionError
from .runtime.files import cache_root
from .runtime.limit import LIMIT
from .runtime.loader import load
from .runtime.manifest import Manifest, read_manifest
from .runtime.pagecache import cached_bytes, drop_from_page_cache, file_system_type
from .runtime.sizes import format_size, parse_size

TOOL = "bench"

DEFAULT_PROMPT = (
    "The old lighthouse stood at the edge of the cliff, and every night the keeper climbed its "
    "stairs to light the lamp. One evening a storm came in from the sea,"
)
# the budget passed with --ffn-cache: the share, not the budget, sizes the buffers
UNLIMITED = 1 << 50
CGROUP_ENV = "MLX_FLASH_BENCH_IN_CGROUP"
# --membudget: interpreter, MLX, numpy and tokenizer on top of what the plan counts
PROCESS_SLACK = 1 << 30


@dataclass(frozen=True)
class Setup:
    """One configuration of the ablation: the store layout, selector, window and pinning it runs
    with."""

    index: int
    name: str
    what: str
    layout: str
    sparse: bool  # the chosen selector (else dense: every neuron every token)
    keeps_window: bool  # window k as asked (else 0: the window buffer is emptied after every token)
    pins: bool  # pin_share as asked (else 0: nothing pinned)


SETUPS = (
    Setup(
        1,
        "naive",
        "whole FFN read every token in large sequential reads, nothing kept",
        "bundled",
        False,
        False,
        False,
    ),
    Setup(
        2,
        "hybrid",
        "FFN cache kept (pinned rows + last streamed chunk), the rest read every token",
        "bundled",
        False,
        True,
        True,
    ),
    Setup(
        3,
        "+selector",
        "only selected neurons read, as separate gate/up/down records, no window",
        "unbundled",
        True,
        False,
        True,
    ),
    Setup(
        4,
        "+window",
        "neurons of the last k tokens stay, only new ones read (unbundled)",
        "unbundled",
        True,
        True,
        True,
    ),
    Setup(
        5,
        "+bundling",
        "same neurons, one record per neuron (bundled layout)",
        "bundled",
        True,
        True,
        True,
    ),
)

IN_MEMORY = Setup(
    0,
    "FFN in memory",
    "whole FFN pinned: the runtime with no reads (its per-layer cost alone)",
    "bundled",
    False,
    True,
    True,
)

METRICS = (
    "ffn_bytes_per_token",
    "reads_per_token",
    "mean_read_bytes",
    "io_ms_per_token",
    "ffn_compute_ms_per_token",
    "other_ms_per_token",
    "ms_per_token",
    "tokens_per_s",
    "prompt_tps",
    "peak_memory",
    "fraction_loaded",
    "lookahead_recall",
    "limit_ms_per_token",
)


def run_setup(setup: Setup, directory: Path, prompt: list[int], tokens: int, options: dict) -> dict:
    """Load ``directory`` as ``setup`` says, generate ``tokens`` greedy tokens cold from disk;
    its metrics."""
    store = directory / read_manifest(directory).store_file
    drop_from_page_cache(store)
    model, tokenizer = load(directory, **setup_options(setup, options))
    rt = model.flash
    try:
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        ids, last = _greedy(model, tokenizer, prompt, tokens)
        summary = rt.telemetry.summary("decode")
        peak = mx.get_peak_memory()
        result = _measured(setup, rt, ids, last, summary, peak)
        result["page_cache_after"] = cached_bytes(store)
    finally:
        rt.close()
        del model
        gc.collect()
    return _with_time_split(result)


def _greedy(model, tokenizer, prompt: list[int], tokens: int) -> tuple[list[int], object]:
    """``tokens`` greedy tokens after ``prompt``: their ids, and mlx-lm's last response (the
    rates)."""
    ids, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
        ids.append(last.token)
    return ids, last


def _measured(setup: Setup, rt, ids: list[int], last, summary: dict, peak: int) -> dict:
    """What one run of ``setup`` did: its settings as the runtime resolved them, the tokens, and
    the decode telemetry (``last``: mlx-lm's final response, with the rates)."""
    return {
        "index": setup.index,
        "name": setup.name,
        "what": setup.what,
        "layout": rt.manifest.layout,
        "selector": rt.selector.name,
        "window": rt.window,
        "pinned_rows": rt.plan.pinned_rows,
        "window_rows": rt.plan.window_rows,
        "threads": rt.reader.threads,
        "cache_mode": rt.reader.cache_mode,
        "tokens": ids,
        "decode_tokens": summary["tokens"],
        "ffn_bytes_per_token": summary["flash_bytes_per_token"],
        "reads_per_token": summary["reads_per_token"],
        "io_ms_per_token": summary["io_ms_per_token"],
        "limit_ms_per_token": summary["limit_ms_per_token"],
        "ffn_compute_ms_per_token": summary["compute_ms_per_token"],
        "fraction_used": summary["fraction_used"],
        "fraction_loaded": summary["fraction_loaded"],
        "fraction_computed": summary["fraction_computed"],
        "buffer_hit_rate": summary["buffer_hit_rate"],
        "lookahead_recall": summary["lookahead_recall"],
        "lookahead_recall_per_layer": rt.telemetry.lookahead_recall_per_layer(),
        "tokens_per_s": last.generation_tps,
        "prompt_tps": last.prompt_tps,
        "peak_memory": peak,
        "memory_plan": rt.plan.as_dict(),
    }


def _with_time_split(result: dict) -> dict:
    """``result`` with the mean read size and the time per token and its split."""
    reads = result["reads_per_token"]
    result["mean_read_bytes"] = result["ffn_bytes_per_token"] / reads if reads else 0.0
    result["ms_per_token"] = (
        1e3 / result["tokens_per_s"] if result["tokens_per_s"] else float("nan")
    )
    result["other_ms_per_token"] = (
        result["ms_per_token"] - result["io_ms_per_token"] - result["ffn_compute_ms_per_token"]
    )
    return result


def setup_options(setup: Setup, options: dict) -> dict:
    """``mlx_flash.load`` keywords for ``setup``: the asked options with what the setup leaves out
    turned off, the FFN cache share fixed, the store read uncached; ``--record-trace`` records
    the full configuration's selections only."""
    return {
        **options,
        "memory_budget": UNLIMITED,
        "page_cache": False,
        "pin_share": options.get("pin_share") if setup.pins else 0.0,
        "window": options.get("window", 4) if setup.keeps_window else 0,
        "selector": options.get("selector", "auto") if setup.sparse else "dense",
        "record_trace": options.get("record_trace") if setup == SETUPS[-1] else None,
    }


def _references(directory: Path, prompt: list[int], tokens: int, options: dict) -> list[dict]:
    """Two bounds on tokens/s with no reads: plain mlx-lm with the whole model in memory (same
    weights), and the flash runtime with the whole FFN pinned (what its per-layer work costs
    without I/O)."""
    from .rebuild import load_dense

    model, tokenizer = load_dense(directory)
    gc.collect()
    mx.reset_peak_memory()
    ids, last = _greedy(model, tokenizer, prompt, tokens)
    plain = {
        "name": "mlx-lm, model in memory",
        "tokens": ids,
        "tokens_per_s": last.generation_tps,
        "prompt_tps": last.prompt_tps,
        "peak_memory": mx.get_peak_memory(),
    }
    del model
    gc.collect()
    pinned = run_setup(IN_MEMORY, directory, prompt, tokens, {**options, "ffn_cache": 1.0})
    return [
        plain,
        {
            "name": IN_MEMORY.name,
            **{
                k: pinned[k]
                for k in (
                    "tokens",
                    "tokens_per_s",
                    "prompt_tps",
                    "peak_memory",
                    "ffn_compute_ms_per_token",
                )
            },
        },
    ]


def _median_references(rounds: list[list[dict]]) -> list[dict]:
    """The references' medians over rounds (each round runs both, one after the other); the
    runtime's tokens/s relative to plain mlx-lm's taken within each round (``vs_mlx_lm``)."""
    if not rounds:
        return []
    plain, pinned = dict(rounds[0][0]), dict(rounds[0][1])
    for i, ref in enumerate((plain, pinned)):
        ref["round_values"] = {"tokens_per_s": [r[i]["tokens_per_s"] for r in rounds]}
        ref["tokens_per_s"] = statistics.median(ref["round_values"]["tokens_per_s"])
    pinned["vs_mlx_lm"] = statistics.median(
        r[1]["tokens_per_s"] / r[0]["tokens_per_s"] for r in rounds
    )
    return [plain, pinned]


def _median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per setup, the median of every metric over rounds, and ratios to naive taken within each
    round."""
    rows = []
    for i, first in enumerate(rounds[0]):
        row = dict(first)
        for key in METRICS:
            row[key] = statistics.median(r[i][key] for r in rounds)
        for key, better in (
            ("ffn_bytes_per_token", "lower"),
            ("io_ms_per_token", "lower"),
            ("tokens_per_s", "higher"),
        ):
            ratios = []
            for r in rounds:
                base, value = r[0][key], r[i][key]
                ratios.append(
                    (base / value if better == "lower" else value / base)
                    if value and base
                    else float("nan")
                )
            row[f"{key}_vs_naive"] = statistics.median(ratios)
        row["same_tokens_as_naive"] = _same_tokens(first["tokens"], rounds[0][0]["tokens"])
        row["round_values"] = {
            key: [r[i][key] for r in rounds]
            for key in ("ffn_bytes_per_token", "io_ms_per_token", "tokens_per_s")
        }
        rows.append(row)
    return rows


def _same_tokens(tokens: list[int], naive: list[int]) -> str:
    """How many of the greedy tokens equal naive's, over as many as both have: "same/compared"."""
    same = [a == b for a, b in zip(tokens, naive, strict=False)]
    return f"{sum(same)}/{len(same)}"


def run_bench(
    model_dir: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    tokens: int = 64,
    repeat: int = 1,
    setups: tuple[int, ...] = (1, 2, 3, 4, 5),
    unbundled: Path | None = None,
    reference: bool = True,
    progress: bool = True,
    **options,
) -> dict:
    """Run the ablation; the report as JSON-ready data (see ``format_report``).

    ``options``: ``mlx_flash.load``'s, with exactly one of ``ffn_cache`` (the share of each FFN in
    memory) and ``memory_budget`` (the share it leaves, for the full configuration)."""
    model_dir = Path(model_dir).absolute()
    if ("ffn_cache" in options) == ("memory_budget" in options):
        raise OptionError("give exactly one of --ffn-cache and --memory-budget")
    manifest = read_manifest(model_dir)
    chosen = [s for s in SETUPS if s.index in setups]
    dirs = _layout_dirs(model_dir, manifest.layout, chosen, unbundled, progress)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = tokenizer.encode(prompt)
    options = {"max_context": len(prompt_ids) + tokens + 1, **options}
    cost = cost_model_for(model_dir)
    # the selector first: the budget's FFN share is the one it leaves beside the selector that runs
    options, auto = _sparse_point(model_dir, options)
    if "memory_budget" in options:
        options = _budget_as_ffn_share(model_dir, options)
    run_setup(SETUPS[-1], model_dir, prompt_ids, 2, options)  # warm-up: the full stack

    rounds = _run_rounds(chosen, dirs, prompt_ids, tokens, options, repeat, progress)
    rows = _median_rows(rounds)
    refs = _median_references(
        [
            _references(model_dir, prompt_ids, tokens, options)
            for _ in range(repeat if reference else 0)
        ]
    )
    for ref in refs:
        ref["same_tokens_as_naive"] = _same_tokens(ref["tokens"], rows[0]["tokens"])
    return {
        "machine": _machine(model_dir, cost),
        "model": _model_facts(model_dir, manifest, dirs),
        "settings": {**_settings(prompt, prompt_ids, tokens, repeat, options, rows), "auto": auto},
        "memory": _memory(rows[-1]["memory_plan"]),
        "configs": rows,
        "physical_limit_ms": rows[-1]["limit_ms_per_token"],
        "references": refs,
    }


def _layout_dirs(
    model_dir: Path, layout: str, chosen: list[Setup], unbundled: Path | None, progress: bool
) -> dict[str, Path]:
    """The directory of each store layout the chosen setups read: ``model_dir`` for its own, and
    ``unbundled`` or a cached re-laid-out copy for the other one if a setup needs it."""
    from .convert.relayout import layout_sibling

    log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    dirs = {layout: model_dir}
    other = "unbundled" if layout == "bundled" else "bundled"
    if any(s.layout == other for s in chosen):
        dirs[other] = (
            unbundled
            if unbundled is not None and other == "unbundled"
            else layout_sibling(
                model_dir, other, cache_root() / "layouts", progress=progress, log=log
            )
        )
    return dirs


def _sparse_point(model_dir: Path, options: dict) -> tuple[dict, str | None]:
    """``options`` for the sparse setups: where ``auto`` would run dense streaming, the sparse point
    it passed over (the ablation needs one), with a note saying so; else ``options`` as given."""
    if options.get("selector", "auto") != "auto":
        return options, None
    model, _ = load(model_dir, **{**options, "page_cache": False})
    choice = model.flash.choice
    model.flash.close()
    del model
    if choice.sparse is None:
        return options, None
    point = choice.sparse
    note = (
        f"auto runs dense here ({choice.reason}); the selector setups run the point it passed "
        f"over: {point.name} at {sparsity_words(point.sparsity)}, {point.compute_rows} rows"
    )
    return {
        **options,
        "selector": point.name,
        "sparsity": point.sparsity,
        "compute_rows": point.compute_rows,
    }, note


def _budget_as_ffn_share(model_dir: Path, options: dict) -> dict:
    """``options`` with ``memory_budget`` replaced by the FFN share it leaves with the chosen
    selector, so that every setup holds the same share (read uncached, as the setups are)."""
    model, _ = load(model_dir, **{**options, "page_cache": False})
    share = model.flash.plan.ffn_share
    model.flash.close()
    del model
    return {**{k: v for k, v in options.items() if k != "memory_budget"}, "ffn_cache": share}


def _run_rounds(
    chosen: list[Setup],
    dirs: dict[str, Path],
    prompt: list[int],
    tokens: int,
    options: dict,
    repeat: int,
    progress: bool,
) -> list[list[dict]]:
    """``repeat`` rounds, each running every chosen setup once."""
    rounds = []
    bar = tqdm(total=repeat * len(chosen), desc="bench", unit="run", disable=not progress)
    for _ in range(repeat):
        results = []
        for s in chosen:
            bar.set_postfix_str(s.name)
            results.append(run_setup(s, dirs[s.layout], prompt, tokens, options))
            bar.update()
        rounds.append(results)
    bar.close()
    return rounds


def _machine(model_dir: Path, cost: CostModel) -> dict:
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "file_system": file_system_type(model_dir),
        "cost_model": cost.source,
    }


def _model_facts(model_dir: Path, manifest: Manifest, dirs: dict[str, Path]) -> dict:
    return {
        "name": model_dir.name,
        "path": str(model_dir),
        "model_type": manifest.model_type,
        "n_layers": manifest.n_layers,
        "d_ffn": manifest.d_ffn,
        "dtype": manifest.dtype,
        "ffn_bytes": manifest.ffn_bytes(),
        "directories": {k: str(v) for k, v in dirs.items()},
    }


def _settings(
    prompt: str, prompt_ids: list[int], tokens: int, repeat: int, options: dict, rows: list[dict]
) -> dict:
    return {
        "prompt": prompt,
        "prompt_tokens": len(prompt_ids),
        "tokens": tokens,
        "selector": rows[-1]["selector"],
        "window": rows[-1]["window"],
        "pin_share": options.get("pin_share"),  # None: the plan's default split
        "threads": rows[0]["threads"],
        "repeat": repeat,
        "max_context": options["max_context"],
        "options": {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool))},
    }


def _memory(plan: dict) -> dict:
    """The full configuration's memory plan, as the report shows it."""
    return {
        "ffn_share": plan["ffn_share"],
        "trunk": plan["trunk"],
        "kv_cache": plan["kv_cache"],
        "temporaries": plan["temporaries"],
        "selector": plan["selector"],
        "lookahead": plan["lookahead"],
        "buffers": plan["buffers"],
        "total": plan["used"],
    }


def _pin_share(settings: dict) -> str:
    share = settings.get("pin_share")
    return "auto" if share is None else f"{share:g}"


def format_report(report: dict) -> str:
    """The ablation table, the memory it implies, the physical limit, the time per token split."""
    m, mem, s = report["model"], report["memory"], report["settings"]
    base = report["configs"][0]["name"]  # naive, unless --configs left it out
    out = [
        f"{m['name']} ({m['model_type']}, {m['n_layers']} layers, d_ffn {m['d_ffn']}, "
        f"{m['dtype']}): FFN {format_size(m['ffn_bytes'])}; {s['tokens']} greedy tokens after a "
        f"{s['prompt_tokens']}-token prompt; selector {s['selector']} "
        f"({report['configs'][-1]['selector']}), k={s['window']}, pin share "
        f"{_pin_share(s)}, {s['threads']} threads, "
        f"median of {s['repeat']} round(s)",
        *([s["auto"]] if s.get("auto") else []),
        f"memory: FFN cache {100 * mem['ffn_share']:.0f}% of each layer = buffers "
        f"{format_size(mem['buffers'])}; + trunk {format_size(mem['trunk'])} (attention, "
        "embeddings, head: in memory in every configuration) + KV cache "
        f"{format_size(mem['kv_cache'])} + selector {format_size(mem['selector'])} + temporaries "
        f"{format_size(mem['temporaries'])} + look-ahead (page cache) "
        f"{format_size(mem['lookahead'])} = {format_size(mem['total'])} in total",
        "FFN I/O per generated token (bytes from disk, page cache bypassed); ratios to "
        f"{base} within each round:",
        f"{'config':<13}{'MB/tok':>9}{'x':>7}{'reads':>8}{'KB/read':>9}{'I/O ms':>9}{'x':>7}"
        f"{'limit ms':>9}{'FFN ms':>8}{'other ms':>9}{'tok/s':>8}{'x':>6}{'peak MB':>9}"
        f"{'loaded':>8}{'same':>8}",
    ]
    for r in report["configs"]:
        out.append(
            f"{r['index']}. {r['name']:<10}{r['ffn_bytes_per_token'] / 1e6:9.3f}"
            f"{r['ffn_bytes_per_token_vs_naive']:7.1f}{r['reads_per_token']:8.0f}"
            f"{r['mean_read_bytes'] / 1e3:9.1f}{r['io_ms_per_token']:9.2f}"
            f"{r['io_ms_per_token_vs_naive']:7.1f}{r['limit_ms_per_token']:9.2f}"
            f"{r['ffn_compute_ms_per_token']:8.2f}{r['other_ms_per_token']:9.2f}"
            f"{r['tokens_per_s']:8.2f}{r['tokens_per_s_vs_naive']:6.2f}"
            f"{r['peak_memory'] / 1e6:9.1f}{100 * r['fraction_loaded']:7.1f}%"
            f"{r['same_tokens_as_naive']:>8}"
        )
    last = report["configs"][-1]
    gap = (
        last["io_ms_per_token"] / last["limit_ms_per_token"]
        if last["limit_ms_per_token"]
        else float("nan")
    )
    out += [
        f"columns: x = {base} / config (bytes, I/O time) or config / {base} (tok/s); {LIMIT}; "
        "FFN ms = FFN compute, selector, "
        "window and buffer work; other = attention, head, sampling, Python; loaded = FFN neurons "
        f"read per token; same = greedy tokens equal to {base}'s",
        f"physical limit ({report['machine']['cost_model']}): config {last['index']} reads "
        f"{last['ffn_bytes_per_token'] / 1e6:.3f} MB/token in "
        f"{last['mean_read_bytes'] / 1e3:.1f} KB reads; the records it needs take "
        f"{last['limit_ms_per_token']:.2f} ms/token at best; measured "
        f"{last['io_ms_per_token']:.2f} ms ({gap:.1f}x the limit at {last['threads']} threads): "
        "the rest is the reader's CPU work (planning, thread wake-ups, copies), gap bytes it "
        "read through and reads waiting on one another",
    ]
    for ref in report["references"]:
        versus = f" ({ref['vs_mlx_lm']:.2f}x mlx-lm's, per round)" if "vs_mlx_lm" in ref else ""
        out.append(
            f"reference, {ref['name']} (no reads): {ref['tokens_per_s']:.2f} tok/s{versus}, peak "
            f"{ref['peak_memory'] / 1e6:.1f} MB, same tokens as naive {ref['same_tokens_as_naive']}"
        )
    return "\n".join(out)


def _membudget_tool() -> Path | None:
    """$MLX_FLASH_MEMBUDGET, ``membudget`` on PATH, or the checkout's ../shared/tools/membudget."""
    for candidate in (
        os.environ.get("MLX_FLASH_MEMBUDGET"),
        shutil.which("membudget"),
        Path(__file__).resolve().parents[2] / "shared" / "tools" / "membudget",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _rerun_in_cgroup(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this same command again inside a memory cgroup of the implied memory + the process's
    own."""
    tool = _membudget_tool()
    if sys.platform != "linux" or tool is None or os.geteuid() != 0:
        raise FlashError(
            "--membudget needs Linux, root and the membudget tool (set MLX_FLASH_MEMBUDGET)"
        )
    if args.membudget != "auto":
        limit = parse_size(args.membudget)
    else:
        options = load_options(args, TOOL)
        context = len(load_tokenizer(Path(args.model)).encode(args.prompt)) + args.tokens + 1
        model, _ = load(
            args.model, **{"max_context": context, "memory_budget": UNLIMITED, **options}
        )
        limit = model.flash.plan.used + PROCESS_SLACK
        model.flash.close()
    child, skip = [], False
    for a in argv:  # the same command without --membudget [SIZE]
        if not skip and not a.startswith("--membudget"):
            child.append(a)
        skip = a == "--membudget" and args.membudget != "auto"
    print(f"re-running under a {format_size(limit)} memory cgroup ({tool})", file=sys.stderr)
    cmd = [
        sys.executable,
        str(tool),
        str(limit),
        "--",
        sys.executable,
        "-m",
        "mlx_flash.bench",
        *child,
    ]
    return subprocess.run(cmd, env={**os.environ, CGROUP_ENV: "1"}).returncode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", help="flash model directory (the other layout is made and cached), or a MoE one"
    )
    p.add_argument(
        "--tokens",
        type=int,
        help="tokens to generate per configuration (default 64; --synthetic: 32 timed for MoE, 16 "
        "for dense)",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (raw, no chat template)")
    p.add_argument("--configs", default="1,2,3,4,5", help="which configurations to run, e.g. 1,5")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds; each metric is the median, ratios taken per round",
    )
    p.add_argument(
        "--unbundled",
        type=Path,
        help="an existing unbundled copy of --model (default: made and cached)",
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the no-read references (plain mlx-lm, and the runtime with the whole FFN "
        "pinned)",
    )
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="write a PNG of the ablation here")
    p.add_argument(
        "--membudget",
        nargs="?",
        const="auto",
        metavar="SIZE",
        help="re-run inside a memory cgroup (Linux, root) of SIZE "
        "(default: the implied memory + 1 GiB)",
    )
    p.add_argument(
        "--probe-age",
        type=float,
        default=6.0,
        metavar="HOURS",
        help="use the disk's saved probe if made within HOURS, else probe it first (about a "
        "minute); the probe used is written beside --json (default 6; 0 always probes)",
    )
    add_synthetic_args(p)
    add_flash_args(p, TOOL)
    add_debug_arg(p)
    return p


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.membudget and os.environ.get(CGROUP_ENV) != "1":
        return _rerun_in_cgroup(args, argv)
    if not (args.model or args.synthetic):
        raise OptionError("--model DIR (or --synthetic NAME) is required")
    probe = _probe(args)
    if args.synthetic or read_manifest(args.model).moe is not None:
        return run_moe(args, probe)
    report = run_bench(
        args.model,
        prompt=args.prompt,
        tokens=args.tokens or 64,
        repeat=args.repeat,
        setups=tuple(int(c) for c in args.configs.split(",")),
        unbundled=args.unbundled,
        reference=not args.no_reference,
        **load_options(args, TOOL),
    )
    print(format_report(report))
    _write(report, args, probe)
    return 0


def _probe(args: argparse.Namespace) -> dict:
    """The probe of the disk the bench reads, made within --probe-age (else made now)."""
    from .probe import recent_probe

    where = Path(args.model) if args.model else args.synthetic_dir or cache_root() / "synthetic"
    where.mkdir(parents=True, exist_ok=True)
    return recent_probe(where, 3600 * args.probe_age)


def _write(report: dict, args: argparse.Namespace, probe: dict, plot: bool = True) -> None:
    """--json (and --plot: the dense ablation's), and beside the JSON the probe its limit came
    from (``NAME.probe.json``)."""
    report["probe"] = {"created": probe["created"], "path": probe["path"]}
    write_outputs(report, args.json, args.plot if plot else None, plot_ablation)
    if args.json:
        write_outputs(probe, args.json.with_suffix(".probe.json"), None, plot_ablation)


def run_moe(args: argparse.Namespace, probe: dict) -> int:
    """The synthetic FFN-only harnesses (``dense_bench``, ``moe_bench``), or a MoE directory."""
    from .dense_bench import dense_synthetic, format_dense_synthetic, run_dense_synthetic

    options = load_options(args, TOOL)
    if args.synthetic and dense_synthetic(args.synthetic):
        report = run_dense_synthetic(args, options)
        print(format_dense_synthetic(report))
    elif args.synthetic:
        report = run_synthetic(args, options)
        print(format_synthetic(report))
    else:
        if ("ffn_cache" in options) == ("memory_budget" in options):
            raise OptionError("give exactly one of --ffn-cache and --memory-budget")
        report = run_model(Path(args.model), args.prompt, args.tokens or 64, args.repeat, options)
        print(format_model(report))
    _write(report, args, probe, plot=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(lambda args: run(args, argv), build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
