"""``python -m mlx_flash.forecast SRC``: before converting, whether a model fits a memory budget and
how fast it will run, from its config alone and this machine's measurements.

Why: users want to know before downloading or converting tens of gigabytes. SRC is a flash model
directory, an mlx-lm/Hugging Face directory, a GGUF file (its header is read, not its tensors) or a
hub id (only its config.json is fetched). The memory plan is the loader's own (``budget``), made
from the shapes of mlx-lm's lazily built model; per-token reads and time follow the runtime's
behaviour (``runtime/expected.py``) with the disk's cost model (the cached ``mlx_flash.probe`` of
the disk holding ``--path``, else its defaults), the store reader timed on that disk
(``reader_probe``) and a short compute micro-benchmark (``compute_probe``). Selectors are
forecast from the store's calibration when SRC is a calibrated flash directory, else at a stated
typical sparsity. Every assumption is printed.

    python -m mlx_flash.forecast SmolLM2-135M-Instruct.Q4_1.gguf --memory-budget 400MB
    python -m mlx_flash.forecast ~/models/my-flash-model --memory-budget 2GB --json forecast.json
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import load_config

from .cli import add_debug_arg, add_flash_args, load_options, run_cli
from .runtime import selectors
from .runtime.adapters import build_model, is_moe
from .runtime.budget import ModelFacts, model_facts, plan_memory, shape_facts
from .runtime.calibration import (
    Calibration,
    natural_zeros,
    read_calibration,
    selection_frequency,
)
from .runtime.costmodel import CostModel, cost_model_for
from .runtime.errors import BudgetError, UnsupportedModelError
from .runtime.expected import Costs, Layout, ReaderCost, dense_cost, sparse_cost
from .runtime.files import cache_root, write_json
from .runtime.loader import default_compute_dtype, row_bytes
from .runtime.manifest import DTYPES, MANIFEST_FILE, MX_DTYPES, Manifest, read_manifest, trunk_files
from .runtime.options import FlashOptions, read_settings
from .runtime.sizes import format_size

TOOL = "forecast"
# the selectors' kept share where no calibration measured it: gated FFNs at the converter's default
# target (0.5); ReLU-family FFNs keep about a tenth of their neurons (their natural zeros)
TYPICAL_SPARSITY = {"gate": 0.5, "predictor": 0.9}


@dataclass
class Subject:
    """What is forecast: the store's manifest (as converting would write it, for a source), the
    config, mlx-lm's lazily built model, and for a flash directory the directory."""

    where: str
    manifest: Manifest
    config: dict
    model: object
    directory: Path | None
    calibration: Calibration | None
    trunk_shapes: dict[str, tuple[int, ...]] | None  # a source's trunk (a directory has files)


def open_subject(src: str, dtype: str | None = None) -> Subject:
    """The flash directory, source directory, GGUF file or hub id ``src``, shapes only."""
    path = Path(src)
    if (path / MANIFEST_FILE).is_file():
        manifest, config = read_manifest(path), load_config(path)
        _refuse_moe(src, config)
        return Subject(src, manifest, config, build_model(config), path,
                       read_calibration(path, manifest), None)  # fmt: skip
    from .convert.converter import open_source, planned_manifest
    from .convert.predictor import auto_ranks
    from .convert.source import SourceModel, model_after_sanitize

    if src.endswith(".gguf") or path.is_dir():
        source = open_source(src)
    else:  # a hub id: its config.json alone, every tensor assumed present
        from huggingface_hub import hf_hub_download

        config = load_config(Path(hf_hub_download(src, "config.json")).parent)
        names = dict(tree_flatten(build_model(config).parameters()))
        source = SourceModel(config, names, lambda _: None, f"hub {src} (config.json)")
    _refuse_moe(src, source.config)
    manifest, plan = planned_manifest(source, dtype)
    if natural_zeros(manifest):  # the predictors conversion would train
        manifest.extra["predictor"] = {"ranks": auto_ranks(manifest)}
    model = model_after_sanitize(plan.config, source.tensors)
    return Subject(src, manifest, plan.config, model, None, None, plan.trunk)


def _refuse_moe(src: str, config: dict) -> None:
    if is_moe(config.get("model_type", "")):
        raise UnsupportedModelError(f"{src}: mixture-of-experts models are not forecast yet")


def subject_facts(subject: Subject, dtype: mx.Dtype, options: FlashOptions) -> ModelFacts:
    """The loader's model facts: from the trunk files of a flash directory, else from the trunk's
    shapes (floats held in the compute dtype; the cast transient is the largest stored tensor)."""
    m = subject.manifest
    if subject.directory is not None:
        files = trunk_files(subject.directory)
        return model_facts(subject.model, subject.config, m, files, dtype, options)
    sizes = [math.prod(shape) for shape in subject.trunk_shapes.values()]
    cast = m.dtype != str(dtype).split(".")[-1]
    transient = max(sizes, default=0) * DTYPES[m.dtype] if cast else 0
    return shape_facts(subject.model, subject.config, m, sum(sizes) * dtype.size, transient, dtype,
                       options)  # fmt: skip


