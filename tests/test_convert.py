"""Converter: round trips of every architecture, dtypes, layouts, quantization, safety, --verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model, save_config, save_model

import mlx_flash
from conftest import MEMBUDGET, convert_quietly
from mlx_flash.convert.converter import FAIL_AT_ENV
from mlx_flash.convert.verify import verify
from mlx_flash.rebuild import dense_ffn_weights
from mlx_flash.runtime.adapters import ARCHITECTURES, MOE_ARCHITECTURES, REFUSED
from mlx_flash.runtime.errors import FlashError, UnsupportedModelError
from mlx_flash.runtime.manifest import MANIFEST_FILE, read_manifest
from tiny_models import CONFIGS, build_model, has_untied_head, save_tiny_model


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _trunk(out: Path) -> dict[str, mx.array]:
    weights = {}
    for f in out.glob("model*.safetensors"):
        weights.update(mx.load(str(f)))
    return weights


def test_every_architecture_is_tested():
    assert set(CONFIGS) == set(ARCHITECTURES) - {"gemma3"}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_round_trip_float32_is_exact(arch, tmp_path):
    src, source = save_tiny_model(arch, tmp_path / "src")
    model = build_model(arch)[0]
    if hasattr(model, "sanitize"):  # what mlx-lm loads (baichuan_m1 normalizes its head's rows)
        source = model.sanitize(dict(source))
    out = convert_quietly(src, tmp_path / "flash")
    ffn = dense_ffn_weights(out)
    trunk = _trunk(out)
    assert set(ffn) | set(trunk) == set(source) and not set(ffn) & set(trunk)
    for name, value in ffn.items():
        np.testing.assert_array_equal(_np(value), _np(source[name]), err_msg=name)
    for name, value in trunk.items():
        np.testing.assert_array_equal(_np(value), _np(source[name]), err_msg=name)
    assert verify(out, progress=False) == []


TIEABLE = sorted(  # architectures whose output head is tied or not, as mlx-lm decides
    arch
    # mlx-lm cannot tie these: minicpm's sanitize always adds a head, baichuan_m1 always calls one
    for arch in set(CONFIGS) - {"minicpm", "baichuan_m1"}
    if has_untied_head(build_model(arch, tied=True)[0])
    != has_untied_head(build_model(arch, tied=False)[0])
)


@pytest.mark.parametrize("arch", TIEABLE)
def test_tied_head_converts_and_matches_mlx_lm(arch, tmp_path):
    """A directory without the head's weights (tied), as real Gemma 3 checkpoints are."""
    src, source = save_tiny_model(arch, tmp_path / "src", tied=True)
    assert "lm_head.weight" not in source
    out = convert_quietly(src, tmp_path / "flash")
    reference, _ = mlx_lm.load(str(src))
    model, _ = mlx_flash.load(out, "1GB", ffn_cache=0.5, pin_share=0.0)
    tokens = mx.array([[1, 5, 9, 200, 3, 7]])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(reference(tokens)), atol=1e-4)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
def test_round_trip_half_precision_and_layouts(dtype, layout, tmp_path):
    src, source = save_tiny_model("phi", tmp_path / "src", dtype=dtype)  # biases and GELU
    out = convert_quietly(
        src, tmp_path / "flash", layout=layout, align=4096 if layout == "unbundled" else 0
    )
    manifest = read_manifest(out)
    assert manifest.dtype == {mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]
    assert len(manifest.layers[0].regions) == (1 if layout == "bundled" else 2)
    if layout == "unbundled":
        assert all(r.record_stride == 4096 for r in manifest.layers[0].regions)
    for name, value in dense_ffn_weights(out).items():
        np.testing.assert_array_equal(_np(value), _np(source[name]), err_msg=name)


