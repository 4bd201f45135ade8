"""Mixture-of-experts streaming: the flash model computes what plain mlx-lm computes, bit for bit,
with its experts in preallocated slots that never move; damaged stores are refused naming the
file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from test_reliability import _membudget, _subprocess_env, membudget_scripts

import mlx_flash
from conftest import MEMBUDGET, convert_quietly, copy_of
from mlx_flash.convert.verify import verify
from mlx_flash.rebuild import load_dense
from mlx_flash.runtime.errors import BudgetError, FlashFormatError
from mlx_flash.runtime.expert_policy import LRU, LFUAged
from mlx_flash.runtime.manifest import (
    EXPERT_LINEARS,
    EXPERT_PARAMS,
    MANIFEST_FILE,
    STORE_FILE,
    read_manifest,
)
from mlx_flash.runtime.trace import Trace, load_trace
from tiny_moe import CONFIGS, REQUIRED, TOP_K, build_moe, save_tiny_moe

PROMPT = [[int(t) for t in np.random.default_rng(0).integers(0, 255, 40)]]
# decode inputs fed to both models (greedy tiny models repeat themselves and stop evicting)
DECODE = [11, 200, 37, 90, 150, 66, 240, 5]
CASES = [(arch, variant) for arch in REQUIRED for variant in ("f32", "q4")] + [
    ("gpt_oss", "mxfp4"),
    ("deepseek_v2", "f32"),
    ("glm4_moe", "f32"),
]


@pytest.fixture(scope="session")
def tiny_moe_flash(tmp_path_factory):
    """``tiny_moe_flash(arch, variant)`` -> (mlx-lm source dir, flash dir), made once."""
    root = tmp_path_factory.mktemp("tiny-moe")
    made = {}

    def get(arch: str, variant: str = "f32"):
        key = f"{arch}-{variant}"
        if key not in made:
            src = save_tiny_moe(arch, root / key, variant)
            made[key] = (src, convert_quietly(src, root / f"{key}-flash"))
        return made[key]

    return get


def _logits(model, prompt=PROMPT, decode=DECODE) -> list[np.ndarray]:
    """Prompt logits, then one step per ``decode`` token through a KV cache."""
    cache = make_prompt_cache(model)
    out = [np.array(model(mx.array(prompt), cache=cache))]
    for token in decode:
        step = mx.array([[token]] * len(prompt))
        out.append(np.array(model(step, cache=cache)))
    return out


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def _reference(src):
    model, _ = mlx_lm.load(str(src))
    model.set_dtype(mx.float32)
    return model


@pytest.mark.parametrize("share", [1.0, 0.25])
@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_flash_logits_equal_mlx_lm(arch, variant, share, tiny_moe_flash):
    src, flash = tiny_moe_flash(arch, variant)
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=share)
    assert model.flash.plan.expert_slots == round(8 * share)
    got = _logits(model)
    diff = _max_diff(got, _logits(_reference(src)))
    # the same weights through the same kernels, in the same groups: bit-identical on the CPU
    assert diff == 0.0 if mx.default_device() == mx.cpu else diff <= 1e-4
    if variant != "f32":  # and the dequantized weights
        diff_dequantized = _max_diff(got, _logits(load_dense(flash)[0]))
        assert diff_dequantized <= 1e-4
    decode = [p for p in model.flash.telemetry.passes if p.phase == "decode"]
    evicting = sum(p.total.dropped > 0 for p in decode)
    dequantized = "" if variant == "f32" else f", vs dequantized {diff_dequantized:.1e}"
    print(
        f"\n{arch} {variant} slots {model.flash.plan.expert_slots}/8: max |diff| {diff:.1e}"
        f"{dequantized}; decode tokens evicting {evicting}/{len(decode)}, evictions "
        f"{sum(p.total.dropped for p in model.flash.telemetry.passes)}"
    )
    if share == 1.0:
        assert all(p.total.dropped == 0 for p in model.flash.telemetry.passes)
    else:  # two slots of eight, two experts per token: tokens evict as routing moves on
        assert evicting >= len(decode) // 2, [p.total.dropped for p in decode]
    model.flash.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_batch_decode_takes_the_union_and_chunks_when_it_exceeds_the_slots(arch, tiny_moe_flash):
    """Two sequences decoding together need up to four experts per layer with two slots: the
    layer computes in chunks (the unsorted path, under 64 pairs), exactly."""
    src, flash = tiny_moe_flash(arch, "q4")
    prompts = PROMPT + [[int(t) for t in np.random.default_rng(1).integers(0, 255, 40)]]
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.25)
    got = _logits(model, prompts)
    assert _max_diff(got, _logits(_reference(src), prompts)) <= (
        0.0 if mx.default_device() == mx.cpu else 1e-4
    )
    decode = [p for p in model.flash.telemetry.passes if p.phase == "decode"]
    assert max(layer.requested for p in decode for layer in p.layers) > TOP_K


def _bound(layer) -> dict[str, tuple[int, int]]:
    """Identity and data pointer of every slot array bound into a layer's SwitchGLU."""
    out = {}
    for linear in EXPERT_LINEARS:
        module = getattr(layer.switch, linear)
        for param in EXPERT_PARAMS:
            if param in module:
                a = module[param]
                out[f"{linear}.{param}"] = (id(a), np.array(a, copy=False).ctypes.data)
    return out


