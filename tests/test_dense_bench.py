"""Neuron traces: recording them from a dense run, scaling them to a 7B shape, and the 7B-shaped
bench's FFN-only harness on a tiny shape; the physical limit's definition."""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate

import mlx_flash
from mlx_flash.runtime.costmodel import CostModel
from mlx_flash.runtime.limit import needed_reads, run_lengths
from mlx_flash.runtime.selectors import FixedSelector
from mlx_flash.runtime.trace import Trace, load_trace
from mlx_flash.trace_scaling import density, layer_run_lengths, overlap, scale_trace


def drifting_trace(n_ids=256, layers=4, tokens=80, seed=0) -> Trace:
    """Selections like a real model's: per layer its own density, a set that drifts from token to
    token (high overlap), and ids in short runs of adjacent neurons."""
    rng = np.random.default_rng(seed)
    rows = [[] for _ in range(tokens)]
    for layer in range(layers):
        share = 0.05 + 0.1 * layer
        score = rng.standard_normal(n_ids)
        for t in range(tokens):
            score = 0.9 * score + np.sqrt(1 - 0.81) * rng.standard_normal(n_ids)
            smooth = score + np.roll(score, 1)  # neighbours tend to be selected together
            rows[t].append(np.argsort(-smooth)[: int(share * n_ids)])
    return Trace.from_rows("neurons", n_ids, layers, [r for t in rows for r in t])


def test_scaling_keeps_density_overlap_and_run_lengths():
    source = drifting_trace()
    scaled = scale_trace(source, 2000, 8, tokens=40, seed=1)
    assert (scaled.kind, scaled.n_ids, scaled.n_layers, scaled.tokens) == ("neurons", 2000, 8, 40)
    for j in range(scaled.n_layers):
        i = j * source.n_layers // scaled.n_layers  # stretched
        assert density(scaled, j) == pytest.approx(density(source, i), rel=0.1)
        assert overlap(scaled, j) == pytest.approx(overlap(source, i), abs=0.04)
        runs, src = layer_run_lengths(scaled, j), layer_run_lengths(source, i)
        assert runs.mean() == pytest.approx(src.mean(), rel=0.1)  # never made more contiguous
        for length in (1, 2, 3):
            assert np.mean(runs == length) == pytest.approx(np.mean(src == length), abs=0.05)
        ids = np.concatenate([scaled.at(t, j) for t in range(scaled.tokens)])
        assert ids.max() > 0.9 * 2000 and ids.min() < 0.1 * 2000  # spread over the whole layer
    # copies of a source layer are not in lockstep: a block's ids differ from the next one's
    first = scaled.at(0, 0)
    blocks = [set(first[(first >= b * 256) & (first < (b + 1) * 256)] % 256) for b in range(7)]
    assert len({frozenset(b) for b in blocks}) > 1


def test_scaling_refuses_a_short_or_expert_trace():
    from mlx_flash.runtime.errors import FlashFormatError

    with pytest.raises(FlashFormatError, match="80 tokens; 100 are needed"):
        scale_trace(drifting_trace(), 2000, 8, tokens=100)
    experts = Trace.from_rows("experts", 8, 1, [np.array([1, 2])])
    with pytest.raises(FlashFormatError, match="trace of experts"):
        scale_trace(experts, 64, 1, tokens=1)


