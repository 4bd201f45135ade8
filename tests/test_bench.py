"""The ablation bench on stories260K with tiny settings: structure, and the orderings the paper's
table shows.

Timings are not asserted (benchmarks are commands, not timed tests): bytes and reads
are exact counts.
"""

from __future__ import annotations

import json
import statistics

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from conftest import QUIET
from mlx_flash import bench
from mlx_flash.convert.relayout import layout_sibling, relayout
from mlx_flash.rebuild import dense_ffn_weights
from mlx_flash.runtime.manifest import read_manifest
from mlx_flash.runtime.selectors import FixedSelector
from mlx_flash.runtime.sizes import parse_share
from mlx_flash.runtime.uncached import DIRECT_ALIGN


def sparse_selector(d_model: int = 64, d_ffn: int = 172, share: float = 0.3) -> FixedSelector:
    """A deterministic input-dependent selection (top 30% of a fixed random projection), like a
    predictor's."""
    proj = mx.array(np.random.default_rng(0).standard_normal((d_model, d_ffn)).astype(np.float32))
    k = int(share * d_ffn)
    return FixedSelector(lambda layer, x: np.argsort(-np.array((x @ proj).max(axis=0)))[:k])


def save_recent_probe(directory, model=None) -> dict:
    """A probe of ``directory``'s disk, saved as made now (``model``, default the defaults' cost
    model), so that the bench uses it instead of probing."""
    from datetime import datetime, timezone

    from mlx_flash.runtime.costmodel import PROBE_FORMAT, PROBE_VERSION, CostModel, probe_path
    from mlx_flash.runtime.files import write_json

    probe = {
        "format": PROBE_FORMAT,
        "version": PROBE_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "path": str(directory),
        "model": (model or CostModel.defaults()).to_json(),
    }
    probe_path(directory).parent.mkdir(parents=True, exist_ok=True)
    write_json(probe_path(directory), probe)
    return probe