def test_bundled_record_holds_the_whole_neuron(tmp_path):
    src, source = save_tiny_model("llama", tmp_path / "src")
    out = convert_quietly(src, tmp_path / "flash")
    manifest = read_manifest(out)
    region = manifest.layers[1].regions[0]
    assert [p.name for p in region.parts] == ["gate", "up", "down"]
    raw = np.fromfile(out / manifest.store_file, dtype=np.uint8)
    record = raw[region.offset + 5 * region.record_stride :][: region.record_size].view(np.float32)
    d = manifest.d_model
    np.testing.assert_array_equal(record[:d], _np(source["model.layers.1.mlp.gate_proj.weight"])[5])
    np.testing.assert_array_equal(
        record[d : 2 * d], _np(source["model.layers.1.mlp.up_proj.weight"])[5]
    )
    np.testing.assert_array_equal(
        record[2 * d :], _np(source["model.layers.1.mlp.down_proj.weight"])[:, 5]
    )
    assert not list(out.glob("ffn*.safetensors")) and (out / "ffn_store.bin").is_file()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_store_matches_mlx_quantization(bits, tmp_path):
    src, source = save_tiny_model("qwen3", tmp_path / "src")
    out = convert_quietly(src, tmp_path / "flash", quantize=True, q_bits=bits, q_group_size=32)
    manifest = read_manifest(out)
    assert manifest.quantization.bits == bits
    assert manifest.neuron_bytes() == 3 * (64 * bits // 8 + 2 * (64 // 32) * 4)
    for name, value in dense_ffn_weights(out).items():
        w = source[name] if "down_proj" not in name else source[name].T
        expected = mx.dequantize(
            *mx.quantize(w, group_size=32, bits=bits), group_size=32, bits=bits
        )
        expected = expected if "down_proj" not in name else expected.T
        np.testing.assert_allclose(_np(value), _np(expected), atol=1e-6, err_msg=name)
        step = (_np(source[name]).max() - _np(source[name]).min()) / (2**bits - 1)
        assert np.abs(_np(value) - _np(source[name])).max() <= step


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])  # a tied head; a head of its own
def test_quantize_quantizes_the_trunk_as_mlx_lm_convert_does(arch, tmp_path):
    """--quantize: every trunk tensor bit-identical to ``mlx_lm.convert -q``'s, the same config
    entry, and the whole model within 2% of its size (the FFN store groups down columns along
    d_model, mlx-lm along d_ffn)."""
    from mlx_lm.convert import convert as mlx_lm_convert

    src, _ = save_tiny_model(arch, tmp_path / "src", dtype=mx.float16)
    reference = tmp_path / "mlx-q4"
    mlx_lm_convert(str(src), str(reference), quantize=True, q_group_size=32, q_bits=4)
    out = convert_quietly(src, tmp_path / "flash", quantize=True, q_group_size=32)
    ours, theirs = _trunk(out), _trunk(reference)
    assert ours and set(ours) < set(theirs)
    assert all(".mlp." in name for name in set(theirs) - set(ours))
    for name, value in ours.items():
        assert value.dtype == theirs[name].dtype, name
        np.testing.assert_array_equal(np.array(value), np.array(theirs[name]), err_msg=name)
    config, expected = (json.loads((d / "config.json").read_text()) for d in (out, reference))
    four_bit = {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["quantization"] == expected["quantization"] == four_bit
    assert config["quantization_config"] == expected["quantization_config"]
    size = sum(f.stat().st_size for f in [*out.glob("model*.safetensors"), out / "ffn_store.bin"])
    mlx_size = sum(f.stat().st_size for f in reference.glob("model*.safetensors"))
    assert abs(size / mlx_size - 1) < 0.02, (size, mlx_size)


def test_quantized_source_stays_quantized(tmp_path):
    model, config = build_model("llama")
    model, config = quantize_model(model, config, group_size=64, bits=4)
    src = tmp_path / "src"
    save_model(src, model)
    save_config(config, src / "config.json")
    out = convert_quietly(src, tmp_path / "flash")
    manifest = read_manifest(out)
    assert manifest.quantization.bits == 4 and manifest.quantization.group_size == 64
    params = dict(tree_flatten(model.parameters()))
    from mlx_flash.runtime.store import StoreReader

    with StoreReader(out, manifest, threads=1) as reader:
        parts = {k: mx.array(v) for k, v in reader.read_layer(0).items()}
    # gate/up rows are the source's packed words, untouched; down was re-quantized along d_model
    np.testing.assert_array_equal(
        np.array(parts["gate"]), np.array(params["model.layers.0.mlp.gate_proj.weight"])
    )
    np.testing.assert_array_equal(
        np.array(parts["up"]), np.array(params["model.layers.0.mlp.up_proj.weight"])
    )
    assert parts["gate"].dtype == mx.uint32 and parts["down"].shape == parts["up"].shape
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_refuses_existing_output_and_force_replaces(tmp_path):
    src, _ = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "flash"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FlashError, match="--force"):
        convert_quietly(src, out)
    assert (out / "precious.txt").read_text() == "keep me"
    convert_quietly(src, out, force=True)
    assert (out / MANIFEST_FILE).is_file() and not (out / "precious.txt").exists()


