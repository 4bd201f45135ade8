"""``python -m mlx_flash.bench`` for mixture-of-experts models.

Why: what users ask of an expert cache is how many bytes a token reads, how often the experts it
needs are already in DRAM, and how close the reads come to what the disk allows, at a given share
of the experts in memory, for each eviction policy and for routing from uniform (the worst case)
to what real models do.

- ``--synthetic qwen3-30b-a3b``: an FFN-only harness on a store at the real shape (random weights,
  built once): per token, every MoE layer's ``FlashExperts`` (the runtime's own) computes the
  experts a routing trace names, on one token's input; attention, routers and head are not run.
  The cache is first warmed with the trace (reads, no compute), then ``--tokens`` tokens are timed.
- ``--model MOE_DIR``: real generations, as the dense ablation runs them: all experts in memory,
  then each policy at the asked share, cold from disk.

Reads bypass the page cache and the store is dropped from it before each run, unless a row says
"cached": those rows measure whether the page cache helps.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU
from tqdm import tqdm

from .routing import SKEWED, routing_trace
from .runtime.costmodel import cost_model_for
from .runtime.errors import FlashFormatError
from .runtime.expert_budget import expert_plan
from .runtime.limit import LIMIT
from .runtime.manifest import read_manifest
from .runtime.moe_runtime import open_experts
from .runtime.options import FlashOptions
from .runtime.pagecache import cached_bytes, drop_from_page_cache
from .runtime.sizes import format_size
from .runtime.telemetry import LayerStats
from .runtime.trace import Trace, load_trace
from .synthetic import SHAPES, synthetic_store

POLICIES = ("lru", "lfu")
ROW_KEYS = ("tokens_per_s", "mb_per_token", "hit_rate", "io_ms_per_token", "compute_ms_per_token")


def add_synthetic_args(p: argparse.ArgumentParser) -> None:
    """The flags of the synthetic FFN-only harness."""
    g = p.add_argument_group("synthetic stores at real shapes (--synthetic)")
    g.add_argument(
        "--synthetic", choices=sorted(SHAPES), help="bench a synthetic MoE or dense (7B) store"
    )
    g.add_argument("--synthetic-dir", type=Path, help="where to build it (default: the cache)")
    g.add_argument("--routing", default="uniform,skewed", help="routing models: uniform,skewed")
    g.add_argument(
        "--trace", type=Path, help="a trace (--record-trace) to replay: experts instead of the "
        "routing models (MoE), neuron selections scaled to the shape (dense, required)",
    )  # fmt: skip
    g.add_argument("--shares", default="0.25,0.5", help="shares of the experts in the slots")
    g.add_argument("--policies", default="lru,lfu", help="eviction policies to compare")
    g.add_argument(
        "--warmup", type=int, help="tokens that warm the cache untimed (default: MoE 256, dense 8)"
    )
    g.add_argument(
        "--page-cache-rows", action="store_true", help="also run each routing at the first share "
        "with LRU through the page cache",
    )  # fmt: skip
    g.add_argument(
        "--move-rows", action="store_true", help="also run each routing at the first share with "
        "LRU filling evicted slots by moving the last experts (delete + append), not in place",
    )  # fmt: skip


def measure(
    directory: Path, trace: Trace, share: float, policy: str, page_cache: bool, warmup: int,
    tokens: int, in_place: bool = True, flash: dict[str, Any] | None = None,
) -> dict:  # fmt: skip
    """One configuration of the harness (see the module docstring) with the flash options
    ``flash`` (the flags given); its per-token metrics. Its slots are freed once nothing refers to
    the runtime (the caller collects the cycle)."""
    manifest = read_manifest(directory)
    moe, store = manifest.moe, directory / manifest.store_file
    drop_from_page_cache(store)
    plan = expert_plan(manifest, mx.float32.size, round(share * moe.n_experts))
    switches = [SwitchGLU(manifest.d_model, moe.d_expert, moe.n_experts) for _ in manifest.layers]
    options = FlashOptions.build(
        {**(flash or {}), "expert_policy": policy, "page_cache": page_cache}
    )
    runtime = open_experts(directory, manifest, options, plan, mx.float32, switches)
    try:
        for layer in runtime.layers:
            layer.cache.in_place = in_place
        _warm(runtime.layers, trace, warmup)
        wall = _timed(runtime, trace, warmup, tokens)
        row = _row(runtime, wall, tokens, share, policy, trace)
        row["warmup"], row["page_cache_after"] = warmup, cached_bytes(store)
        row["slot_update"] = "in place" if in_place else "move"
    finally:
        runtime.close()
    return row


def _timed(runtime, trace: Trace, start: int, tokens: int) -> float:
    """Seconds to run ``tokens`` tokens of the trace from ``start`` through every MoE layer."""
    runtime.telemetry.reset()
    x = 0.1 * mx.random.normal((1, 1, runtime.manifest.d_model), key=mx.random.key(0))
    begin = time.perf_counter()
    for t in range(start, start + tokens):
        for i, layer in enumerate(runtime.layers):
            layer(x, mx.array(trace.at(t, i).astype(np.uint32)).reshape(1, 1, -1))
    return time.perf_counter() - begin


def _warm(layers: list, trace: Trace, warmup: int) -> None:
    """Drive the caches with ``warmup`` tokens of the trace: the same reads and evictions a run
    makes, without the compute (it does not change what is cached)."""
    for t in range(warmup):
        for i, layer in enumerate(layers):
            ids = trace.at(t, i).astype(np.int64)
            layer.cache.ensure(ids, np.ones(ids.size), LayerStats())


def _row(runtime, wall: float, tokens: int, share: float, policy: str, trace: Trace) -> dict:
    s = runtime.telemetry.summary("decode")
    bytes_, reads = s["flash_bytes_per_token"], s["reads_per_token"]
    return {
        "routing": trace.meta.get("routing", "trace"),
        "share": share,
        "slots": runtime.plan.expert_slots,
        "slot_memory": runtime.plan.buffers,
        "policy": policy,
        "cache_mode": runtime.reader.cache_mode,
        "threads": runtime.reader.threads,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "mb_per_token": bytes_ / 1e6,
        "reads_per_token": reads,
        "hit_rate": s["expert_hit_rate"],
        "experts_loaded_per_token": s["experts_loaded_per_token"],
        "io_ms_per_token": s["io_ms_per_token"],
        "compute_ms_per_token": s["compute_ms_per_token"],
        "limit_ms_per_token": s["limit_ms_per_token"],
    }


def _configs(args: argparse.Namespace) -> list[tuple[str, float, str, bool, bool]]:
    """(routing, share, policy, page cache, in place) of every run in a round."""
    routings = ["trace"] if args.trace else args.routing.split(",")
    shares = [float(s) for s in args.shares.split(",")]
    policies = args.policies.split(",")
    runs = [(r, s, p, False, True) for s in shares for r in routings for p in policies]
    if args.page_cache_rows:
        runs += [(r, shares[0], "lru", True, True) for r in routings]
    if args.move_rows:
        runs += [(r, shares[0], "lru", False, False) for r in routings]
    return runs


def run_synthetic(args: argparse.Namespace, flash: dict[str, Any], progress: bool = True) -> dict:
    """Build (once) the synthetic store and run every configuration ``args.repeat`` times with the
    flash options ``flash`` (the flags given)."""
    directory = synthetic_store(args.synthetic, args.synthetic_dir, progress)
    manifest = read_manifest(directory)
    moe, tokens = manifest.moe, args.tokens or 32
    if args.warmup is None:
        args.warmup = 256
    traces = {"trace": _replayed(args.trace, manifest, args.warmup + tokens)} if args.trace else {
        r: routing_trace(r, args.warmup + tokens, manifest.n_layers, moe.n_experts, moe.top_k)
        for r in args.routing.split(",")
    }  # fmt: skip
    for name, trace in traces.items():
        trace.save(directory / f"routing-{name}.npz")
    configs = _configs(args)
    rounds = []
    bar = tqdm(total=args.repeat * len(configs), desc="bench", unit="run", disable=not progress)
    for _ in range(args.repeat):
        rounds.append([])
        for routing, share, policy, cached, in_place in configs:
            bar.set_postfix_str(f"{routing} {share:g} {policy}")
            warmup = _warmup(routing, share, moe, args.warmup)
            trace = traces[routing]
            row = measure(directory, trace, share, policy, cached, warmup, tokens, in_place, flash)
            rounds[-1].append(row)
            gc.collect()  # the last run's slots (runtime <-> layers is a cycle)
            mx.clear_cache()
            bar.update()
    bar.close()
    return _report(directory, manifest, rounds, args, tokens)


def _replayed(path: Path, manifest, tokens: int) -> Trace:
    """A recorded trace to replay: it must name experts of this store, in its MoE layers, for at
    least ``tokens`` tokens."""
    trace = load_trace(path)
    want = ("experts", manifest.moe.n_experts, manifest.n_layers)
    if (trace.kind, trace.n_ids, trace.n_layers) != want or trace.tokens < tokens:
        raise FlashFormatError(
            f"{path}: a trace of {trace.tokens} tokens of {trace.kind} ({trace.n_ids} per layer, "
            f"{trace.n_layers} layers); this store needs {tokens} tokens of experts ({want[1]} per "
            f"layer, {want[2]} layers): --warmup plus --tokens"
        )
    return trace


def _warmup(routing: str, share: float, moe, asked: int) -> int:
    """Tokens that warm the cache: as asked, but uniform routing has no history to learn, so
    only until the slots are full (twice the tokens that fill them)."""
    if routing != "uniform":
        return asked
    return min(asked, 2 * round(share * moe.n_experts) // moe.top_k + 1)


def _report(directory: Path, manifest, rounds: list[list[dict]], args, tokens: int) -> dict:
    """Median of every metric over rounds; LFU/LRU and cached/uncached ratios within rounds."""
    rows = []
    for i, first in enumerate(rounds[0]):
        row = dict(first)
        for key in (*ROW_KEYS, "limit_ms_per_token", "reads_per_token"):
            row[key] = statistics.median(r[i][key] for r in rounds)
        row["rounds"] = {k: [r[i][k] for r in rounds] for k in ("tokens_per_s", "hit_rate")}
        twin = _twin(rounds[0], first)
        if twin is not None:
            row["vs"] = twin[1]
            row["tokens_per_s_ratio"] = statistics.median(
                r[i]["tokens_per_s"] / r[twin[0]]["tokens_per_s"] for r in rounds
            )
        rows.append(row)
    record = manifest.layers[0].regions[0].record_size
    return {
        "model": {
            "synthetic": args.synthetic,
            "path": str(directory),
            "moe_layers": manifest.n_layers,
            "experts": manifest.moe.n_experts,
            "top_k": manifest.moe.top_k,
            "record_bytes": record,
            "store_bytes": manifest.store_size,
        },
        "settings": {"tokens": tokens, "warmup": args.warmup, "repeat": args.repeat},
        "routing_models": {"uniform": "top-k uniformly at random", "skewed": SKEWED},
        "cost_model": cost_model_for(directory).source,
        "rows": rows,
    }


def _plain(row: dict) -> bool:
    """LRU, uncached, in place: the row the others are compared with."""
    return row["policy"] == "lru" and row["cache_mode"] != "cached" and row["slot_update"] != "move"


def _twin(rows: list[dict], row: dict) -> tuple[int, str] | None:
    """The row this one is compared with in its round: the plain LRU row of its routing and
    share (for LFU, for the page cache, for moves)."""
    if _plain(row):
        return None
    for j, other in enumerate(rows):
        if _plain(other) and (other["routing"], other["share"]) == (row["routing"], row["share"]):
            return j, "lru"
    return None


def _reads(row: dict) -> str:
    """How a row's reads went: through the page cache or not, into slots in place or by moves."""
    return ("cached" if row["cache_mode"] == "cached" else "uncached") + (
        " mv" if row["slot_update"] == "move" else ""
    )


