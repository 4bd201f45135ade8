"""Sparsity: selectors, calibration statistics, predictor training, and their use by the runtime."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import mlx_flash
from conftest import convert_quietly
from mlx_flash.convert.__main__ import main as convert_main
from mlx_flash.convert.calibrate import builtin_text_path
from mlx_flash.convert.predictor import auto_ranks, choose_cut, score_predictor, train_predictor
from mlx_flash.rebuild import dense_ffn_weights
from mlx_flash.runtime.calibration import (
    LEVELS,
    Calibration,
    Predictors,
    read_calibration,
    read_predictors,
)
from mlx_flash.runtime.errors import BudgetError, FlashError
from mlx_flash.runtime.ffn import partial_output
from mlx_flash.runtime.manifest import read_manifest
from mlx_flash.runtime.selectors import DenseSelector, GateSelector, PredictorSelector
from tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A few thousand characters of the built-in sample: enough windows for the byte-level tiny
    models."""
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(builtin_text_path().read_text()[:6000])
    return path


@pytest.fixture(scope="module")
def llama_calibrated(tmp_path_factory, tiny_text):
    """A tiny gated (SwiGLU) model converted with calibration at sparsity 0.5 and predictors of
    rank 16."""
    root = tmp_path_factory.mktemp("llama")
    src, _ = save_tiny_model("llama", root / "src")
    return convert_quietly(src, root / "flash", calibration=tiny_text, predictor_rank=16)


# -- selectors on hand-made activations ------------------------------------------------------------


def test_gate_selector_selects_the_union_of_exact_gates_above_threshold():
    # neuron i reads x[i]; neuron 3 reads nothing
    gate = mx.array(np.eye(4, 3, dtype=np.float32) * np.array([1.0, 2.0, 3.0]))
    sel = GateSelector([{"gate": gate}], "relu", None, thresholds=[1.5])
    x = mx.array([[1.0, 1.0, -5.0], [0.0, 0.0, 0.6]])  # relu(gate): [1, 2, 0, 0] and [0, 0, 1.8, 0]
    selection = sel(0, x)
    np.testing.assert_allclose(np.array(selection.gate), [[1, 2, 0, 0], [0, 0, 1.8, 0]], rtol=1e-6)
    assert selection.ids.tolist() == [1, 2]
    assert sel(0, x[:1]).ids.tolist() == [1]
    assert sel.nbytes == 4 * 3 * 4 and sel.exact_gate


def test_gate_selector_thresholds_magnitude_for_signed_activations():
    gate = mx.array(np.eye(3, dtype=np.float32))
    sel = GateSelector([{"gate": gate}], "silu", None, thresholds=[0.2])
    x = mx.array([[-0.5, -20.0, 1.0]])  # silu: -0.19, -4e-8, 0.73
    assert sel(0, x).ids.tolist() == [2]
    lower = GateSelector([{"gate": gate}], "silu", None, thresholds=[0.15])
    assert lower(0, x).ids.tolist() == [0, 2]