def test_slots_keep_identity_and_peak_memory_stays_flat_over_1000_evictions(tiny_moe_flash):
    src, flash = tiny_moe_flash("qwen3_moe", "q4")
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.25)
    layer = model.flash.layers[0]
    plain = _reference(src).model.layers[0].mlp.switch_mlp
    before = _bound(layer)
    rng = np.random.default_rng(0)
    x = mx.random.normal((1, 1, 64), key=mx.random.key(0))

    def calls(n: int) -> None:
        for _ in range(n):
            ids = mx.array(rng.choice(8, (1, 1, TOP_K), replace=False).astype(np.uint32))
            assert mx.array_equal(layer(x, ids), plain(x, ids)).item()

    calls(50)
    mx.reset_peak_memory()
    calls(50)
    warm = mx.get_peak_memory()
    dropped = sum(p.total.dropped for p in model.flash.telemetry.passes)
    while sum(p.total.dropped for p in model.flash.telemetry.passes) < dropped + 1000:
        calls(50)
    assert mx.get_peak_memory() == warm
    assert _bound(layer) == before


def test_mlx_memory_stays_within_the_plan(tiny_moe_flash):
    """MLX's peak, from before the load to the last token, within the plan (which counts the
    expert slots)."""
    _, flash = tiny_moe_flash("mixtral", "f32")
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model, tokenizer = mlx_flash.load(flash, "1.4MB", max_context=128, prefill_step_size=64)
    plan = model.flash.plan
    assert 2 <= plan.expert_slots < 8 and plan.buffers == plan.expert_slots * plan.slot_bytes
    mlx_lm.generate(model, tokenizer, "hello " * 12, max_tokens=40, prefill_step_size=64)
    assert mx.get_peak_memory() - base <= plan.used, plan.describe()
    with pytest.raises(BudgetError, match="expert slots"):
        mlx_flash.load(flash, "1.1MB", max_context=128, prefill_step_size=64)


def test_routing_trace_records_each_tokens_experts(tiny_moe_flash, tmp_path):
    _, flash = tiny_moe_flash("olmoe", "f32")
    path = tmp_path / "routing.npz"
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5, record_trace=str(path))
    _logits(model)
    model.flash.close()
    trace = load_trace(path)
    assert (trace.kind, trace.n_ids, trace.n_layers) == ("experts", 8, 2)
    assert trace.tokens == len(PROMPT[0]) + len(DECODE)
    assert all(trace.at(t, layer).size == TOP_K for t in range(trace.tokens) for layer in (0, 1))
    used = sum(p.total.requested for p in model.flash.telemetry.passes if p.phase == "decode")
    decoded = range(len(PROMPT[0]), trace.tokens)
    assert used == sum(trace.at(t, layer).size for t in decoded for layer in (0, 1))


def test_trace_files_round_trip_and_damaged_ones_are_refused(tmp_path):
    rows = [np.array([3, 1]), np.array([0]), np.array([], dtype=np.int64), np.array([5, 4, 2])]
    trace = Trace.from_rows("neurons", 6, 2, rows, {"source": "test"})
    trace.save(tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz")
    assert back.tokens == 2 and back.meta == {"source": "test"}
    assert back.at(0, 0).tolist() == [1, 3] and back.at(1, 1).tolist() == [2, 4, 5]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FlashFormatError, match="bad.npz"):
        load_trace(tmp_path / "bad.npz")
    np.savez(tmp_path / "wrong.npz", format=np.array("mlx_flash-trace"), version=np.array(1))
    with pytest.raises(FlashFormatError, match="wrong.npz: damaged"):
        load_trace(tmp_path / "wrong.npz")


