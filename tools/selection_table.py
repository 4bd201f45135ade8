"""Perplexity change of selectors at several sparsities, computing only the kept rows, as a table.

    python tools/selection_table.py --model DIR [--model DIR ...] --data wikitext2-raw-test.txt \
        [--sparsities 0.3 0.5 0.7] [--selectors oracle proxy gate] [--json OUT]

Each cell is one ``python -m mlx_flash.evaluate`` run (the real streaming runtime, decoding token
by token) with ``compute_rows="selected"``: the FFN multiplies only the neurons selected for the
token, so the table compares how well each selector ranks neurons. A model directory may be given
as ``DIR:label`` to name its column group (e.g. a copy calibrated with another ``--proxy``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx_flash.evaluate import evaluate
from mlx_flash.runtime.manifest import read_manifest


def measure(
    model: Path,
    data: Path,
    selectors: list[str],
    sparsities: list[float],
    seq_len: int,
    windows: int,
) -> list[dict]:
    rows = []
    for selector in selectors:
        for s in sparsities:
            r = evaluate(
                model,
                data,
                selector=selector,
                sparsity=s,
                compute_rows="selected",
                seq_len=seq_len,
                max_windows=windows,
                progress=False,
            )
            rows.append(
                {
                    "selector": selector,
                    "sparsity": s,
                    "perplexity": r["perplexity"],
                    "dense": r["dense_perplexity"],
                    "change": r["perplexity_change"],
                    "used": r["fraction_used"],
                    "plan_selector_bytes": r["plan"]["selector"],
                }
            )
            print(
                f"{model.name} {selector:>7} s={s}: {r['perplexity']:.3f} "
                f"({100 * r['perplexity_change']:+.2f}%)",
                flush=True,
            )
    return rows


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
        model = Path(path)
        meta = read_manifest(model).extra.get("proxy") or {}
        rows = measure(
            model, args.data, args.selectors, args.sparsities, args.seq_len, args.max_windows
        )
        report.append(
            {
                "model": str(model),
                "label": label or model.name,
                "proxy": meta,
                "ffn_bytes": read_manifest(model).ffn_bytes(),
                "rows": rows,
            }
        )
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