def test_predictor_selector_applies_each_layers_cut():
    w_in = mx.array(np.eye(2, dtype=np.float32))
    w_out = mx.array([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
    bias = mx.zeros((3,))
    predictors = Predictors([w_in, w_in], [w_out, w_out], [bias, bias], cut=[0.5, -10.0])
    sel = PredictorSelector(predictors)
    x = mx.array([[1.0, 0.2]])  # logits [1, 0.2, 0.8]
    assert sel(0, x).ids.tolist() == [0, 2]
    assert sel(1, x).ids.tolist() == [0, 1, 2]
    assert sel(0, mx.array([[1.0, 0.2], [0.0, 3.0]])).ids.tolist() == [0, 1, 2]  # union over tokens
    assert DenseSelector(5)(0, x).ids.tolist() == list(range(5))


def test_thresholds_come_from_the_quantiles():
    magnitude = np.tile(LEVELS * 10, (2, 1)).astype(np.float32)  # quantile at level q is 10 q
    calibration = Calibration(np.zeros((2, 4)), magnitude, magnitude / 10, np.zeros(2), 0.5, 100)
    assert calibration.threshold(1, 0.3) == pytest.approx(3.0)
    assert calibration.threshold(0, 0.7, of="gate") == pytest.approx(0.7)
    assert calibration.threshold(0, None) == 0.0  # natural zeros
    with pytest.raises(ValueError):
        calibration.threshold(0, 1.0)


# -- predictor training ----------------------------------------------------------------------------


def _synthetic(n: int, up: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n, up.shape[1])).astype(np.float32)
    return x, (x @ up.T) > 2.0  # a third to two fifths of the neurons active per token


@pytest.mark.parametrize("start", ["principal", "random"])
def test_predictor_training_reaches_high_recall_on_a_synthetic_problem(start):
    rng = np.random.default_rng(0)
    # a full-rank ReLU layer: the principal start finds its dominant directions
    if start == "principal":
        up = (rng.normal(size=(256, 48)) * np.geomspace(2, 0.02, 48)).astype(np.float32)
    else:  # a truly low-rank problem, from scratch
        up = (rng.normal(size=(256, 8)) @ rng.normal(size=(8, 48)) / 2).astype(np.float32)
    x, active = _synthetic(6000, up, 1)
    weights = train_predictor(x, active, 16, up=up if start == "principal" else None, epochs=8)
    cut = choose_cut(weights, *_synthetic(1000, up, 2), margin=1.3)
    quality = score_predictor(weights, cut, *_synthetic(2000, up, 3))
    assert quality["recall"] >= 0.95
    assert quality["predicted"] <= 2 * quality["active"]


def test_auto_ranks_grow_for_the_last_layers(relu2_calibrated):
    manifest = read_manifest(relu2_calibrated)
    assert auto_ranks(manifest) == [64] * 7 + [128] == manifest.extra["predictor"]["ranks"]


# -- calibration in the converter ------------------------------------------------------------------


def test_relu2_calibration_records_natural_sparsity(relu2_calibrated):
    manifest = read_manifest(relu2_calibrated)
    calibration = read_calibration(relu2_calibrated, manifest)
    assert calibration.sparsity is None and calibration.tokens == 2048
    assert calibration.frequency.shape == (8, 1024)
    # the model's natural sparsity: most activations are exact zeros
    assert np.all(calibration.zero_fraction > 0.6)
    assert np.all(np.diff(calibration.magnitude, axis=1) >= 0)
    active = calibration.frequency.mean(1)
    # active means h != 0 here
    np.testing.assert_allclose(active, 1 - calibration.zero_fraction, atol=0.05)
    meta = manifest.extra["predictor"]
    assert min(meta["recall"]) >= 0.9 and len(meta["precision"]) == 8
    assert read_predictors(relu2_calibrated, manifest).ranks == meta["ranks"]


def test_calibrated_gated_model_has_gate_quantiles_and_target(llama_calibrated):
    manifest = read_manifest(llama_calibrated)
    calibration = read_calibration(llama_calibrated, manifest)
    assert calibration.sparsity == 0.5 and calibration.gate is not None
    assert manifest.extra["predictor"]["ranks"] == [16, 16]
    # at the target sparsity about half the neurons are active on calibration text
    assert calibration.frequency.mean() == pytest.approx(0.5, abs=0.05)


def test_convert_cli_calibration_flags(tmp_path, tiny_text):
    src, _ = save_tiny_model("nemotron", tmp_path / "src")
    assert convert_main([str(src), str(tmp_path / "none"), "--no-calibration"]) == 0
    assert "calibration" not in read_manifest(tmp_path / "none").extra
    assert (
        convert_main(
            [
                str(src),
                str(tmp_path / "cal"),
                "--calibration",
                str(tiny_text),
                "--sparsity",
                "0.6",
                "--predictor-rank",
                "8",
            ]
        )
        == 0
    )
    extra = read_manifest(tmp_path / "cal").extra
    assert extra["calibration"]["sparsity"] == 0.6 and extra["predictor"]["ranks"] == [8, 8]
    assert (
        json.loads((tmp_path / "cal" / "flash_manifest.json").read_text())["extra"]["calibration"][
            "text"
        ]
        == "sample.txt"
    )


# -- the runtime -----------------------------------------------------------------------------------


def test_auto_picks_the_best_available_selector(llama_calibrated, relu2_calibrated, tmp_path):
    src, _ = save_tiny_model("llama", tmp_path / "src")
    plain = convert_quietly(src, tmp_path / "plain")
    assert mlx_flash.load(plain, "1GB")[0].flash.selector.name == "dense"
    assert mlx_flash.load(relu2_calibrated, "1GB")[0].flash.selector.name == "predictor"
    # gated: the exact gate wins
    assert mlx_flash.load(llama_calibrated, "1GB")[0].flash.selector.name == "gate"
    assert mlx_flash.load(llama_calibrated, "1GB", sparsity=0.7)[0].flash.selector.name == "gate"
    assert (
        mlx_flash.load(llama_calibrated, "1GB", selector="predictor")[0].flash.selector.name
        == "predictor"
    )
    # predictors were trained for 0.5: another target is refused
    with pytest.raises(FlashError, match="trained for sparsity 0.5"):
        mlx_flash.load(llama_calibrated, "1GB", selector="predictor", sparsity=0.7)
    with pytest.raises(FlashError, match="gated FFN"):
        mlx_flash.load(relu2_calibrated, "1GB", selector="gate")
    with pytest.raises(FlashError, match="calibration"):
        mlx_flash.load(plain, "1GB", selector="gate")


def _smallest_budget(directory, selector: str) -> int:
    """The smallest memory budget (to 1 KiB) that ``selector`` loads under."""
    lo, hi = 1, 1 << 30
    while hi - lo > 1024:
        mid = (lo + hi) // 2
        try:
            mlx_flash.load(directory, mid, selector=selector)[0].flash.close()
            hi = mid
        except BudgetError:
            lo = mid
    return hi


def test_auto_passes_over_the_gate_when_its_rows_do_not_fit(llama_calibrated):
    """A model bigger than memory cannot keep a third of its FFN in DRAM: auto streams with the
    predictor."""
    gate, predictor = (
        _smallest_budget(llama_calibrated, "gate"),
        _smallest_budget(llama_calibrated, "predictor"),
    )
    assert predictor < gate
    between = (predictor + gate) // 2
    with pytest.raises(BudgetError):
        mlx_flash.load(llama_calibrated, between, selector="gate")
    assert mlx_flash.load(llama_calibrated, between)[0].flash.selector.name == "predictor"
    assert mlx_flash.load(llama_calibrated, gate)[0].flash.selector.name == "gate"


def test_pinned_neurons_are_the_most_frequently_active(relu2_calibrated):
    model, _ = mlx_flash.load(relu2_calibrated, "1GB", ffn_cache=0.5, pin_share=0.5)
    frequency = read_calibration(relu2_calibrated, read_manifest(relu2_calibrated)).frequency
    for i, layer in enumerate(model.flash.layers):
        pinned = layer.pinned_ids
        assert pinned.size == model.flash.plan.pinned_rows
        assert frequency[i][pinned].min() >= np.sort(frequency[i])[-pinned.size]


def test_budget_counts_the_selector_and_gate_buffers_drop_the_gate(llama_calibrated):
    manifest = read_manifest(llama_calibrated)
    gate = mlx_flash.load(llama_calibrated, "1GB", selector="gate", ffn_cache=0.5)[0].flash
    dense = mlx_flash.load(llama_calibrated, "1GB", selector="dense", ffn_cache=0.5)[0].flash
    predictor = mlx_flash.load(llama_calibrated, "1GB", selector="predictor", ffn_cache=0.5)[
        0
    ].flash
    assert gate.plan.selector == manifest.n_layers * manifest.d_ffn * manifest.d_model * 4
    assert gate.plan.neuron_bytes == 2 * dense.plan.neuron_bytes // 3  # up + down, no gate row
    assert dense.plan.selector == 0
    assert predictor.plan.selector == predictor.selector.nbytes > 0


@pytest.mark.parametrize("compute_rows", ["selected", "resident"])
def test_gate_selector_ffn_uses_the_exact_gate_on_the_rows_it_computes(
    llama_calibrated, compute_rows
):
    model, _ = mlx_flash.load(
        llama_calibrated,
        "1GB",
        selector="gate",
        ffn_cache=0.9,
        pin_share=0.0,
        window=2,
        compute_rows=compute_rows,
    )
    weights = dense_ffn_weights(llama_calibrated)
    gate_w = weights["model.layers.0.mlp.gate_proj.weight"]
    rows = {
        "gate": gate_w,
        "up": weights["model.layers.0.mlp.up_proj.weight"],
        "down": weights["model.layers.0.mlp.down_proj.weight"].T,
    }
    ffn, selector = model.layers[0].mlp, model.flash.selector
    mx.random.seed(3)
    history = []
    for _ in range(3):
        # the scale of this model's FFN inputs: about half the neurons pass
        x = 0.2 * mx.random.normal((1, 1, 64))
        selected = selector(0, x.reshape(1, 64)).ids
        history.append(selected)
        expected = (
            selected
            if compute_rows == "selected"
            else np.union1d(history[-1], history[-2] if len(history) > 1 else [])
        )
        take = mx.array(expected.astype(np.int64))
        manual = partial_output(
            x.reshape(1, 64), {k: v[take] for k, v in rows.items()}, "silu", True, None
        )
        np.testing.assert_allclose(np.array(ffn(x)).reshape(1, 64), np.array(manual), atol=1e-5)
        assert 0 < expected.size <= ffn.buffer.capacity  # the window's union fits: no streaming


def test_relu2_predictor_decodes_like_dense(relu2_calibrated):
    """Natural zeros + a good predictor: greedy text equals the dense runtime's, at a fraction of
    the loads."""
    texts, used = {}, {}
    for selector in ("dense", "predictor"):
        model, tok = mlx_flash.load(
            relu2_calibrated, "1GB", selector=selector, ffn_cache=0.9, pin_share=0.0
        )
        texts[selector] = mlx_lm.generate(
            model, tok, "It is a truth universally acknowledged", max_tokens=12
        )
        used[selector] = model.flash.telemetry.summary()["fraction_used"]
    assert texts["predictor"] == texts["dense"]
    assert used["predictor"] < 0.4 * used["dense"]