def test_lru_and_aged_lfu_choose_their_victims():
    lru, lfu = LRU(8), LFUAged(8, half_life=2.0)
    for policy in (lru, lfu):
        for _ in range(6):  # expert 0 is used often but long ago, 1 once, recently
            policy.touch(np.array([0]), np.array([1]))
        policy.touch(np.array([1]), np.array([1]))
        for _ in range(3):
            policy.touch(np.array([2]), np.array([1]))
    candidates = np.array([0, 1])
    assert lru.victims(candidates, 1).tolist() == [0]  # least recent
    assert lfu.victims(candidates, 1).tolist() == [1]  # six old uses outweigh one newer one
    for _ in range(20):  # ageing: after enough quiet calls the old uses no longer count
        lfu.touch(np.array([2]), np.array([1]))
    lfu.touch(np.array([1]), np.array([1]))
    assert lfu.victims(candidates, 1).tolist() == [0]


def _edit_manifest(directory, edit) -> None:
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_truncated_expert_record_is_refused_naming_the_store(tiny_moe_flash, tmp_path):
    directory = copy_of(tiny_moe_flash("qwen3_moe", "q4")[1], tmp_path)
    store = directory / STORE_FILE
    store.write_bytes(store.read_bytes()[:-100])  # the last expert's record loses its tail
    with pytest.raises(FlashFormatError, match=f"{store}.*(truncated|manifest says)"):
        mlx_flash.load(directory)
    assert any(str(store) in p for p in verify(directory, progress=False))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["moe"].update(n_experts=7), "has 8 records, expected n_experts=7"),
        (lambda m: m["moe"]["layers"].pop(), "moe.layers has 1 entries for 2 store layers"),
        (
            lambda m: m["moe"]["layers"][0]["shapes"].update({"up_proj.weight": [64, 16]}),
            "record part 'up_proj.weight'",
        ),
        (lambda m: m["moe"].update(top_k=0), "top_k 0"),
    ],
)
def test_wrong_manifest_counts_are_refused_naming_the_manifest(
    edit, message, tiny_moe_flash, tmp_path
):
    directory = copy_of(tiny_moe_flash("qwen3_moe", "q4")[1], tmp_path)
    _edit_manifest(directory, edit)
    with pytest.raises(FlashFormatError, match=f"{directory / MANIFEST_FILE}: .*{message}"):
        mlx_flash.load(directory)
    with pytest.raises(FlashFormatError, match=MANIFEST_FILE):
        verify(directory, progress=False)


def test_config_that_disagrees_with_the_store_is_refused_naming_it(tiny_moe_flash, tmp_path):
    directory = copy_of(tiny_moe_flash("mixtral", "f32")[1], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_local_experts": 16}))
    with pytest.raises(FlashFormatError, match="config.json: the experts at .* store"):
        mlx_flash.load(directory)


def test_version_1_dense_stores_still_load(tiny_flash, tmp_path):
    directory = copy_of(tiny_flash("llama")[1], tmp_path)
    _edit_manifest(directory, lambda m: (m.update(format_version=1), m.pop("moe")))
    model, _ = mlx_flash.load(directory, "1GB")
    assert model.flash.manifest.format_version == 1 and model.flash.manifest.moe is None
    want, _ = mlx_flash.load(tiny_flash("llama")[1], "1GB")
    assert _max_diff(_logits(model, decode=[]), _logits(want, decode=[])) == 0.0


def test_every_moe_architecture_converts(tmp_path):
    """The two extra architectures that share DeepSeek's expert block convert and load too."""
    for arch in sorted(set(CONFIGS) - set(REQUIRED)):
        src = save_tiny_moe(arch, tmp_path / arch)
        model, _ = mlx_flash.load(convert_quietly(src, tmp_path / f"{arch}-flash"), "1GB")
        assert model.flash.manifest.moe.layers[0].layer == 1  # after the dense first layer


def _cli(*args: str, module: str = "mlx_flash.generate") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *module.split(), *args],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=300,
    )


def test_generate_and_mlx_lm_generate_run_a_moe_directory(tiny_moe_flash, tmp_path):
    _, flash = tiny_moe_flash("qwen2_moe", "q4")
    prompt = ["--prompt", "hello experts", "--max-tokens", "12"]
    stats = tmp_path / "stats.json"
    done = _cli("--model", str(flash), *prompt, "--ffn-cache", "0.25", "--stats-json", str(stats))
    assert done.returncode == 0, done.stderr
    assert "Experts per token, all MoE layers: used" in done.stdout
    s = json.loads(stats.read_text())
    assert s["memory_budget"]["expert_slots"] == 2 and s["selector"] == "router"
    assert s["experts_used_per_token"] >= TOP_K and 0 <= s["expert_hit_rate"] <= 1
    assert s["experts_loaded_per_token"] > 0 and s["flash_bytes_per_token"] > 0
    plain = _cli("--model", str(flash), *prompt, "--verbose", "False")
    stock = _cli("--model", str(flash), "--trust-remote-code", *prompt, module="mlx_lm generate")
    assert plain.returncode == stock.returncode == 0, stock.stderr
    assert plain.stdout.strip() and plain.stdout.strip() in stock.stdout


