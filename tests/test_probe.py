"""Storage probe and cost model: the probe measures real uncached reads on disk, the fit recovers
known costs, and the runtime takes its thread count from a saved probe (defaults without one)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import mlx_flash
from mlx_flash import probe
from mlx_flash.runtime.costmodel import Cell, CostModel, cost_model_for, load_probe, probe_path
from mlx_flash.runtime.files import write_json


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_probe_measures_every_cell_uncached(disk_dir):
    result = probe.run_probe(
        disk_dir, 1 << 20, chunks=[4096, 65536], threads=[1, 2], seconds=0.05, progress=False
    )
    assert [(c["chunk"], c["threads"]) for c in result["cells"]] == [
        (4096, 1),
        (4096, 2),
        (65536, 1),
        (65536, 2),
    ]
    assert all(
        c["bytes_per_s"] > 0 and c["reads"] > 0 and c["bytes"] == c["reads"] * c["chunk"]
        for c in result["cells"]
    )
    assert result["bypass"] in ("dontcache", "direct", "nocache")
    assert result["page_cache_after"] in (None, 0) or result["page_cache_after"] < 64 << 10
    assert list(disk_dir.iterdir()) == []  # the probe file is gone
    model = CostModel.from_json(result["model"])
    assert model.threads == (1, 2) and all(b > 0 for b in model.bandwidth)
    batches = result["batches"]  # the store reader timed on batches of random 4 KiB records
    assert set(batches["ms_per_batch"]) == {"1", "2"} and all(
        ms > 0 for ms in batches["ms_per_batch"].values()
    )
    assert model.batch_threads == batches["best_threads"] == model.reader_threads(4096)
    text = probe.format_probe(result)
    assert "4 KiB" in text and "64 KiB" in text and "fitted cost model" in text


def test_probe_times_the_readers_long_runs(disk_dir):
    """With room for a layer-sized call the probe times the reader streaming it at each thread
    count as fast as the best for sparse batches, and each run size; the runtime takes the fastest
    of those thread counts and the smallest run size within the tolerance of its fastest."""
    size = 2 * probe.RUN_CALL_BYTES
    result = probe.run_probe(
        disk_dir, size, chunks=[65536], threads=[1, 2], seconds=0.02, progress=False
    )
    runs, batches = result["runs"], result["batches"]
    tolerance = 1 + probe.RUN_TOLERANCE
    batch_ms = {int(t): v for t, v in batches["ms_per_batch"].items()}
    fast = {t for t, v in batch_ms.items() if v <= tolerance * min(batch_ms.values())}
    ms = {int(t): {int(n): v for n, v in by.items()} for t, by in runs["ms_per_call"].items()}
    assert set(ms) == fast and all(sorted(ms[t]) == list(probe.run_sizes(t)) for t in ms)
    threads, best = runs["threads"], runs["best_run_bytes"]
    assert min(ms[threads].values()) == min(min(by.values()) for by in ms.values())
    fastest = min(ms[threads].values())
    assert ms[threads][best] <= tolerance * fastest
    assert all(v > tolerance * fastest for n, v in ms[threads].items() if n < best)
    model = CostModel.from_json(result["model"])
    assert model.reader_threads(4096) == threads
    assert model.long_run_bytes == best == model.run_bytes(1) == model.run_bytes(32)
    assert (model.reader_read_s, model.reader_bytes_per_s) == probe.fit_reader(batches, runs)
    text = probe.format_probe(result)
    assert "contiguous per call" in text and f"reads with {threads} threads" in text
    assert "us per read" in text
    assert list(disk_dir.iterdir()) == []


def _reader_cells(read_s: float, bytes_per_s: float, threads: int = 4) -> tuple[dict, dict]:
    """A probe's reader timings (``measure_batches``, ``measure_runs``) of a reader whose calls
    cost ``reads * read_s + bytes / bytes_per_s``."""
    cut, call = 512 << 10, probe.RUN_CALL_BYTES
    batch = {"record": 4096, "batch": 32}
    batch_ms = 1e3 * (32 * read_s + 32 * 4096 / bytes_per_s)
    run_ms = 1e3 * (call // cut * read_s + call / bytes_per_s)
    batches = {**batch, "ms_per_batch": {str(threads): batch_ms, "1": 2 * batch_ms}}
    runs = {
        "call_bytes": call,
        "ms_per_call": {str(threads): {str(cut): run_ms, str(cut // 2): 2 * run_ms}},
        "threads": threads,
        "best_run_bytes": cut,
    }
    return batches, runs


def test_the_reader_fit_solves_its_two_patterns():
    """The reader's cost per read and bandwidth come back from a scattered batch and a layer
    streamed whole at the runtime's threads; noise cannot make either negative."""
    read_s, bandwidth = probe.fit_reader(*_reader_cells(12e-6, 1.5e9))
    assert read_s == pytest.approx(12e-6) and bandwidth == pytest.approx(1.5e9)
    batches, runs = _reader_cells(12e-6, 1.5e9)
    batches["ms_per_batch"]["4"] = 0.01  # a batch faster than its bytes: no per-read cost left
    read_s, bandwidth = probe.fit_reader(batches, runs)
    assert read_s == 0.0 and bandwidth == pytest.approx(
        runs["call_bytes"] / (runs["ms_per_call"]["4"][str(512 << 10)] / 1e3)
    )


