"""Streaming runtime: the flash model computes what plain mlx-lm computes and streams as it says."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import batch_generate
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash
from conftest import convert_quietly
from mlx_flash.rebuild import dense_ffn_weights, load_dense
from mlx_flash.runtime.errors import BudgetError
from mlx_flash.runtime.ffn import partial_output
from mlx_flash.runtime.selectors import FixedSelector
from tiny_models import CONFIGS, save_tiny_model

PROMPT = [[3, 17, 42, 99, 7, 120, 5, 64]]


def _logits(model, steps: int = 4) -> np.ndarray:
    """Prompt logits, then ``steps`` greedy decode steps through a KV cache, stacked."""
    cache = make_prompt_cache(model)
    out = [model(mx.array(PROMPT), cache=cache)[0]]
    token = mx.argmax(out[-1][-1])
    for _ in range(steps):
        out.append(model(token.reshape(1, 1), cache=cache)[0])
        token = mx.argmax(out[-1][-1])
    return np.concatenate([np.array(o) for o in out])


@pytest.mark.parametrize("share", [1.0, 1 / 3])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_dense_selector_matches_mlx_lm(arch, share, tiny_flash):
    src, flash = tiny_flash(arch)
    reference, _ = mlx_lm.load(str(src))
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=share, pin_share=0.0)
    plan = model.flash.plan
    assert (plan.window_rows == 0) == (share == 1.0)
    np.testing.assert_allclose(_logits(model), _logits(reference), atol=1e-4, rtol=0)
    decode = [p for p in model.flash.telemetry.passes if p.phase == "decode"]
    if share < 1:  # a third of the FFN in the buffer: every token deletes and appends
        assert all(p.total.loaded > 0 and p.total.dropped > 0 for p in decode)
    else:
        assert all(p.total.loaded == 0 for p in decode)


def test_dense_streaming_reads_what_memory_cannot_hold_once_per_token(tiny_flash):
    """By default dense streaming pins what leaves two chunks of the window's size: after the
    first token each layer reads exactly the neurons the buffers cannot hold, in one call. Half
    pinned reads more, in more calls."""
    _, flash = tiny_flash("llama")

    def decode_reads(**options):
        model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.6, selector="dense", **options)
        _logits(model, steps=6)
        plan = model.flash.plan
        warm = [p for p in model.flash.telemetry.passes if p.phase == "decode"][1:]
        loaded = {s.loaded for p in warm for s in p.layers}
        calls = {s.read.calls for p in warm for s in p.layers}
        return plan, loaded, calls

    plan, loaded, calls = decode_reads()
    rows = plan.pinned_rows + plan.window_rows
    assert plan.pinned_rows == 2 * rows - plan.d_ffn > 0
    assert loaded == {plan.d_ffn - rows} and calls == {1}
    half, loaded_half, calls_half = decode_reads(pin_share=0.5)
    assert half.pinned_rows + half.window_rows == rows
    assert min(loaded_half) >= plan.d_ffn - rows and max(loaded_half) > plan.d_ffn - rows
    assert max(calls_half) > 1


def test_no_record_is_read_at_load(tiny_flash):
    model, _ = mlx_flash.load(tiny_flash("llama")[1], "1GB", ffn_cache=0.5)
    assert model.flash.reader.totals.bytes == 0
    model(mx.array(PROMPT))
    assert model.flash.reader.totals.bytes > 0


def test_greedy_generation_matches_mlx_lm(tiny_flash):
    src, flash = tiny_flash("qwen2")
    reference, tok = mlx_lm.load(str(src))
    model, flash_tok = mlx_flash.load(flash, "1GB", ffn_cache=0.4, pin_share=0.5)
    expected = mlx_lm.generate(reference, tok, "hello world", max_tokens=12)
    assert mlx_lm.generate(model, flash_tok, "hello world", max_tokens=12) == expected
    summary = model.flash.telemetry.summary()
    assert summary["tokens"] >= 12 and summary["flash_bytes_per_token"] > 0


def test_batched_generation_matches_mlx_lm(tiny_flash):
    src, flash = tiny_flash("llama")
    reference, tok = mlx_lm.load(str(src))
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5, pin_share=0.0)
    prompts = [tok.encode("abc"), tok.encode("a longer prompt here")]
    expected = batch_generate(reference, tok, prompts, max_tokens=6).texts
    assert batch_generate(model, tok, prompts, max_tokens=6).texts == expected
    assert any(p.tokens == 2 and p.phase == "decode" for p in model.flash.telemetry.passes)


def _layer0_rows_output(flash, x: mx.array, ids: np.ndarray) -> np.ndarray:
    """Layer 0's FFN (a tiny llama) computed from the rebuilt weights of the neurons ``ids``."""
    weights, take = dense_ffn_weights(flash), mx.array(ids)
    rows = {
        "gate": weights["model.layers.0.mlp.gate_proj.weight"][take],
        "up": weights["model.layers.0.mlp.up_proj.weight"][take],
        "down": weights["model.layers.0.mlp.down_proj.weight"].T[take],
    }
    flat = x.reshape(-1, x.shape[-1])
    return np.array(partial_output(flat, rows, "silu", True, None).reshape(x.shape))


