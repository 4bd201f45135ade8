"""``mlx_flash.evaluate`` computes what the streaming runtime does; dense equals plain mlx-lm."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash
from conftest import RELU2_DIR, WIKITEXT, convert_quietly
from mlx_flash.evaluate import evaluate, main
from mlx_flash.textdata import text_windows

SHORT = {"seq_len": 24, "max_windows": 2, "progress": False}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "wiki.txt"
    path.write_text("".join(WIKITEXT.read_text().splitlines(keepends=True)[:40]))
    return path


def test_dense_perplexity_equals_plain_mlx_lm(relu2_calibrated, text):
    result = evaluate(relu2_calibrated, text, selector="dense", **SHORT)
    reference, tokenizer = mlx_lm.load(str(RELU2_DIR))
    windows = mx.array(text_windows(tokenizer, text, 24, 2))
    losses = nn.losses.cross_entropy(reference(windows[:, :-1]), windows[:, 1:], reduction="none")
    expected = math.exp(losses.mean().item())
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert result["dense_perplexity"] == pytest.approx(expected, rel=1e-4)
    assert result["fraction_used"] == 1.0 and result["recall"] == 1.0
    assert result["tokens"] == 2 * 23


def test_evaluate_reports_what_the_runtime_computes(relu2_calibrated, text):
    options = dict(selector="predictor", window=2, ffn_cache=0.95, pin_share=0.0)
    result = evaluate(relu2_calibrated, text, **options, **SHORT)
    model, tokenizer = mlx_flash.load(relu2_calibrated, **options)
    losses = []
    for window in text_windows(tokenizer, text, 24, 2):
        cache = make_prompt_cache(model)
        for t in range(23):
            logits = model(mx.array(window[t : t + 1])[None], cache=cache)[0, -1]
            losses.append(nn.losses.cross_entropy(logits, mx.array(window[t + 1])).item())
    summary = model.flash.telemetry.summary()
    assert result["perplexity"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-6)
    for key in ("fraction_used", "fraction_loaded", "fraction_computed"):
        assert result[key] == pytest.approx(summary[key], rel=1e-9)
    assert result["selector"] == "predictor" and result["sparsity"] is None
    assert result["fraction_loaded"] < result["fraction_used"] < result["fraction_computed"] < 1
    assert (
        0.5 < result["recall"] <= 1
        and result["fraction_truly_active"] < result["fraction_predicted"]
    )
    # natural zeros, a good predictor: close to dense
    assert abs(result["perplexity_change"]) < 0.05


def test_cli_writes_json(relu2_calibrated, text, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert (
        main(
            [
                "--model",
                str(relu2_calibrated),
                "--data",
                str(text),
                "--selector",
                "predictor",
                "--seq-len",
                "16",
                "--max-windows",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert len(result["per_layer"]["recall"]) == 8 and result["window"] == 4
    assert result["selector_reason"] == "asked for" and result["measured_quality_loss"] < 0.02
    out = capsys.readouterr().out
    assert "perplexity" in out and "Selector: predictor, measured loss" in out


def test_cli_reports_a_missing_predictor(relu2_flash, text, capsys):
    assert main(["--model", str(relu2_flash), "--data", str(text), "--selector", "predictor"]) == 1
    assert "no trained predictors" in capsys.readouterr().err


@pytest.mark.slow
def test_relu2_meets_the_papers_bounds_on_wikitext_test(tmp_path):
    """The paper's bounds on relu2-8m with the default conversion (built-in calibration sample),
    on text it was not trained on (WikiText-2 *test*): recall >= 0.95, predicted at most 2x the
    truly active share, perplexity within 2% of dense, and with k=4 at most a third of the used
    neurons loaded per token (the measured values: README, Sparsity)."""
    out = convert_quietly(RELU2_DIR, tmp_path / "flash", calibration="builtin")
    result = evaluate(
        out, WIKITEXT, selector="predictor", window=4, seq_len=256, max_windows=4, progress=False
    )
    assert result["recall"] >= 0.95
    assert result["fraction_predicted"] <= 2 * result["fraction_truly_active"]
    assert abs(result["perplexity_change"]) <= 0.02
    assert result["loaded_per_used"] <= 1 / 3
    # natural sparsity: most neurons are exact zeros
    assert 0.6 < 1 - result["fraction_truly_active"] < 0.95