def test_auto_weighs_reads_with_the_readers_own_costs(relu2_calibrated, cache):
    """Where the probe timed the reader at the runtime's threads, auto's expected reads use its
    per-read cost and bandwidth, not the disk's fit: on a disk whose short reads cost 80 us by
    the fit but 12 us through the reader (advised to the kernel), and whose long reads stream at
    1.46 GB/s through it, relu2-8m's predictor reads under 2% of the FFN per token where dense
    streaming reads half: auto must take the predictor, uncached as the probe timed the reader
    and the bench runs."""
    from mlx_flash.runtime.expected import ReaderCost

    disk = CostModel(
        (1, 4, 16), (150e-6, 80e-6, 14.8e-6), (1.5e9, 1.59e9, 1.59e9), "test", 4, 512 << 10
    )
    timed = replace(disk, reader_read_s=12.2e-6, reader_bytes_per_s=1.46e9)
    assert ReaderCost.of_disk(timed, 4, 0, uncached=True) == ReaderCost(0.0, 12.2e-6, 1.46e9, 4, 0)
    # not timed at 16 threads, nor through the page cache
    assert ReaderCost.of_disk(timed, 16, 0, True) == ReaderCost.of_disk(disk, 16, 0, True)
    assert ReaderCost.of_disk(timed, 4, 0) == ReaderCost.of_disk(disk, 4, 0)
    chosen = {}
    for name, model in (("disk", disk), ("reader", timed)):
        _save_probe(model, relu2_calibrated)
        flash, _ = mlx_flash.load(relu2_calibrated, "1GB", ffn_cache=0.5, page_cache=False)
        chosen[name] = flash.flash.choice
        flash.flash.close()
    assert chosen["reader"].name == "predictor"
    assert chosen["disk"].name == "dense"  # the disk's fit alone: dense "reads no slower"


def test_long_run_cuts_keep_the_staging_memory_bounded():
    assert probe.run_sizes(1) == probe.RUN_SIZES
    assert probe.run_sizes(64) == tuple(n for n in probe.RUN_SIZES if n <= 512 << 10)
    assert all(n * 32 <= probe.RUN_STAGING_BYTES for n in probe.run_sizes(32))
    assert probe.run_sizes(1024) == probe.RUN_SIZES[:1]


def test_probe_refuses_a_ram_disk(monkeypatch, disk_dir):
    monkeypatch.setattr(probe, "on_ram_disk", lambda path: True)
    with pytest.raises(ValueError, match="RAM"):
        probe.run_probe(disk_dir, 1 << 20, chunks=[4096], threads=[1], seconds=0.01, progress=False)


def test_probe_cli_writes_json_and_saves_for_the_runtime(disk_dir, cache, tmp_path, capsys):
    out = tmp_path / "probe.json"
    argv = [
        "--path",
        str(disk_dir),
        "--size",
        "1MiB",
        "--chunk-sizes",
        "4KiB",
        "16KiB",
        "--threads",
        "1",
        "2",
        "--seconds",
        "0.02",
        "--json",
        str(out),
    ]
    assert probe.main(argv) == 0
    assert "fitted cost model" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["cells"]) == 4 and data["format"] == "mlx_flash-probe"
    assert probe_path(disk_dir).is_file()
    assert load_probe(probe_path(disk_dir)).threads == (1, 2)
    assert cost_model_for(disk_dir).source.startswith("probe of")