def test_evaluate_on_a_moe_directory_matches_its_dense_perplexity(tiny_moe_flash, tmp_path):
    from mlx_flash.evaluate import evaluate

    _, flash = tiny_moe_flash("olmoe", "q4")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    result = evaluate(flash, text, seq_len=32, max_windows=2, progress=False, ffn_cache=0.25)
    assert result["selector"] == "router" and result["tokens"] == 2 * 31
    assert result["perplexity"] == pytest.approx(result["dense_perplexity"], rel=1e-5)
    assert 0 < result["fraction_loaded"] < result["fraction_used"] == pytest.approx(TOP_K / 8)


@pytest.fixture
def tiny_shape(monkeypatch):
    """A synthetic shape small enough for the fast suite: 2 MoE layers of 8 experts, top-2."""
    from mlx_flash import synthetic

    monkeypatch.setitem(synthetic.SHAPES, "tiny", synthetic.Shape("qwen3_moe", 2, 8, 2, 64, 64))
    return synthetic.SHAPES["tiny"]


def _synthetic_args(tmp_path, **kw):
    import argparse

    values = dict(synthetic="tiny", synthetic_dir=tmp_path, routing="uniform,skewed", trace=None,
                  shares="0.25,0.5", policies="lru,lfu", warmup=64, tokens=256, repeat=1,
                  page_cache_rows=True, move_rows=True)  # fmt: skip
    return argparse.Namespace(**{**values, **kw})


def test_synthetic_bench_runs_the_runtime_on_routing_traces(tiny_shape, tmp_path):
    from mlx_flash.moe_bench import format_synthetic, run_synthetic

    report = run_synthetic(_synthetic_args(tmp_path), {"threads": 3}, progress=False)
    assert {r["threads"] for r in report["rows"]} == {3}  # the flash flags given reach the runtime
    store = tmp_path / "tiny" / STORE_FILE
    assert store.stat().st_size == report["model"]["store_bytes"]  # records + layer alignment
    assert 0 <= store.stat().st_size - tiny_shape.store_bytes < 4096 * tiny_shape.layers
    rows = {(r["routing"], r["share"], r["policy"], r["cache_mode"], r["slot_update"]): r
            for r in report["rows"]}  # fmt: skip
    assert len(rows) == 8 + 2 + 2
    for share in (0.25, 0.5):  # uniform: every policy hits about as often as experts are resident
        for policy in ("lru", "lfu"):
            uniform = rows["uniform", share, policy, "dontcache", "in place"]
            assert abs(uniform["hit_rate"] - share) < 0.08, uniform["hit_rate"]
            skewed = rows["skewed", share, policy, "dontcache", "in place"]
            assert skewed["hit_rate"] > uniform["hit_rate"] + 0.1
            assert skewed["mb_per_token"] < uniform["mb_per_token"]
    assert rows["uniform", 0.25, "lru", "cached", "in place"]["tokens_per_s"] > 0
    assert "FFN-only harness" in format_synthetic(report)
    trace_file = tmp_path / "tiny" / "routing-skewed.npz"
    trace = load_trace(trace_file)
    assert (trace.n_layers, trace.n_ids, trace.tokens) == (2, 8, 64 + 256)
    replayed = run_synthetic(
        _synthetic_args(tmp_path, trace=trace_file, shares="0.25",
                        policies="lru", page_cache_rows=False, move_rows=False),
        {}, progress=False,
    )  # fmt: skip
    assert (
        replayed["rows"][0]["hit_rate"]
        == rows["skewed", 0.25, "lru", "dontcache", "in place"]["hit_rate"]
    )
    with pytest.raises(FlashFormatError, match="routing-skewed.npz: a trace of 320 tokens"):
        run_synthetic(_synthetic_args(tmp_path, trace=trace_file, tokens=300), {}, progress=False)