@pytest.mark.parametrize("step", ["layer:0", "trunk", "finalize"])
def test_interrupted_conversion_leaves_nothing_behind(step, tmp_path, monkeypatch):
    src, _ = save_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "flash"
    monkeypatch.setenv(FAIL_AT_ENV, step)
    with pytest.raises(KeyboardInterrupt):
        convert_quietly(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    monkeypatch.delenv(FAIL_AT_ENV)
    convert_quietly(src, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setenv(FAIL_AT_ENV, step)
    with pytest.raises(KeyboardInterrupt):
        convert_quietly(src, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flash", "src"]


def test_verify_names_the_damaged_layer(tmp_path):
    src, _ = save_tiny_model("llama", tmp_path / "src")
    out = convert_quietly(src, tmp_path / "flash")
    manifest = read_manifest(out)
    store = out / manifest.store_file
    data = bytearray(store.read_bytes())
    data[manifest.layers[1].offset + 1000] ^= 0x01
    store.write_bytes(bytes(data))
    problems = verify(out, progress=False)
    assert len(problems) == 1 and "layer 1 is damaged" in problems[0] and str(store) in problems[0]


def test_unsupported_architecture_lists_supported(tmp_path):
    src, _ = save_tiny_model("llama", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "mamba"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"'mamba' is not supported \(no FFN.*llama"):
        convert_quietly(src, tmp_path / "flash")


def test_every_mlx_lm_family_is_supported_or_refused_with_a_reason():
    """A family mlx-lm adds shows up here, to be added to the adapter table or refused."""
    import mlx_lm.models

    helpers = {"activations", "base", "bitlinear_layers", "cache", "gated_delta", "mla", "pipeline"}
    helpers |= {"rope_utils", "ssm", "switch_layers"}
    families = {p.stem for p in Path(mlx_lm.models.__path__[0]).glob("*.py")} - helpers
    families.discard("__init__")
    assert families - set(ARCHITECTURES) - set(MOE_ARCHITECTURES) - set(REFUSED) == set()
    assert not set(REFUSED) & (set(ARCHITECTURES) | set(MOE_ARCHITECTURES))


def test_not_enough_disk_is_refused_up_front(tmp_path, monkeypatch):
    src, _ = save_tiny_model("llama", tmp_path / "src")
    import shutil as shutil_module

    monkeypatch.setattr(
        shutil_module,
        "disk_usage",
        lambda _: shutil_module._ntuple_diskusage(1 << 30, 1 << 30, 1000),
    )
    with pytest.raises(FlashError, match="not enough free disk"):
        convert_quietly(src, tmp_path / "flash")
    assert not (tmp_path / "flash").exists()


def test_cli_converts_and_verifies(tmp_path):
    src, _ = save_tiny_model("nemotron", tmp_path / "src")
    out = tmp_path / "flash"

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "mlx_flash.convert", *a],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        )

    done = run(str(src), str(out), "--dtype", "float16")
    assert done.returncode == 0, done.stderr
    assert read_manifest(out).dtype == "float16"
    assert run("--verify", str(out)).returncode == 0
    again = run(str(src), str(out))
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr
    missing = run(str(tmp_path / "nope"), str(tmp_path / "o2"))
    assert (
        missing.returncode == 1 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    )


@pytest.mark.slow
def test_smollm2_float32_converts_in_well_under_its_size(smollm2_gguf, tmp_path):
    """Layer-by-layer conversion: 538 MB of float32 weights written under a 300 MiB cgroup (page
    cache counted), then calibrated under the runtime's 457 MiB."""
    if os.geteuid() != 0 or not MEMBUDGET.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("membudget needs root and ../shared/tools/membudget")
        pytest.skip("membudget needs root and ../shared/tools/membudget")
    out = tmp_path / "flash"
    done = subprocess.run(
        [
            sys.executable,
            str(MEMBUDGET),
            "300M",
            "--",
            sys.executable,
            "-m",
            "mlx_flash.convert",
            str(smollm2_gguf),
            str(out),
            "--dtype",
            "float32",
            "--no-calibration",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exit 0" in done.stderr
    weights = (
        sum(f.stat().st_size for f in out.glob("model*.safetensors"))
        + (out / "ffn_store.bin").stat().st_size
    )
    assert weights > 530e6  # the model really is bigger than the budget
    assert verify(out, progress=False) == []
    # calibration runs the dense model (trunk in DRAM, FFN streamed layer by layer) and trains the
    # predictors under the budget the runtime itself needs (tests/test_reliability.py: 457 MiB)
    done = subprocess.run(
        [
            sys.executable,
            str(MEMBUDGET),
            "457M",
            "--",
            sys.executable,
            "-m",
            "mlx_flash.convert.calibrate",
            str(out),
            "--max-tokens",
            "4096",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "exit 0" in done.stderr, done.stderr[-2000:]
    meta = read_manifest(out).extra
    # a gated model gets the proxy (predictors serve ReLU-family FFNs) and the guard's points
    assert meta["calibration"]["tokens"] == 4096 and "predictor" not in meta
    assert meta["proxy"]["bits"] in (4, 5, 8) and (out / meta["proxy"]["file"]).is_file()
    assert {p["selector"] for p in meta["quality"]["points"]} >= {"proxy"}


def test_export_writes_the_plain_mlx_lm_model(tmp_path):
    """python -m mlx_flash.rebuild FLASH OUT: an mlx-lm directory with the source's weights (the
    way to mlx-lm's twin of a model that exists only as a GGUF)."""
    src, source = save_tiny_model("gemma", tmp_path / "src")
    flash = convert_quietly(src, tmp_path / "flash")
    done = subprocess.run(
        [sys.executable, "-m", "mlx_flash.rebuild", str(flash), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "model_file" not in config and config["torch_dtype"] == "float16"
    model, tokenizer = mlx_lm.load(str(tmp_path / "out"))
    exported = dict(tree_flatten(model.parameters()))
    assert exported.keys() == source.keys()
    for name, value in exported.items():
        assert value.dtype == mx.float16, name
        np.testing.assert_array_equal(_np(value), _np(source[name].astype(mx.float16)), name)
    assert tokenizer.encode("hello") == mlx_lm.load(str(src))[1].encode("hello")
    again = subprocess.run(
        [sys.executable, "-m", "mlx_flash.rebuild", str(flash), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_output_parents_are_created(tmp_path):
    src, _ = save_tiny_model("llama", tmp_path / "src")
    out = convert_quietly(src, tmp_path / "new" / "deeper" / "flash")
    assert (out / MANIFEST_FILE).is_file()