def test_record_trace_round_trips_the_decode_selections(tiny_flash, tmp_path):
    _, flash = tiny_flash("llama")
    proj = mx.array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    chosen = []

    def choose(layer, x):
        ids = np.sort(np.argsort(-np.array((x @ proj).max(axis=0)))[:20])
        if x.shape[0] == 1:
            chosen.append((layer, ids))
        return ids

    path = tmp_path / "t.npz"
    model, tokenizer = mlx_flash.load(
        flash, "1GB", ffn_cache=0.5, selector=FixedSelector(choose), record_trace=str(path)
    )
    generate(model, tokenizer, "hello there", max_tokens=6)
    model.flash.close()
    trace = load_trace(path)
    layers, d_ffn = model.flash.manifest.n_layers, model.flash.manifest.d_ffn
    assert (trace.kind, trace.n_ids, trace.n_layers) == ("neurons", d_ffn, layers)
    assert trace.tokens == len(chosen) // layers >= 4
    assert trace.meta["selector"] == "fixed"
    for row, (layer, ids) in enumerate(chosen):
        assert row % layers == layer
        np.testing.assert_array_equal(trace.at(row // layers, layer), ids)


def test_needed_reads_count_runs_of_adjacent_records():
    ids = np.array([0, 1, 2, 5, 7, 8])
    assert needed_reads(ids, 64) == 3
    assert needed_reads(ids, 2) == 4  # the run of three is cut in two reads
    assert list(run_lengths(ids)) == [3, 1, 2]
    assert needed_reads(np.zeros(0, np.int64), 4) == 0


def test_limit_counts_only_the_wanted_parts():
    from mlx_flash.runtime.limit import limit_seconds
    from mlx_flash.runtime.manifest import Part, Region

    cost = CostModel((8,), (1e-4,), (1e9,))
    parts = (Part("gate", 0, 25, "float32"), Part("up", 100, 50, "float32"))
    region = Region(0, 300, 300, 10, parts)
    both = limit_seconds(cost, (region,), None, np.array([3, 4, 9]), 8, 1 << 20)
    assert both == pytest.approx(2 * 1e-4 + 3 * 300 / 1e9)  # two runs, both parts' bytes
    up = limit_seconds(cost, (region,), {"up": None}, np.array([3, 4, 9]), 8, 1 << 20)
    assert up == pytest.approx(2 * 1e-4 + 3 * 200 / 1e9)


@pytest.fixture
def tiny_dense(monkeypatch):
    """A dense synthetic shape small enough for the fast suite: 2 layers, d_model 64, d_ffn 512,
    in float16 and 4-bit."""
    from mlx_flash import synthetic

    monkeypatch.setitem(synthetic.SHAPES, "tiny", synthetic.DenseShape("llama", 2, 64, 512))
    monkeypatch.setitem(
        synthetic.SHAPES, "tiny-q4", synthetic.DenseShape("llama", 2, 64, 512, bits=4)
    )


@pytest.mark.parametrize("name", ["tiny", "tiny-q4"])
def test_dense_synthetic_bench_runs_the_five_configurations(tiny_dense, tmp_path, name):
    from mlx_flash.dense_bench import format_dense_synthetic, run_dense_synthetic

    drifting_trace(n_ids=128, layers=2, tokens=40).save(tmp_path / "src.npz")
    args = argparse.Namespace(
        synthetic=name, synthetic_dir=tmp_path, trace=tmp_path / "src.npz", configs="1,2,3,4,5",
        tokens=8, warmup=4, repeat=1, ffn_cache=0.5, window=None, pin_share=None,
        compute_dtype=None, threads=None,
    )  # fmt: skip
    report = run_dense_synthetic(args, {}, progress=False)
    rows = {r["name"]: r for r in report["configs"]}
    assert list(rows) == ["naive", "hybrid", "+selector", "+window", "+bundling"]
    assert {rows[n]["layout"] for n in rows} == {"bundled", "unbundled"}
    naive, full = rows["naive"], rows["+bundling"]
    record = report["record_bytes"]
    assert naive["ffn_bytes_per_token"] == 2 * 512 * record  # every neuron, every token
    assert rows["hybrid"]["ffn_bytes_per_token"] < naive["ffn_bytes_per_token"]
    assert full["ffn_bytes_per_token"] < naive["ffn_bytes_per_token"]
    # (not below hybrid: with records this small the reader reads through most gaps)
    # the unbundled configurations read three records per neuron, the bundled one
    assert rows["+window"]["reads_per_token"] > full["reads_per_token"]
    assert all(r["limit_ms_per_token"] > 0 and r["io_ms_per_token"] > 0 for r in rows.values())
    assert report["trace"]["density"][1] == pytest.approx(report["trace"]["density"][0], rel=0.15)
    text = format_dense_synthetic(report)
    assert "FFN-only harness" in text and "paper" in text and "2196" in text


def test_dense_synthetic_bench_honours_the_flash_flags(tiny_dense, tmp_path, monkeypatch, capsys):
    """Every flash flag given on the bench's command line (here --no-lookahead and --threads)
    reaches the 7B harness's runtime, and the report says the look-ahead was off."""
    from mlx_flash import bench, dense_bench

    drifting_trace(n_ids=128, layers=2, tokens=40).save(tmp_path / "src.npz")
    opened = []
    real = dense_bench.open_dense
    monkeypatch.setattr(
        dense_bench, "open_dense", lambda *a, **k: (opened.append(a[2]), real(*a, **k))[1]
    )
    trace = str(tmp_path / "src.npz")
    base = ["--synthetic", "tiny", "--synthetic-dir", str(tmp_path), "--trace", trace,
            "--configs", "5", "--tokens", "8", "--warmup", "4"]  # fmt: skip
    probe = {"created": "now", "path": str(tmp_path)}
    for flags in ([], ["--no-lookahead", "--threads", "3"]):
        assert bench.run_moe(bench.build_parser().parse_args(base + flags), probe) == 0
        assert ("look-ahead off" in capsys.readouterr().out) == bool(flags)
    assert [(o.lookahead, o.threads) for o in opened] == [(True, None), (False, 3)]
