"""Co-activation placement (convert/placement.py): the order it finds, the reads it plans, and the
store calibration rewrites with it: on a real model, and exactly for every record format."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import mlx_flash
from conftest import QUIET, convert_quietly, copy_of
from mlx_flash.convert.calibrate import calibrate
from mlx_flash.convert.placement import (
    MIN_GAIN,
    PLACED_STORE_FILE,
    apply_placement,
    read_cost,
    spectral_order,
    window_misses,
)
from mlx_flash.convert.verify import verify
from mlx_flash.rebuild import dense_ffn_weights
from mlx_flash.runtime.costmodel import CostModel
from mlx_flash.runtime.manifest import STORE_FILE, read_manifest
from tiny_models import save_tiny_model


def _latent_activity(rng, tokens: int, n: int, width: int):
    """Neurons with a hidden place on a line; each token activates those within ``width`` of a
    random point, so neurons active together are near each other in the hidden order only."""
    hidden = rng.permutation(n)  # neuron i sits at hidden[i]
    centres = rng.integers(0, n, tokens)
    return np.abs(hidden[None, :] - centres[:, None]) < width, hidden


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def test_spectral_order_recovers_the_hidden_neighbourhoods():
    rng = np.random.default_rng(0)
    active, hidden = _latent_activity(rng, tokens=400, n=300, width=12)
    position = np.argsort(spectral_order(active))  # neuron -> its place
    assert abs(_rank_correlation(position, hidden)) > 0.95
    by_hidden = position[np.argsort(hidden)]  # places of hidden neighbours, in hidden order
    assert np.median(np.abs(np.diff(by_hidden))) <= 6  # within a token's 23 neurons
    assert np.median(np.abs(np.diff(np.argsort(hidden)))) > 50  # as stored: about n / 3 apart
    assert sorted(spectral_order(active)) == list(range(300))  # a permutation


def test_spectral_order_is_the_fiedler_order_of_the_neuron_graph():
    """The tokens x tokens shortcut gives the order the neurons x neurons Laplacian gives."""
    rng = np.random.default_rng(1)
    active, _ = _latent_activity(rng, tokens=150, n=80, width=6)
    active[:, 5] = False  # never active: goes last
    a = active.astype(np.float64)
    co = a.T @ a
    degree = co.sum(1)
    used = degree > 0
    scale = 1 / np.sqrt(degree[used])
    laplacian = np.eye(used.sum()) - scale[:, None] * co[np.ix_(used, used)] * scale[None, :]
    fiedler = np.linalg.eigh(laplacian)[1][:, 1]
    order = spectral_order(active)
    assert order[-1] == 5
    direct = np.flatnonzero(used)[np.argsort(fiedler)]
    assert abs(_rank_correlation(np.argsort(order[:-1]), np.argsort(direct))) > 0.999


def test_window_misses_are_what_the_window_does_not_hold():
    active = np.zeros((4, 6), bool)
    active[0, [0, 1]] = True
    active[1, [1, 2]] = True
    active[2, [0, 3]] = True
    active[3, [0, 1, 5]] = True
    misses = window_misses(active, window=1)
    assert [m.tolist() for m in misses] == [[0, 1], [2], [0, 3], [1, 5]]
    assert [m.tolist() for m in window_misses(active, window=2)] == [[0, 1], [2], [3], [5]]
    assert [m.tolist() for m in window_misses(active, window=0)][2] == [0, 3]


def test_read_cost_counts_the_runs_the_reader_plans():
    cost = CostModel.defaults()
    record, threads = 4096, 8
    misses = [np.array([0, 10, 20, 30]), np.array([5])]
    scattered = read_cost(misses, np.arange(40) * 50, cost, record, threads, 0)  # far apart
    assert scattered.reads == 5 and scattered.nbytes == 5 * record
    together = np.arange(40)
    together[[0, 10, 20, 30]] = [100, 101, 102, 103]  # the four side by side
    placed = read_cost(misses, together, cost, record, threads, 0)
    assert placed.reads == 2 and placed.nbytes == 5 * record
    assert placed.seconds < scattered.seconds
    # one record apart: read through only where the reader reads a record-sized gap through
    neighbours, spaced = [np.arange(4)], np.arange(40) * 2
    assert read_cost(neighbours, spaced, cost, record, threads, 0).reads == 4
    through = read_cost(neighbours, spaced, cost, record, threads, record)
    assert through.reads == 1 and through.nbytes == 7 * record


@pytest.fixture(scope="module")
def relu2_unplaced(relu2_flash, tmp_path_factory):
    """relu2-8m calibrated as ``relu2_calibrated`` is, with placement off."""
    directory = copy_of(relu2_flash, tmp_path_factory.mktemp("relu2-unplaced"))
    calibrate(directory, max_tokens=2048, held_tokens=2048, seq_len=128, placement=False, **QUIET)
    return directory


def _greedy(directory, prompt, tokens: int, **options):
    """The prompt's last logits, the greedy text and the decode telemetry of a fresh load."""
    model, tokenizer = mlx_flash.load(directory, **options)
    logits = model(mx.array([tokenizer.encode(prompt)]))[0, -1]
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=tokens)
    stats = model.flash.telemetry.summary()
    model.flash.close()
    return np.array(logits.astype(mx.float32)), text, stats


