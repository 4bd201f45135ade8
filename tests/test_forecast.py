"""``mlx_flash.forecast``: the loader's plan from shapes alone, and per-token reads that match what
the runtime reads."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from mlx_flash import forecast
from mlx_flash.compute_probe import ComputeCosts, measure_compute
from mlx_flash.convert.converter import open_source, planned_manifest
from mlx_flash.reader_probe import measure_reader
from mlx_flash.runtime.costmodel import CostModel
from mlx_flash.runtime.expected import ReaderCost
from mlx_flash.runtime.manifest import read_manifest

# fixed compute constants: the tests check plans and reads, not this machine's timings
COSTS = ComputeCosts("float32", 5e9, 1e-4, 2e-4, 2e-4, 2e-4)
READER = ReaderCost(3e-4, 2e-5, 8e8, 8, 0)


@pytest.fixture(autouse=True)
def fixed_compute(monkeypatch):
    import mlx_flash.compute_probe as probe
    import mlx_flash.reader_probe as reader

    monkeypatch.setattr(probe, "measure_compute", lambda *a, **k: COSTS)
    monkeypatch.setattr(reader, "measure_reader", lambda *a, **k: READER)


def _selector(result: dict, name: str) -> dict:
    return next(s for s in result["selectors"] if s["selector"] == name)


@pytest.mark.parametrize("arch", ["llama", "phi", "glm4"])
def test_planned_manifest_is_what_conversion_writes(arch, tiny_flash):
    src, flash = tiny_flash(arch)
    planned, _ = planned_manifest(open_source(src))
    written = read_manifest(flash)
    assert planned.store_size == written.store_size
    assert planned.neuron_bytes() == written.neuron_bytes()
    for p, w in zip(planned.layers, written.layers, strict=True):
        assert (p.offset, p.nbytes, p.regions) == (w.offset, w.nbytes, w.regions)


@pytest.mark.parametrize("share", [1.0, 0.4])
def test_source_and_flash_directory_plan_what_the_loader_plans(share, tiny_flash):
    src, flash = tiny_flash("llama")
    given = {"memory_budget": "1GB", "ffn_cache": share, "pin_share": 0.5, "max_context": 64}
    model, _ = mlx_flash.load(flash, **given)
    loaded = model.flash.plan.as_dict()
    model.flash.close()
    for subject in (src, flash):  # not converted, converted
        result = forecast.run_forecast(str(subject), given, None, None)
        assert _selector(result, "dense")["plan"] == loaded
    assert (
        result["model"]["converted"]
        and not forecast.run_forecast(str(src), given, None, None)["model"]["converted"]
    )


def test_dense_reads_match_the_runtime(tiny_flash):
    """Bytes and reads per token once the buffers are warm, as the runtime counts them."""
    _, flash = tiny_flash("llama")
    given = {"memory_budget": "1GB", "ffn_cache": 0.4, "pin_share": 0.5, "max_context": 64}
    expected = _selector(forecast.run_forecast(str(flash), given, None, None), "dense")
    model, _ = mlx_flash.load(flash, selector="dense", **given)
    cache = mlx_flash_cache(model)
    model(mx.array([[3, 17, 42, 99, 7]]), cache=cache)
    for _ in range(6):
        model(mx.array([[5]]), cache=cache)
    warm = [p for p in model.flash.telemetry.passes if p.phase == "decode"][2:]  # an even number
    assert len(warm) == 4
    assert np.mean([p.total.read.bytes for p in warm]) == pytest.approx(expected["bytes"])
    assert np.mean([p.total.read.reads for p in warm]) == pytest.approx(expected["reads"])
    assert np.mean([p.total.loaded for p in warm]) == pytest.approx(expected["loaded"])
    model.flash.close()


def mlx_flash_cache(model):
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def test_calibrated_selectors_and_a_budget_too_small(tiny_flash, tmp_path):
    from conftest import convert_quietly

    src, _ = tiny_flash("llama")
    flash = convert_quietly(src, tmp_path / "calibrated", calibration="builtin", predictor_rank=8)
    result = forecast.run_forecast(
        str(flash), {"memory_budget": "1GB", "ffn_cache": 0.3}, None, None
    )
    names = [s["selector"] for s in result["selectors"]]
    assert names[0] == "dense" and "gate" in names
    gate = _selector(result, "gate")
    assert gate["selection"].startswith("calibration frequencies")
    assert gate["plan"]["selector"] == 2 * 128 * 64 * 4  # the gate rows stay resident
    assert gate["computed_rows"] < _selector(result, "dense")["computed_rows"]
    small = forecast.run_forecast(str(flash), {"memory_budget": "100KB"}, None, None)
    assert all(not s["fits"] and "too small" in s["error"] for s in small["selectors"])


def test_sparse_reads_follow_the_readers_gap_rule(tiny_flash, tmp_path, monkeypatch):
    """A reader that reads short gaps through makes fewer, longer reads of the same neurons; the
    forecast counts the reads of the reader it timed, not the disk model's rule."""
    import dataclasses

    import mlx_flash.reader_probe as reader
    from conftest import convert_quietly

    src, _ = tiny_flash("llama")
    flash = convert_quietly(src, tmp_path / "calibrated", calibration="builtin", predictor_rank=8)
    record = read_manifest(flash).neuron_bytes()
    gate = {}
    for gap in (0, 4 * record):
        monkeypatch.setattr(
            reader,
            "measure_reader",
            lambda *a, g=gap, **k: dataclasses.replace(READER, gap_bytes=g),
        )
        options = {"memory_budget": "1GB", "ffn_cache": 0.3}
        gate[gap] = _selector(forecast.run_forecast(str(flash), options, None, None), "gate")
    split, through = gate[0], gate[4 * record]
    assert split["loaded"] == pytest.approx(through["loaded"])  # the same neurons
    assert through["reads"] < split["reads"] and through["bytes"] > split["bytes"]
    assert split["bytes"] == pytest.approx(split["loaded"] * (2 / 3) * record)  # up and down only