def test_synthetic_store_refuses_a_disk_too_small_and_says_what_fits(
    tiny_shape, tmp_path, monkeypatch
):
    import shutil

    from mlx_flash import synthetic
    from mlx_flash.runtime.errors import FlashError

    full = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(synthetic.shutil, "disk_usage", lambda _: full._replace(free=1 << 29))
    with pytest.raises(FlashError, match="needs .* free disk.*largest that fits"):
        synthetic.synthetic_store("tiny", tmp_path, progress=False)
    assert not (tmp_path / "tiny").exists()


def test_bench_on_a_moe_directory_compares_the_policies(tiny_moe_flash, tmp_path, monkeypatch):
    _, flash = tiny_moe_flash("mixtral", "q4")
    # the bench saves the probe it makes: in a cache of this test's own, not the run's, whose
    # later tests plan with the default cost model
    monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    done = _cli("--model", str(flash), "--ffn-cache", "0.25", "--tokens", "8", "--json", str(out),
                module="mlx_flash.bench")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["configs"]] == ["lru", "lfu"]
    assert all(r["same_tokens_as_in_memory"] for r in report["configs"])
    assert report["in_memory"]["ffn_bytes_per_token"] == 0


# mlx-lm model type -> GGUF architecture (llama.cpp writes Mixtral as llama with experts)
GGUF_ARCHS = {
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "olmoe": "olmoe",
    "mixtral": "llama",
}


def _expert_metadata(config: dict):
    """llama.cpp's expert keys for ``config``."""

    def add(writer) -> None:
        writer.add_expert_count(8)
        writer.add_expert_used_count(TOP_K)
        if "moe_intermediate_size" in config:
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in config:
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])

    return add


@pytest.mark.parametrize("arch", sorted(GGUF_ARCHS))
def test_moe_gguf_converts_and_streams_the_model_it_was_written_from(arch, tmp_path):
    from mlx.utils import tree_flatten
    from test_gguf_source import write_like_llama_cpp

    from mlx_flash.convert.gguf_source import open_gguf
    from mlx_flash.convert.moe import convert_moe
    from mlx_flash.tiny import write_tiny_tokenizer

    model, config = build_moe(arch)
    path = tmp_path / "m.gguf"
    write_like_llama_cpp(path, GGUF_ARCHS[arch], model, config, metadata=_expert_metadata(config))
    source = open_gguf(path)
    assert source.config["model_type"] == arch
    assert source.tensors.keys() == dict(tree_flatten(model.parameters())).keys()
    source.write_tokenizer = write_tiny_tokenizer  # the test file has none
    flash = convert_moe(
        source, tmp_path / "flash", dtype=None, quantize=None, align=0, force=False,
        settings=None, progress=False, log=lambda *_: None,
    )  # fmt: skip
    streamed, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.25)
    assert _max_diff(_logits(streamed), _logits(model)) <= 1e-4


# about 1.6 GB of float32 experts: 4 MoE layers of 64 experts, d_model 512, expert width 1024
BIG = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    head_dim=64,
    num_experts=64,
    moe_intermediate_size=1024,
    num_experts_per_tok=8,
)


@pytest.mark.slow
@pytest.mark.skipif(
    not (MEMBUDGET.exists() and hasattr(os, "geteuid") and os.geteuid() == 0),
    reason="needs ../shared/tools/membudget and root (memory cgroups)",
)
def test_moe_bigger_than_its_cgroup_generates_the_unconstrained_text(tmp_path):
    """A random qwen3_moe with 1.6 GB of experts, in a memory cgroup (page cache counted) below
    its expert bytes: its plan plus the process's own slack. It generates plain mlx-lm's greedy
    text on the same weights, with MLX's peak within the plan."""
    src = save_tiny_moe("qwen3_moe", tmp_path / "src", **BIG)
    flash = convert_quietly(src, tmp_path / "flash")
    experts = read_manifest(flash).ffn_bytes()
    budget, slack = 400_000_000, 350 << 20
    expected = membudget_scripts(tmp_path, flash)  # plain mlx-lm, no limit
    limit = budget + slack
    assert experts > 1e9 and limit < experts
    rc, run, peak = _membudget(str(limit), tmp_path / "flash.py", str(flash), str(budget))
    assert rc == 0 and run is not None, rc
    print(
        f"experts {experts / 1e9:.2f} GB; membudget {limit / 2**20:.0f} MiB: cgroup peak "
        f"{peak / 2**20:.0f} MiB, MLX peak {run['mlx_peak'] / 2**20:.1f} MiB (plan "
        f"{run['plan_used'] / 2**20:.1f} MiB), max RSS {run['maxrss'] / 2**20:.0f} MiB"
    )
    assert run["text"] == expected["text"]
    assert run["mlx_peak"] <= run["plan_used"]
