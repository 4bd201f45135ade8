"""What a co-activation placement of neurons would save: reads and bytes per decoded token.

    python tools/placement.py --model DIR --data wikitext2-raw-test.txt \
        [--selector predictor] [--sparsity 0.5] [--tokens 400] [--window 4] [--json OUT]

Decodes ``--tokens`` tokens of the text one by one, recording every layer's selection
(``FlashRuntime.observe``). The first half fits two neuron orders per layer: by calibration
frequency (hot neurons side by side) and the spectral order of the co-activation matrix (the
Fiedler vector of its normalised Laplacian: neurons selected together land near each other). On the
second half it counts, for the window's misses (neurons not selected by the previous ``--window``
tokens), the reads and records the store reader would issue under each order (``plan_runs``, gaps
of the disk's cost model read through) and the cost model's time for them.
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash
from mlx_flash.runtime.calibration import read_calibration
from mlx_flash.runtime.store import plan_runs


def record_selections(directory: str, text: str, tokens: int, selector: str, sparsity):
    kw = {"selector": selector, "ffn_cache": 1.0, "max_context": tokens + 16}
    if sparsity is not None:
        kw["sparsity"] = sparsity
    model, tokenizer = mlx_flash.load(directory, **kw)
    rt = model.flash
    selections = [[] for _ in range(rt.manifest.n_layers)]
    rt.observe = lambda layer, x, selection: selections[layer].append(np.asarray(selection.ids))
    ids = tokenizer.encode(text)[:tokens]
    cache = make_prompt_cache(model)
    model(mx.array([ids[:1]]), cache=cache)
    for token in ids[1:]:
        mx.eval(model(mx.array([[token]]), cache=cache))
    return rt, selections


def spectral_order(selections: list[np.ndarray], d_ffn: int) -> np.ndarray:
    chosen = np.zeros((len(selections), d_ffn), np.float32)
    for t, ids in enumerate(selections):
        chosen[t, ids] = 1
    co = chosen.T @ chosen
    degree = co.sum(1) + 1e-6
    scale = 1 / np.sqrt(degree)
    laplacian = scale[:, None] * (np.diag(degree) - co) * scale[None, :]
    return np.argsort(np.linalg.eigh(laplacian)[1][:, 1])


def misses(selections: list[np.ndarray], window: int) -> list[np.ndarray]:
    out = []
    for t, ids in enumerate(selections):
        recent = selections[max(0, t - window) : t]
        held = np.unique(np.concatenate(recent)) if recent else np.empty(0, np.int64)
        out.append(np.setdiff1d(ids, held))
    return out


def count(layers: list[list[np.ndarray]], positions: list[np.ndarray], gap: int):
    reads = records = 0
    for layer, per_token in enumerate(layers):
        for ids in per_token:
            if ids.size:
                placed = np.sort(positions[layer][ids])
                runs = plan_runs(placed, 1 << 30, gap)
                reads += len(runs)
                records += sum(int(placed[b - 1] - placed[a]) + 1 for a, b in runs)
    return reads, records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--selector", default="auto")
    p.add_argument("--sparsity", type=float)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--json")
    args = p.parse_args()
    text = open(args.data, encoding="utf-8").read()[20000 : 20000 + 40 * args.tokens]
    rt, selections = record_selections(args.model, text, args.tokens, args.selector, args.sparsity)
    m, half = rt.manifest, len(selections[0]) // 2
    frequency = read_calibration(args.model, m).frequency
    orders = {
        "as stored": [np.arange(m.d_ffn)] * m.n_layers,
        "by frequency": [np.argsort(-np.asarray(frequency[i])) for i in range(m.n_layers)],
        "co-activation": [spectral_order(s[:half], m.d_ffn) for s in selections],
    }
    evaluated = [misses(s, args.window)[half:] for s in selections]
    record, threads = m.neuron_bytes(), rt.reader.threads
    gap = rt.cost.gap_bytes(threads) // record
    tokens = len(selections[0]) - half
    result = {"model": args.model, "selector": rt.selector.name, "tokens": tokens, "gap": gap}
    for name, order in orders.items():
        positions = [np.argsort(o) for o in order]  # neuron -> its place in the store
        reads, records = count(evaluated, positions, gap)
        seconds = rt.cost.read_seconds(records * record, max(reads, 1), threads)
        result[name] = {
            "reads_per_token": reads / tokens,
            "records_per_token": records / tokens,
            "io_ms_per_token": 1e3 * seconds / tokens,
        }
        print(
            f"{name:>14}: {reads / tokens:8.1f} reads, {records / tokens:8.1f} records, "
            f"{1e3 * seconds / tokens:7.2f} ms per token (cost model)"
        )
    rt.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