def trunk_gemv(subject: Subject, facts: ModelFacts) -> int:
    """Trunk bytes a step multiplies: all but the input embedding (a lookup), unless the head is
    tied to it (then the model has one vocabulary-sized matrix)."""
    vocab = [
        v
        for _, v in tree_flatten(subject.model.parameters())
        if v.ndim == 2 and v.shape[0] == facts.vocab
    ]
    untied = len(vocab) >= 2
    return facts.trunk - (facts.vocab * facts.d_model * facts.itemsize if untied else 0)


def selectors_to_forecast(subject: Subject, asked: str | None) -> list[str]:
    """Dense and, unless one is asked for, every selector the subject can run."""
    if asked not in (None, "auto"):
        return ["dense"] if asked == "dense" else ["dense", asked]
    m = subject.manifest
    if subject.directory is not None:
        why = selectors.available(m, subject.calibration)
        return ["dense"] + [n for n in ("gate", "proxy", "predictor") if not why[n]]
    return ["dense"] + (["gate"] if m.gated else ["predictor"] if natural_zeros(m) else [])


def frequency(subject: Subject, name: str, options: FlashOptions) -> tuple[np.ndarray, str]:
    """Per layer and neuron, the chance a token selects it, and where that came from."""
    m, cal = subject.manifest, subject.calibration
    if cal is None:
        kept = 1.0 - TYPICAL_SPARSITY["predictor" if natural_zeros(m) else "gate"]
        if options.sparsity is not None:
            kept = 1.0 - options.sparsity
        shape = (m.n_layers, m.d_ffn)
        return np.full(shape, kept), f"no calibration: every neuron kept with p={kept:g}"
    return selection_frequency(m, cal, name, options.sparsity)


def forecast_selector(
    subject: Subject,
    facts: ModelFacts,
    given: dict,
    name: str,
    disk: CostModel,
    costs: Costs,
    reader: ReaderCost,
) -> dict:
    """One selector: its memory plan (or why it does not fit) and expected per-token cost
    (``reader``: what a store-reader call costs on this disk)."""
    options = FlashOptions.build({**given, "selector": name}, TOOL)
    m, itemsize = subject.manifest, facts.itemsize
    exact_gate = name in ("gate", "oracle")
    skip = selectors.GATE_PARTS if exact_gate else ()
    held = selectors.holds_bytes(name, subject.directory or Path("."), m, itemsize)
    row = row_bytes(m, itemsize, skip)
    out: dict = {"selector": name}
    freq, note = (None, "every neuron") if name == "dense" else frequency(subject, name, options)
    try:
        plan = plan_memory(facts, options, held, row, name == "dense", freq)
    except BudgetError as e:
        return {**out, "fits": False, "error": str(e)}
    layout = Layout.of_store(m, skip, row, trunk_gemv(subject, facts), reader)
    if freq is None:
        cost = dense_cost(plan, facts, layout, disk, costs)
    else:
        rows = options.compute_rows or "resident"
        cost = sparse_cost(plan, facts, layout, disk, costs, freq, options.window, rows, held)
    return {**out, "fits": True, "plan": plan.as_dict(), "describe": plan.describe(),
            "selection": note, "threads": layout.threads, **cost.as_dict()}  # fmt: skip


def run_forecast(src: str, given: dict, dtype: str | None, path: Path | None) -> dict:
    """The whole forecast as JSON data (see ``format_forecast``)."""
    from .compute_probe import measure_compute
    from .reader_probe import measure_reader

    subject = open_subject(src, dtype)
    if subject.directory is not None:
        given = {**read_settings(subject.directory), **given}
    options = FlashOptions.build(given, TOOL)
    compute = MX_DTYPES[options.compute_dtype or default_compute_dtype(subject.manifest)]
    facts = subject_facts(subject, compute, options)
    disk_at = path or (subject.directory.parent if subject.directory else cache_root())
    disk = cost_model_for(disk_at)
    measured = measure_compute(facts.d_model, facts.d_ffn, compute)
    costs = Costs(**{k: v for k, v in measured.as_dict().items() if k != "dtype"})
    region = subject.manifest.layers[0].regions
    threads = options.threads or disk.reader_threads(min(r.record_size for r in region))
    disk_at.mkdir(parents=True, exist_ok=True)
    reader = measure_reader(disk_at, sum(r.record_stride for r in region), threads, disk)
    m = subject.manifest
    results = [
        forecast_selector(subject, facts, given, name, disk, costs, reader)
        for name in selectors_to_forecast(
            subject, options.selector if "selector" in given else None
        )
    ]
    return {
        "source": src,
        "model": {"model_type": m.model_type, "layers": m.n_layers, "d_model": m.d_model,
                  "d_ffn": m.d_ffn, "store_dtype": m.dtype, "layout": m.layout,
                  "neuron_bytes": m.neuron_bytes(), "store_bytes": m.store_size,
                  "compute_dtype": measured.dtype, "converted": subject.directory is not None},
        "disk": {"at": str(disk_at), **disk.to_json()},
        "reader": asdict(reader),
        "compute": measured.as_dict(),
        "selectors": results,
        "assumptions": assumptions(subject, options, disk),
    }  # fmt: skip