def test_calibration_places_relu2_neurons_and_the_model_is_unchanged(
    relu2_flash, relu2_calibrated, relu2_unplaced
):
    """relu2-8m's neurons fire in co-active groups: calibration measures the placement to save
    read time, rewrites the store in its order (a consistent directory that verifies), and the
    model computes what it did."""
    m = read_manifest(relu2_calibrated)
    info = m.extra["placement"]
    assert info["gain"] >= MIN_GAIN
    assert info["placed_reads_per_token"] < info["stored_reads_per_token"]
    assert m.store_file == PLACED_STORE_FILE
    assert not (relu2_calibrated / STORE_FILE).exists()
    assert verify(relu2_calibrated) == []
    assert "calibration" in m.extra and "predictor" in m.extra  # saved after the rewrite
    unplaced = read_manifest(relu2_unplaced)
    assert "placement" not in unplaced.extra and unplaced.store_file == STORE_FILE

    prompt = "Once upon a time there was a little girl who"
    dense_before, text_before, _ = _greedy(relu2_flash, prompt, 12, selector="dense")
    dense_after, text_after, _ = _greedy(relu2_calibrated, prompt, 12, selector="dense")
    np.testing.assert_allclose(dense_after, dense_before, atol=2e-4)
    assert text_after == text_before


def test_placement_cuts_the_reads_of_a_real_run(relu2_calibrated, relu2_unplaced, monkeypatch):
    """The runtime's own reads (predictor, half of each FFN buffered) fall on the placed store
    where the reader reads short gaps through: one that cannot advise the kernel, as on macOS (an
    advising one reads only adjacent records together, and the placed order saves it little)."""
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    prompt = "The little dog ran to the park because"
    reads = {}
    for name, directory in (("placed", relu2_calibrated), ("stored", relu2_unplaced)):
        _, _, stats = _greedy(directory, prompt, 32, selector="predictor", ffn_cache=0.5)
        reads[name] = stats["reads_per_token"]
    assert reads["placed"] < 0.9 * reads["stored"], json.dumps(reads)


def test_recalibrating_a_placed_store_keeps_one_store(relu2_calibrated, tmp_path):
    directory = copy_of(relu2_calibrated, tmp_path)
    calibrate(directory, max_tokens=1024, held_tokens=0, seq_len=128, **QUIET)
    m = read_manifest(directory)
    stores = sorted(p.name for p in directory.glob("ffn_store*"))
    assert stores == [m.store_file]
    assert verify(directory) == []


@pytest.mark.parametrize(
    "options",
    [
        dict(dtype="float16"),
        dict(quantize=True, q_bits=4, q_group_size=32),
        dict(layout="unbundled"),
    ],
    ids=["float16", "4-bit", "unbundled"],
)
def test_a_placed_store_is_the_same_model_in_another_order(options, tmp_path):
    """Any order, any record format: each neuron's gate and up rows and down column move
    together, so the rebuilt weights are the old ones permuted and the model computes the same."""
    src, _ = save_tiny_model("llama", tmp_path / "src")
    directory = convert_quietly(src, tmp_path / "flash", **options)
    m = read_manifest(directory)
    before = {k: np.array(v) for k, v in dense_ffn_weights(directory).items()}
    logits_before, text_before, _ = _greedy(directory, "hello world", 8, selector="dense")
    orders = [np.random.default_rng(i).permutation(m.d_ffn) for i in range(m.n_layers)]
    placed = apply_placement(directory, m, orders, {"gain": 0.5}, progress=False, log=print)
    assert placed.store_file == PLACED_STORE_FILE and verify(directory) == []
    assert placed.extra["placement"] == {"gain": 0.5}
    after = {k: np.array(v) for k, v in dense_ffn_weights(directory).items()}
    for name, weight in before.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        moved = weight[:, orders[layer]] if "down_proj" in name else weight[orders[layer]]
        np.testing.assert_array_equal(after[name], moved)
    logits_after, text_after, _ = _greedy(directory, "hello world", 8, selector="dense")
    np.testing.assert_allclose(logits_after, logits_before, atol=1e-4)
    assert text_after == text_before