def test_probe_plot(disk_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from mlx_flash.plots import plot_probe

    result = probe.run_probe(
        disk_dir, 1 << 20, chunks=[4096, 8192], threads=[1], seconds=0.02, progress=False
    )
    plot_probe(result, tmp_path / "probe.png")
    assert (tmp_path / "probe.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_recovers_per_read_cost_and_bandwidth():
    truth = {1: (50e-6, 0.8e9), 8: (10e-6, 2.0e9), 32: (5e-6, 3.0e9)}
    cells = [
        Cell(s, t, s / (a + s / b)) for t, (a, b) in truth.items() for s in (4096, 65536, 1 << 20)
    ]
    model = CostModel.fit(cells, "synthetic")
    for t, (a, b) in truth.items():
        i = model.threads.index(t)
        assert model.per_read_s[i] == pytest.approx(a, rel=1e-6)
        assert model.bandwidth[i] == pytest.approx(b, rel=1e-6)
    # between measured thread counts the rate lies between its neighbours; outside, it is clamped
    assert model.throughput(4096, 1) < model.throughput(4096, 4) < model.throughput(4096, 8)
    assert model.throughput(4096, 64) == model.throughput(4096, 32)
    assert model.best_threads(4096) == 32 and model.best_throughput(1 << 20) == model.throughput(
        1 << 20, 32
    )
    assert model.read_seconds(1 << 20, 16) == pytest.approx(
        (1 << 20) / model.best_throughput(65536)
    )
    assert CostModel.from_json(json.loads(json.dumps(model.to_json()))) == model


def test_long_runs_are_split_where_the_bandwidth_is_reached():
    model = CostModel((1, 32), (100e-6, 20e-6), (0.5e9, 1e9))
    for t in (1, 32):
        size = model.run_bytes(t)
        assert model.throughput(size, t) >= 0.9 * model.throughput(1 << 40, t)
        assert size == 64 << 10 or model.throughput(size // 2, t) < 0.9 * model.throughput(
            1 << 40, t
        )
    assert model.run_bytes(32) < model.run_bytes(1)  # more parallelism hides per-read cost sooner


def test_fit_keeps_costs_non_negative_on_noisy_data():
    # flat: bandwidth bound
    cells = [
        Cell(4096, 1, 100e6),
        Cell(65536, 1, 90e6),
        Cell(1 << 20, 1, 95e6),
    ]
    model = CostModel.fit(cells, "noisy")
    assert model.per_read_s[0] >= 0 and model.bandwidth[0] > 0
    assert 50e6 < model.throughput(65536, 1) < 200e6


def test_gap_worth_reading_through_is_the_cost_of_one_read():
    cells = [Cell(s, t, s / (20e-6 / t + s / (1e9 * t))) for t in (1, 8) for s in (4096, 65536)]
    model = CostModel.fit(cells, "test")
    assert model.gap_bytes(1) == pytest.approx(20e-6 * 1e9, rel=1e-3)  # a * b
    assert model.gap_bytes(8) == pytest.approx(20e-6 / 8 * 8e9, rel=1e-3)
    assert model.gap_bytes(6) == model.gap_bytes(8)  # the nearest measured count


def test_defaults_match_design_numbers():
    model = CostModel.defaults()
    assert model.throughput(4096, 1) == pytest.approx(70e6)
    assert model.throughput(65536, 32) == pytest.approx(2e9)
    assert model.best_threads(4096) == 32


def _save_probe(model: CostModel, flash) -> None:
    probe_path(flash).parent.mkdir(parents=True, exist_ok=True)
    write_json(
        probe_path(flash), {"format": "mlx_flash-probe", "version": 1, "model": model.to_json()}
    )


def test_runtime_takes_threads_from_the_probe(stories_flash, cache):
    flash = stories_flash
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5)
    assert model.flash.reader.threads == 32 and model.flash.cost.source.startswith("defaults")
    # a disk where 4 threads are as good as any number: the runtime uses 4
    cells = [
        Cell(s, t, s / (20e-6 / min(t, 4) + s / 1e9)) for t in (1, 2, 4, 16) for s in (4096, 65536)
    ]
    fitted = CostModel.fit(cells, "test probe")
    _save_probe(fitted, flash)
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5)
    assert model.flash.reader.threads == 4
    assert model.flash.reader.max_run_bytes == fitted.run_bytes(4)
    # a probe that timed the reader's batches: its fastest thread count wins over the
    # disk-only choice
    batched = CostModel.fit(cells, "test probe", batch_threads=2)
    _save_probe(batched, flash)
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5)
    assert model.flash.reader.threads == 2
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5, threads=2)
    assert model.flash.reader.threads == 2
    # a probe that timed the reader streaming a layer: long runs are cut where it was fastest
    _save_probe(replace(batched, long_run_bytes=2 << 20), flash)
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5)
    assert model.flash.reader.max_run_bytes == 2 << 20 != fitted.run_bytes(2)


def test_planners_take_the_gap_rule_of_the_runtimes_reader(
    stories_flash, stories_calibrated, monkeypatch
):
    """The reader the runtime opens reads gaps through as the probe says, and none where it
    advises its runs to the kernel (Linux); auto's planner plans with the gap rule of that same
    reader."""
    from mlx_flash.runtime.expected import ReaderCost
    from mlx_flash.runtime.loader import open_store
    from mlx_flash.runtime.manifest import read_manifest
    from mlx_flash.runtime.options import FlashOptions

    manifest, cost = read_manifest(stories_flash), CostModel.defaults()
    cached = FlashOptions.build({"page_cache": True})
    uncached = FlashOptions.build({"page_cache": False})
    assert cost.gap_bytes(4) > 0
    for options in (cached, uncached):
        with open_store(stories_flash, manifest, options, cost, 4) as reader:
            assert reader.gap_bytes == (0 if reader.advises else cost.gap_bytes(4))

    planned = []
    of_disk = ReaderCost.of_disk
    monkeypatch.setattr(
        ReaderCost, "of_disk", lambda *a: planned.append(a[2]) or of_disk(*a), raising=True
    )
    for page_cache in (True, False):
        model, _ = mlx_flash.load(stories_calibrated, "1GB", ffn_cache=0.5, page_cache=page_cache)
        assert planned.pop() == model.flash.reader.gap_bytes
        model.flash.close()