def assumptions(subject: Subject, options: FlashOptions, disk: CostModel) -> list[str]:
    """What the forecast takes for granted, in words."""
    out = [
        "decode only: prompt processing is not forecast; a step is compute then reads, not "
        "overlapped",
        "reads bypass the page cache: each reader call costs what the store reader's calls cost "
        "when timed on this disk just now (reader_probe), gaps read through as it does; run "
        f"sizes and threads from the probe's cost model ({disk.source}); with --page-cache (the "
        "default) a store that fits in free RAM is read from memory once warm",
        "compute: matrix-vector products at the micro-benchmark's rate over the weights a step "
        "multiplies (trunk but an untied input embedding, computed FFN rows, the selector), plus "
        "fixed costs per step, layer, FlashFFN layer and streamed chunk timed on tiny llamas",
        f"memory plan for {options.max_context} tokens of context, prefill steps of "
        f"{options.prefill_step_size} (the loader's plan, budget.plan_memory)",
        "dense: pinned rows resident, the rest streamed in chunks of the window buffer, one chunk "
        "kept between tokens",
        f"sparse selectors: neurons chosen independently per token with their selection "
        f"frequency; window {options.window}; the hottest pinned",
    ]
    if subject.directory is None:
        out.append(
            f"not converted: store as the converter would write it ({subject.manifest.dtype}, "
            "bundled); selectors at typical sparsity "
            + ", ".join(f"{k} {v:g}" for k, v in TYPICAL_SPARSITY.items())
        )
        if subject.manifest.quantization is not None:
            out.append("quantized source: its trunk is counted unpacked (overstated)")
    return out


def format_forecast(result: dict) -> str:
    """The forecast as text: the model, the constants, one line per selector, the assumptions."""
    m, c, r = result["model"], result["compute"], result["reader"]
    lines = [
        f"Forecast for {result['source']}: {m['model_type']}, {m['layers']} layers, d_model "
        f"{m['d_model']}, d_ffn {m['d_ffn']}; store {m['store_dtype']} {m['layout']}, "
        f"{m['neuron_bytes']} B per neuron, {format_size(m['store_bytes'])}; compute "
        f"{m['compute_dtype']}",
        f"Disk: {result['disk']['source']}; reader calls: {1e3 * r['call_s']:.2f} ms + "
        f"{1e6 * r['read_s']:.1f} us per read + {r['bytes_per_s'] / 1e9:.2f} GB/s at "
        f"{r['threads']} threads",
        f"Compute: {c['bytes_per_s'] / 1e9:.1f} GB/s matrix-vector; per step "
        f"{1e3 * c['step_s']:.2f} ms, per layer {1e3 * c['layer_s']:.2f} + "
        f"{1e3 * c['flash_layer_s']:.2f} ms (FlashFFN), per streamed chunk "
        f"{1e3 * c['chunk_s']:.2f} ms",
        "",
    ]
    for s in result["selectors"]:
        if not s["fits"]:
            lines.append(f"{s['selector']}: does not fit: {s['error']}")
            continue
        lines += [
            f"{s['selector']}: {s['describe']}",
            f"  {s['bytes'] / 1e6:.2f} MB/token in {s['reads']:.0f} reads ({s['threads']} "
            f"threads), I/O {1e3 * s['io_s']:.1f} ms + compute {1e3 * s['compute_s']:.1f} ms "
            f"-> {s['tokens_per_s']:.2f} tokens/s; selection: {s['selection']}",
        ]
    lines += ["", "Assumptions:"] + [f"- {a}" for a in result["assumptions"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.forecast",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="flash model directory, mlx-lm directory, .gguf file or hub id")
    p.add_argument("--dtype", choices=sorted(MX_DTYPES), help="store dtype converting would use")
    p.add_argument(
        "--path", type=Path, help="a directory on the disk the model will stream from (its probe)"
    )
    p.add_argument("--json", type=Path, help="also write the forecast to this file")
    add_flash_args(p, TOOL)
    add_debug_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    result = run_forecast(args.src, load_options(args, TOOL), args.dtype, args.path)
    print(format_forecast(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