def test_hub_id_reads_only_its_config(tiny_flash, monkeypatch):
    import huggingface_hub

    src, _ = tiny_flash("llama")
    asked = []

    def download(repo, filename):
        asked.append((repo, filename))
        return str(src / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    given = {"memory_budget": "1GB", "ffn_cache": 0.5, "max_context": 64}
    hub = forecast.run_forecast("org/tiny-llama", given, None, None)
    local = forecast.run_forecast(str(src), given, None, None)
    assert asked == [("org/tiny-llama", "config.json")]
    assert _selector(hub, "dense")["plan"] == _selector(local, "dense")["plan"]
    assert any("typical sparsity" in a for a in hub["assumptions"])


def test_gguf_header_alone(smollm2_gguf):
    result = forecast.run_forecast(str(smollm2_gguf), {"memory_budget": "400MB"}, "float32", None)
    m = result["model"]
    assert (m["layers"], m["d_model"], m["d_ffn"], m["neuron_bytes"]) == (30, 576, 1536, 6912)
    assert _selector(result, "dense")["plan"]["trunk"] == 219555072  # as the loader counts it
    assert [s["selector"] for s in result["selectors"]] == ["dense", "gate"]


def test_cli_prints_the_plan_and_every_assumption(tiny_flash, tmp_path, capsys):
    _, flash = tiny_flash("llama")
    out_json = tmp_path / "f.json"
    code = forecast.main([str(flash), "--memory-budget", "1GB", "--ffn-cache", "50%",
                          "--json", str(out_json)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "dense: budget 1.00 GB" in out and "tokens/s" in out
    data = json.loads(out_json.read_text())
    assert all(f"- {a}" in out for a in data["assumptions"])
    moe = forecast.main([str(tmp_path / "nothing-here.gguf")])
    assert moe == 1 and "no such GGUF file" in capsys.readouterr().err


def test_compute_micro_benchmark_measures_every_constant():
    costs = measure_compute(64, 128, mx.float32, repeats=2)
    assert costs.dtype == "float32" and costs.bytes_per_s > 1e8
    # differences of timings: a loaded machine can make one of them zero (clipped), never all
    assert min(costs.layer_s, costs.step_s, costs.flash_layer_s, costs.chunk_s) >= 0
    assert costs.step_s + costs.layer_s > 0


def test_reader_probe_times_contiguous_and_scattered_calls(tmp_path):
    reader = measure_reader(tmp_path, 4096, 4, CostModel.defaults(), repeats=2)
    assert reader.threads == 4 and reader.bytes_per_s > 1e6
    assert reader.seconds(1 << 20, 4) > reader.seconds(64 << 10, 1) > 0
    assert not list(tmp_path.iterdir())  # its probe file is gone