def format_synthetic(report: dict) -> str:
    """The table of the synthetic runs, with what the numbers are."""
    m, s = report["model"], report["settings"]
    out = [
        f"synthetic {m['synthetic']}: {m['moe_layers']} MoE layers x {m['experts']} experts, "
        f"top-{m['top_k']}, {m['record_bytes']:,} B per expert record, store "
        f"{format_size(m['store_bytes'])}. FFN-only harness: only the MoE layers run (one "
        f"token's input, experts from the routing trace), no attention, router or head; "
        f"{s['warmup']} tokens warm the cache (reads, no compute; uniform routing: until the "
        f"slots are full), {s['tokens']} are timed; "
        f"median of {s['repeat']} round(s); skewed routing {report['routing_models']['skewed']}",
        f"{'routing':<8}{'share':>6}{'slots':>6}{'slot GB':>8}{'policy':>7}{'reads':>13}"
        f"{'tok/s':>7}{'MB/tok':>8}{'hit':>7}{'I/O ms':>8}{'limit':>7}{'FFN ms':>8}{'ratio':>14}",
    ]
    for r in report["rows"]:
        ratio = f"{r['tokens_per_s_ratio']:.2f}x {r['vs']}" if "vs" in r else ""
        out.append(
            f"{r['routing']:<8}{r['share']:>6.2f}{r['slots']:>6}{r['slot_memory'] / 1e9:>8.2f}"
            f"{r['policy']:>7}{_reads(r):>13}{r['tokens_per_s']:>7.2f}"
            f"{r['mb_per_token']:>8.1f}{100 * r['hit_rate']:>6.1f}%{r['io_ms_per_token']:>8.1f}"
            f"{r['limit_ms_per_token']:>7.1f}{r['compute_ms_per_token']:>8.1f}{ratio:>14}"
        )
    out.append(
        f"columns: hit = expert-cache hit rate; I/O ms = time in the store reader per token; "
        f"{LIMIT} ({report['cost_model']}); FFN ms = the rest of the MoE layers' time (compute, "
        "bookkeeping); ratio = tokens/s against the named row of the same round; reads: "
        "uncached (page cache bypassed) or cached; mv = evicted slots refilled by moving the last "
        "experts (delete + append) instead of in place"
    )
    return "\n".join(out)


