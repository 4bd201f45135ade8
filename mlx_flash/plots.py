"""PNG plots of a probe (throughput against read size, per thread count) and of a bench ablation.

matplotlib is an optional extra (``pip install 'mlx-lm-flash[examples]'``): imported
only here, on use.
"""

from __future__ import annotations

from pathlib import Path

from .runtime.costmodel import CostModel
from .runtime.errors import FlashError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise FlashError(
            "--plot needs matplotlib: pip install 'mlx-lm-flash[examples]' "
            "(or pip install matplotlib)"
        ) from e
    return plt


def plot_probe(probe: dict, out: Path) -> None:
    """Measured throughput (points) and the fitted cost model (lines), a colour per thread count."""
    plt = _pyplot()
    model = CostModel.from_json(probe["model"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in sorted({c["threads"] for c in probe["cells"]}):
        cells = sorted((c for c in probe["cells"] if c["threads"] == t), key=lambda c: c["chunk"])
        xs = [c["chunk"] / 1024 for c in cells]
        (line,) = ax.plot(xs, [c["bytes_per_s"] / 1e9 for c in cells], "o", label=f"{t} threads")
        ax.plot(
            xs,
            [model.throughput(c["chunk"], t) / 1e9 for c in cells],
            "-",
            color=line.get_color(),
            alpha=0.6,
        )
    ax.set_xscale("log", base=2)
    chunks = sorted({c["chunk"] for c in probe["cells"]})
    ax.set_xticks([c / 1024 for c in chunks], [f"{c // 1024}" for c in chunks])
    ax.set_xlabel("read size (KiB)")
    ax.set_ylabel("random read throughput (GB/s)")
    ax.set_title(f"{probe['path']} ({probe['bypass']}): points measured, lines fitted")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_ablation(report: dict, out: Path) -> None:
    """Per configuration: FFN bytes read per token and I/O ms per token, with the ratio to naive."""
    plt = _pyplot()
    rows = report["configs"]
    names = [f"{r['index']}. {r['name']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "ffn_bytes_per_token", "FFN MB read per token"),
        (axes[1], "io_ms_per_token", "FFN I/O ms per token"),
    ):
        values = [r[key] / (1e6 if key.endswith("bytes_per_token") else 1) for r in rows]
        bars = ax.bar(names, values, color="tab:blue")
        ax.set_ylim(0, 1.3 * max(values))  # room for the ratio labels and the legend
        # the table's ratios: taken within each round, then the median
        for bar, v, r in zip(bars, values, rows, strict=True):
            ax.annotate(
                f"{r[f'{key}_vs_naive']:.1f}x",
                (bar.get_x() + bar.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    if report.get("physical_limit_ms") is not None:
        axes[1].axhline(
            report["physical_limit_ms"],
            color="tab:red",
            ls="--",
            lw=1,
            label=f"physical limit of config {rows[-1]['index']} (probe)",
        )
        axes[1].legend(fontsize=8)
    fig.suptitle(
        f"{report['model']['name']}: FFN cache {100 * report['memory']['ffn_share']:.0f}%, "
        f"{rows[-1]['selector']}, k={report['settings']['window']} "
        f"(attention and embeddings in memory in every configuration)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
