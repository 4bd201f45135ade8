"""Perplexity change of selectors at several sparsities, computing only kept rows.

    python tools/selection_table.py --model DIR[:label] [--model ...] \
        --data wikitext2-raw-test.txt [--sparsities 0.3 0.5 0.7] \
        [--selectors oracle proxy gate] [--json OUT]

Each cell runs the model over the text's first ``--max-windows`` windows of
``--seq-len`` tokens with every FFN keeping, per token, only the neurons the
selector picks at the layer's sparsity (the calibration's per-layer allocation
when it kept one) and computing them from the exact weights:
what ``python -m mlx_flash.evaluate --compute-rows selected`` measures token by token, batched
(a token's selection depends only on its own FFN input). The oracle keeps the top neurons by the
exact |act(gate)·up|: the ceiling of any selector.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mlx_lm.utils import load_tokenizer

from mlx_flash.convert.quality import Guard
from mlx_flash.runtime.calibration import read_calibration, read_predictors
from mlx_flash.runtime.manifest import read_manifest
from mlx_flash.runtime.proxy import read_proxy
from mlx_flash.runtime.selectors import keep_counts
from mlx_flash.textdata import text_windows


def measure(
    model: Path,
    data: Path,
    selectors: list[str],
    sparsities: list[float],
    seq_len: int,
    windows: int,
) -> dict:
    m = read_manifest(model)
    calibration = read_calibration(model, m)
    meta = m.extra.get("proxy")
    proxy = meta and read_proxy(model, meta, m.n_layers, m.activation, m.gated)
    tokens = text_windows(load_tokenizer(model), data, seq_len, windows)
    rows = []
    with Guard(model, m, proxy or None, read_predictors(model, m)) as guard:
        dense = guard.loss(tokens)
        for selector in selectors:
            for s in sparsities:
                keep = keep_counts(calibration.layer_sparsities(s, m.n_layers), m.d_ffn)
                loss = guard.loss(tokens, selector, keep)
                rows.append(
                    {
                        "selector": selector,
                        "sparsity": s,
                        "perplexity": math.exp(loss),
                        "change": math.exp(loss - dense) - 1,
                    }
                )
                print(
                    f"{model.name} {selector:>7} s={s}: {100 * rows[-1]['change']:+.2f}%",
                    flush=True,
                )
    return {
        "model": str(model),
        "dense_perplexity": math.exp(dense),
        "rows": rows,
        "proxy": meta or {},
        "ffn_bytes": m.ffn_bytes(),
        "tokens": int(tokens.size),
        "allocation": (m.extra.get("allocation") or {}).get("used", False),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="flash dir, or DIR:label")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--selectors", nargs="+", default=["oracle", "proxy", "gate"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    report = []
    for spec in args.model:
        path, _, label = spec.partition(":")
        entry = measure(
            Path(path), args.data, args.selectors, args.sparsities, args.seq_len, args.max_windows
        )
        report.append({**entry, "label": label or Path(path).name})
    print("\n| model | selector | " + " | ".join(f"s={s}" for s in args.sparsities) + " |")
    print("|---|---|" + "---|" * len(args.sparsities))
    for entry in report:
        for selector in args.selectors:
            cells = [r for r in entry["rows"] if r["selector"] == selector]
            text = " | ".join(f"{r['perplexity']:.2f} ({100 * r['change']:+.1f}%)" for r in cells)
            print(f"| {entry['label']} | {selector} | {text} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