def run_model(
    model_dir: Path, prompt: str, tokens: int, repeat: int, options: dict, progress: bool = True
) -> dict:
    """Real generations on a MoE flash directory: all experts in memory, then each policy at the
    asked share (``ffn_cache``, or what ``memory_budget`` leaves), cold from disk."""
    from mlx_lm.utils import load_tokenizer

    from .bench import IN_MEMORY, Setup, _budget_as_ffn_share, run_setup

    prompt_ids = load_tokenizer(model_dir).encode(prompt)
    options = {"max_context": len(prompt_ids) + tokens + 1, **options}
    if "memory_budget" in options:
        options = _budget_as_ffn_share(model_dir, options)
    cost = cost_model_for(model_dir)
    setups = [
        Setup(i + 1, policy, f"expert cache, {policy} eviction", "bundled", False, True, True)
        for i, policy in enumerate(POLICIES)
    ]

    def one(setup: Setup, **extra) -> dict:
        run_options = {**options, "expert_policy": setup.name, **extra}
        return run_setup(setup, model_dir, prompt_ids, tokens, run_options)

    rounds = [
        [one(s) for s in setups]
        for _ in tqdm(range(repeat), desc="bench", unit="round", disable=not progress)
    ]
    memory = one(IN_MEMORY, ffn_cache=1.0, expert_policy="lru")
    rows = []
    for i, first in enumerate(rounds[0]):
        row = dict(first)
        for key in ("ffn_bytes_per_token", "io_ms_per_token", "tokens_per_s", "limit_ms_per_token"):
            row[key] = statistics.median(r[i][key] for r in rounds)
        row["same_tokens_as_in_memory"] = first["tokens"] == memory["tokens"]
        rows.append(row)
    return {
        "model": str(model_dir),
        "prompt_tokens": len(prompt_ids),
        "tokens": tokens,
        "repeat": repeat,
        "in_memory": memory,
        "configs": rows,
        "cost_model": cost.source,
    }