def test_injected_selection_computes_the_window(tiny_flash):
    """With window k, the FFN multiplies exactly the union of the last k selections."""
    _, flash = tiny_flash("llama")
    choices = [np.arange(0, 40), np.arange(20, 60), np.arange(100, 110)]
    calls = []

    def choose(layer, x):
        if layer == 0:
            calls.append(1)
        return choices[(len(calls) - 1) % 3]

    model, _ = mlx_flash.load(
        flash, "1GB", ffn_cache=1.0, pin_share=0.0, selector=FixedSelector(choose), window=2
    )
    # full buffer: all rows go through the window (nothing pinned) only if the plan leaves a window
    # everything pinned: selection cannot change the result
    assert model.flash.plan.window_rows == 0
    model, _ = mlx_flash.load(
        flash, "1GB", ffn_cache=0.9, pin_share=0.0, selector=FixedSelector(choose), window=2
    )
    ffn = model.layers[0].mlp
    x = mx.random.normal((1, 1, 64))
    for expected_rows in [
        choices[0],
        np.union1d(choices[0], choices[1]),
        np.union1d(choices[1], choices[2]),
    ]:
        y = ffn(x)
        buf = ffn.buffer
        assert sorted(buf.neurons.tolist()) == expected_rows.tolist()
        np.testing.assert_allclose(y, _layer0_rows_output(flash, x, expected_rows), atol=1e-5)
    stats = model.flash.telemetry.passes
    assert [p.total.loaded for p in stats] == [40, 20, 10]  # only neurons not buffered are read
    assert [p.total.dropped for p in stats] == [0, 0, 20]  # 0..19 left the 2-token window


def test_budget_below_trunk_is_refused_with_the_need(tiny_flash):
    with pytest.raises(BudgetError, match="needs at least"):
        mlx_flash.load(tiny_flash("llama")[1], "100KB")


def test_prompt_cache_reuse_across_calls(tiny_flash):
    src, flash = tiny_flash("gemma")
    reference, tok = mlx_lm.load(str(src))
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5, pin_share=0.25)
    texts = []
    for m in (reference, model):
        cache = make_prompt_cache(m)
        first = "".join(
            r.text for r in mlx_lm.stream_generate(m, tok, "one", max_tokens=4, prompt_cache=cache)
        )
        second = "".join(
            r.text for r in mlx_lm.stream_generate(m, tok, " two", max_tokens=4, prompt_cache=cache)
        )
        texts.append((first, second))
    assert texts[0] == texts[1]


def test_float16_store_matches_mlx_lm_within_tolerance(tmp_path):
    """float16 weights computed in float16: same logits as mlx-lm's float16 model within 2e-2."""
    src, _ = save_tiny_model("qwen3", tmp_path / "src", dtype=mx.float16)
    flash = convert_quietly(src, tmp_path / "flash")
    reference, _ = mlx_lm.load(str(src))
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=1 / 3, pin_share=0.0, compute_dtype="float16")
    assert model.flash.compute_dtype == mx.float16
    np.testing.assert_allclose(_logits(model), _logits(reference), atol=2e-2, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_store_runs_quantized_and_matches_its_dequantized_weights(bits, tmp_path):
    src, _ = save_tiny_model("llama", tmp_path / "src")
    flash = convert_quietly(src, tmp_path / "flash", quantize=True, q_bits=bits, q_group_size=32)
    dense, _ = load_dense(flash)
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5, pin_share=0.5)
    buffers = model.flash.layers[0].buffer.arrays()
    assert buffers["gate"].dtype == mx.uint32  # kept packed, multiplied with mx.quantized_matmul
    np.testing.assert_allclose(_logits(model), _logits(dense), atol=1e-4, rtol=0)


def test_quantized_trunk_stays_packed_and_the_plan_counts_what_it_holds(tmp_path):
    """--quantize quantizes the trunk too: on the CPU (computing in float32) its weights stay
    packed and their scales keep the stored float16, so the resident trunk is as small as the
    mlx-lm 4-bit model's; the plan's trunk is exactly the bytes held."""
    src, _ = save_tiny_model("qwen2", tmp_path / "src", dtype=mx.float16)
    flash = convert_quietly(src, tmp_path / "flash", quantize=True, q_group_size=32)
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5, pin_share=0.5)
    attention = model.layers[0].self_attn.q_proj
    assert isinstance(attention, nn.QuantizedLinear) and attention.weight.dtype == mx.uint32
    assert attention.scales.dtype == mx.float16 and model.flash.compute_dtype == mx.float32
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    held = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    assert model.flash.plan.trunk == held
    stored = sum(f.stat().st_size for f in flash.glob("model*.safetensors"))
    assert held < stored  # the files' headers are the difference: nothing was widened
    dense, _ = load_dense(flash)
    np.testing.assert_allclose(_logits(model), _logits(dense), atol=1e-3, rtol=0)


