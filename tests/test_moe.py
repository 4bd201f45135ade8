"""Mixture-of-experts streaming: the flash model computes what plain mlx-lm computes, bit for bit,
with its experts in preallocated slots that never move; damaged stores are refused naming the
file."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash
from conftest import convert_quietly
from mlx_flash.convert.verify import verify
from mlx_flash.rebuild import load_dense
from mlx_flash.runtime.errors import BudgetError, FlashFormatError
from mlx_flash.runtime.expert_policy import LRU, LFUAged
from mlx_flash.runtime.manifest import EXPERT_LINEARS, EXPERT_PARAMS, MANIFEST_FILE, STORE_FILE
from mlx_flash.runtime.trace import Trace, load_trace
from tiny_moe import CONFIGS, REQUIRED, TOP_K, save_tiny_moe

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
    if variant != "f32":
        assert _max_diff(got, _logits(load_dense(flash)[0])) <= 1e-4  # the dequantized weights
    decode = [p for p in model.flash.telemetry.passes if p.phase == "decode"]
    evicting = sum(p.total.dropped > 0 for p in decode)
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
    model, _ = mlx_flash.load(flash, "1GB", ffn_cache=0.5, routing_trace=str(path))
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


def _copy(directory, tmp_path):
    import shutil

    return shutil.copytree(directory, tmp_path / "copy")


def test_truncated_expert_record_is_refused_naming_the_store(tiny_moe_flash, tmp_path):
    directory = _copy(tiny_moe_flash("qwen3_moe", "q4")[1], tmp_path)
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
    directory = _copy(tiny_moe_flash("qwen3_moe", "q4")[1], tmp_path)
    _edit_manifest(directory, edit)
    with pytest.raises(FlashFormatError, match=f"{directory / MANIFEST_FILE}: .*{message}"):
        mlx_flash.load(directory)
    with pytest.raises(FlashFormatError, match=MANIFEST_FILE):
        verify(directory, progress=False)


def test_config_that_disagrees_with_the_store_is_refused_naming_it(tiny_moe_flash, tmp_path):
    directory = _copy(tiny_moe_flash("mixtral", "f32")[1], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_local_experts": 16}))
    with pytest.raises(FlashFormatError, match="config.json: the experts at .* store"):
        mlx_flash.load(directory)


def test_version_1_dense_stores_still_load(tiny_flash, tmp_path):
    directory = _copy(tiny_flash("llama")[1], tmp_path)
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