@pytest.fixture(scope="module")
def stories(stories_flash, tmp_path_factory):
    """stories260K, with the bench's cache (its unbundled copy) in a temporary folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLX_FLASH_CACHE", str(tmp_path_factory.mktemp("bench-cache")))
    save_recent_probe(stories_flash)
    yield stories_flash
    mp.undo()


@pytest.fixture(scope="module")
def report(stories):
    return bench.run_bench(
        stories,
        ffn_cache=0.5,
        prompt="Once upon a time",
        tokens=8,
        selector=sparse_selector(),
        window=4,
        pin_share=0.5,
        reference=True,
        repeat=2,
        progress=False,
    )


def test_report_structure(report):
    rows = report["configs"]
    assert [(r["index"], r["name"]) for r in rows] == [
        (1, "naive"),
        (2, "hybrid"),
        (3, "+selector"),
        (4, "+window"),
        (5, "+bundling"),
    ]
    assert [r["layout"] for r in rows] == [
        "bundled",
        "bundled",
        "unbundled",
        "unbundled",
        "bundled",
    ]
    assert [r["selector"] for r in rows] == ["dense"] * 2 + ["fixed"] * 3
    assert [r["window"] for r in rows] == [0, 4, 0, 4, 4]
    assert rows[0]["pinned_rows"] == 0 and all(r["pinned_rows"] > 0 for r in rows[1:])
    for r in rows:
        assert r["cache_mode"] != "cached" and r["decode_tokens"] >= 7
        for key in bench.METRICS:
            assert np.isfinite(r[key]), key
        assert r["ffn_bytes_per_token"] > 0 and r["limit_ms_per_token"] > 0
    mem = report["memory"]
    assert mem["ffn_share"] == pytest.approx(0.5, abs=0.01)
    assert (
        mem["total"]
        == mem["trunk"]
        + mem["kv_cache"]
        + mem["temporaries"]
        + mem["selector"]
        + mem["buffers"]
        + mem["lookahead"]
    )
    assert report["physical_limit_ms"] == rows[-1]["limit_ms_per_token"]
    json.dumps(report)  # the --json output
    text = bench.format_report(report)
    assert (
        "naive" in text and "+bundling" in text and "physical limit" in text and "in memory" in text
    )


def test_naive_reads_the_whole_ffn_and_exact_configs_match_plain_mlx_lm(report, stories):
    naive, hybrid = report["configs"][:2]
    manifest = read_manifest(stories)
    ffn = manifest.ffn_bytes()
    # long runs are read O_DIRECT: each may take up to an aligned block more on either side
    padding = 2 * DIRECT_ALIGN * naive["reads_per_token"]
    assert ffn <= naive["ffn_bytes_per_token"] <= ffn + padding
    assert naive["fraction_loaded"] == 1.0
    # the FFN cache share stays
    assert hybrid["ffn_bytes_per_token"] == pytest.approx(ffn / 2, rel=0.1)
    assert naive["mean_read_bytes"] > 16 * 1024  # large sequential reads, not neuron by neuron
    plain, pinned = report["references"]
    assert plain["tokens"] == pinned["tokens"] == naive["tokens"] == hybrid["tokens"]
    # the references run once per round; the runtime's speed relative to mlx-lm's per round
    rates = [pinned["round_values"]["tokens_per_s"], plain["round_values"]["tokens_per_s"]]
    assert len(rates[0]) == report["settings"]["repeat"] and pinned["vs_mlx_lm"] == pytest.approx(
        statistics.median(a / b for a, b in zip(*rates, strict=True))
    )


def test_loads_fall_from_naive_to_window_and_bundling_only_cuts_reads(report):
    """Neurons read per token fall; bytes may include the gaps the reader reads through."""
    rows = report["configs"]
    loaded = [r["fraction_loaded"] for r in rows]
    assert loaded[0] >= loaded[1] >= loaded[2] >= loaded[3]
    assert (
        loaded[3] < loaded[0] / 2
        and rows[3]["ffn_bytes_per_token"] < rows[0]["ffn_bytes_per_token"]
    )
    window, bundled = rows[3], rows[4]
    assert bundled["tokens"] == window["tokens"]
    assert bundled["fraction_loaded"] == window["fraction_loaded"]
    assert bundled["reads_per_token"] < window["reads_per_token"]
    assert bundled["mean_read_bytes"] > window["mean_read_bytes"]


def test_cli_writes_json_and_plot(stories, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = [
        "--model",
        str(stories),
        "--ffn-cache",
        "50%",
        "--tokens",
        "3",
        "--selector",
        "dense",
        "--configs",
        "1,5",
        "--no-reference",
        "--json",
        str(out),
    ]
    if _has_matplotlib():
        argv += ["--plot", str(png)]
    assert bench.main(argv) == 0
    assert "1. naive" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["index"] for r in data["configs"]] == [1, 5]
    probe = json.loads((tmp_path / "bench.probe.json").read_text())  # the limit's source, beside
    assert data["probe"]["created"] == probe["created"] and "model" in probe
    if _has_matplotlib():
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_memory_budget_sets_the_share(stories, report):
    budget = report["memory"]["total"]  # what --ffn-cache 50% implies
    result = bench.run_bench(
        stories,
        memory_budget=budget,
        prompt="Once upon a time",
        tokens=8,
        selector="dense",
        setups=(1,),
        reference=False,
        progress=False,
    )
    assert (
        result["memory"]["ffn_share"] == pytest.approx(0.5, abs=0.01)
        and result["memory"]["total"] <= budget
    )


def test_bench_rejects_both_or_neither_budget(stories):
    with pytest.raises(ValueError, match="exactly one"):
        bench.run_bench(stories, progress=False)
    assert bench.main(["--model", str(stories), "--tokens", "1"]) == 1
    with pytest.raises(ValueError, match="must be in"):
        parse_share("150%")
    assert parse_share("50%") == parse_share("0.5") == 0.5


def test_relayout_round_trips_bytes_and_weights(stories, tmp_path):
    unbundled = relayout(stories, tmp_path / "unbundled", "unbundled", **QUIET)
    manifest = read_manifest(unbundled)
    assert manifest.layout == "unbundled" and len(manifest.layers[0].regions) == 3
    back = relayout(unbundled, tmp_path / "back", "bundled", **QUIET)
    store = read_manifest(stories).store_file
    assert (back / store).read_bytes() == (stories / store).read_bytes()
    a, b = dense_ffn_weights(stories), dense_ffn_weights(unbundled)
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_layout_sibling_is_cached_and_follows_the_source(stories, tmp_path):
    src = relayout(stories, tmp_path / "copy", "bundled", **QUIET)  # a private copy we may touch
    first = layout_sibling(src, "unbundled", tmp_path / "layouts", **QUIET)
    assert layout_sibling(src, "unbundled", tmp_path / "layouts", **QUIET) == first
    assert layout_sibling(src, "bundled", tmp_path / "layouts", **QUIET) == src.absolute()
    (src / "flash_settings.json").write_text((src / "flash_settings.json").read_text() + " ")
    second = layout_sibling(src, "unbundled", tmp_path / "layouts", **QUIET)
    assert second != first and not first.exists() and second.exists()


def test_window_zero_keeps_nothing_between_tokens(stories):
    model, _ = mlx_flash.load(
        stories, "1GB", ffn_cache=0.5, pin_share=0.0, window=0, selector=sparse_selector()
    )
    model(mx.array([[1, 2, 3]]))
    for _ in range(2):
        model(mx.array([[4]]))
        assert all(layer.buffer.n_used == 0 for layer in model.flash.layers)
    decode = [p for p in model.flash.telemetry.passes if p.phase == "decode"]
    assert all(p.total.loaded == p.total.requested for p in decode)  # all read again


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_bench_probes_the_disk_unless_a_probe_is_recent(stories, monkeypatch):
    from mlx_flash import probe

    saved = save_recent_probe(stories)
    assert probe.recent_probe(stories, 3600) == saved
    made = []
    monkeypatch.setattr(probe, "run_probe", lambda d, **kw: made.append(d) or {**saved, "new": 1})
    assert probe.recent_probe(stories, 0)["new"] == 1 and made == [stories]  # too old: probe now
    assert probe.recent_probe(stories, 3600)["new"] == 1  # and saved for the runtime


@pytest.mark.parametrize(
    "model, passed_over",
    [
        ("stories_calibrated", "proxy at sparsity 0.3"),
        ("relu2_calibrated", "predictor at natural zeros"),  # a point with no sparsity target
    ],
)
def test_where_auto_runs_dense_the_selector_setups_run_the_point_it_passed_over(
    model, passed_over, request, tmp_path, monkeypatch
):
    """Where auto expects dense streaming to read quickest (here: told it reads nothing), the
    ablation's selector setups run the sparse point it passed over, and say so."""
    from mlx_flash.runtime import selectors

    choose = selectors.choose

    def dense_reads_nothing(options, manifest, calibration, cost):
        return choose(
            options, manifest, calibration, lambda p: 0.0 if p.selector == "dense" else cost(p)
        )

    directory = request.getfixturevalue(model)
    monkeypatch.setattr(selectors, "choose", dense_reads_nothing)
    monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path))
    save_recent_probe(directory)
    result = bench.run_bench(
        directory,
        ffn_cache=0.5,
        prompt="Once upon a time",
        tokens=4,
        setups=(2, 5),
        reference=False,
        progress=False,
    )
    hybrid, full = result["configs"]
    assert hybrid["selector"] == "dense" and full["selector"] == passed_over.split()[0]
    assert result["settings"]["auto"].startswith("auto runs dense here (dense streaming reads")
    assert f"the selector setups run the point it passed over: {passed_over}" in (
        bench.format_report(result)
    )