def _fixed_model(flash, ids: np.ndarray, **options):
    return mlx_flash.load(
        flash,
        "1GB",
        ffn_cache=0.5,
        pin_share=0.0,
        selector=FixedSelector(lambda *_: ids),
        **options,
    )[0]


def test_short_multi_token_calls_compute_the_union_of_their_selections(tiny_flash):
    """A verify step (speculative decoding: 2-16 tokens per sequence) selects like a decode step:
    it reads only what the union of its tokens' selections lacks, not the whole FFN (the prefill
    of a longer prompt still streams every neuron)."""
    _, flash = tiny_flash("llama")
    ids = np.arange(10, 50)
    model = _fixed_model(flash, ids)
    ffn = model.layers[0].mlp
    x = mx.random.normal((1, 5, 64))
    y = ffn(x)
    verify = model.flash.telemetry.passes[-1]
    assert verify.phase == "verify" and verify.tokens == 5
    assert verify.layers[0].loaded == ids.size and verify.layers[0].requested == ids.size
    np.testing.assert_allclose(y, _layer0_rows_output(flash, x, ids), atol=1e-5)
    ffn(mx.random.normal((1, 17, 64)))
    prompt = model.flash.telemetry.passes[-1]
    assert prompt.phase == "prefill" and prompt.layers[0].requested == 128


def test_a_union_whose_reads_cost_the_whole_ffn_computes_the_exact_ffn(tiny_flash):
    """Every other neuron and the last: the reader would read through the one-record gaps, so the
    union's reads cost what streaming the FFN does, and the call computes the exact FFN; the
    next call's window owes nothing to it."""
    _, flash = tiny_flash("llama")
    model = _fixed_model(flash, np.r_[np.arange(0, 128, 2), 127])
    ffn = model.layers[0].mlp
    x = mx.random.normal((1, 3, 64))
    y = ffn(x)
    assert model.flash.telemetry.passes[-1].layers[0].requested == 128
    dense, _ = load_dense(flash)
    np.testing.assert_allclose(np.array(y), np.array(dense.layers[0].mlp(x)), atol=1e-5)


def test_the_same_short_prompt_gives_the_same_result_whatever_ran_before(tiny_flash):
    """A short prompt (or a verify step) restarts the window from its own tokens: what an
    earlier generation left buffered is not computed."""
    _, flash = tiny_flash("llama")
    chosen = {0: np.arange(0, 40), 1: np.arange(60, 100)}

    def choose(layer, x):  # rows depend on the input, as a real selector's do
        return chosen[int(np.array(x).sum() > 0)]

    model = mlx_flash.load(
        flash, "1GB", ffn_cache=0.9, pin_share=0.0, selector=FixedSelector(choose), window=4
    )[0]
    ffn, x = model.layers[0].mlp, mx.ones((1, 4, 64))
    first = np.array(ffn(x))
    ffn(-mx.ones((1, 1, 64)))  # a decode step that buffers other neurons
    np.testing.assert_allclose(np.array(ffn(x)), first, atol=1e-6)
    np.testing.assert_allclose(first, _layer0_rows_output(flash, x, chosen[1]), atol=1e-5)


@pytest.mark.parametrize("draft_tokens", [2, 4])
def test_speculative_decoding_with_the_dense_selector_equals_greedy_decoding(
    draft_tokens, tiny_flash, tmp_path
):
    """mlx-lm's speculative decoding on a flash model: verify steps of 2-5 tokens, cache trims
    after rejected drafts (a different random model drafts), the same text as plain greedy
    decoding, and a verify step reads what one decode step does."""
    src, flash = tiny_flash("qwen2")
    prompt = "hello world, a prompt longer than sixteen tokens"
    model, tok = mlx_flash.load(flash, "1GB", ffn_cache=0.4, selector="dense")
    plain = mlx_lm.generate(model, tok, prompt, max_tokens=24)
    decode = [p.total.read.bytes for p in model.flash.telemetry.passes if p.phase == "decode"]
    other, _ = save_tiny_model("qwen2", tmp_path / "other", seed=1)
    drafted = {}
    for draft_dir in (src, other):
        model.flash.telemetry.reset()
        draft, _ = mlx_lm.load(str(draft_dir))
        responses = list(
            mlx_lm.stream_generate(
                model, tok, prompt, 24, draft_model=draft, num_draft_tokens=draft_tokens
            )
        )
        assert "".join(r.text for r in responses) == plain
        drafted[draft_dir] = sum(r.from_draft for r in responses)
        verify = [p for p in model.flash.telemetry.passes if p.phase == "verify"]
        assert verify and {p.tokens for p in verify} <= set(range(2, draft_tokens + 2))
        assert max(p.total.read.bytes for p in verify) <= max(decode)
    assert drafted[src] >= 24 * draft_tokens // (draft_tokens + 1) - 1 > drafted[other]