def format_model(report: dict) -> str:
    """The table of a real MoE directory's runs."""
    mem = report["in_memory"]
    plan = report["configs"][0]["memory_plan"]
    out = [
        f"{report['model']}: {report['tokens']} greedy tokens after a {report['prompt_tokens']}-"
        f"token prompt, {plan['expert_slots']} of {plan['n_experts']} experts per MoE layer in "
        f"slots ({format_size(plan['buffers'])}), page cache bypassed, median of "
        f"{report['repeat']} round(s)",
        f"{'config':<14}{'MB/tok':>9}{'reads':>7}{'I/O ms':>9}{'limit ms':>9}{'tok/s':>8}"
        f"{'hit':>7}{'same':>6}",
    ]
    for r in report["configs"]:
        out.append(
            f"{r['name']:<14}{r['ffn_bytes_per_token'] / 1e6:9.3f}{r['reads_per_token']:7.1f}"
            f"{r['io_ms_per_token']:9.2f}{r['limit_ms_per_token']:9.2f}{r['tokens_per_s']:8.2f}"
            f"{100 * r['buffer_hit_rate']:6.1f}%"
            f"{'yes' if r['same_tokens_as_in_memory'] else 'NO':>6}"
        )
    out.append(
        f"all experts in memory: {mem['tokens_per_s']:.2f} tok/s; {LIMIT} "
        f"({report['cost_model']}); same = the greedy tokens of the in-memory run"
    )
    return "\n".join(out)
