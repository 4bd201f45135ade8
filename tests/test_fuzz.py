"""Fuzzing the readers of untrusted headers: only the package's own clear errors may come out.

- the manifest reader (``flash_manifest.json``): random JSON, valid manifests with one field
  replaced or removed, and damaged bytes; a manifest that parses is then used the way the runtime
  uses it (store reader over the real store, every layer read), which must fail cleanly too;
- the trunk header check (``model*.safetensors``): damaged and truncated headers.

The GGUF header reader is fuzzed in test_gguf_source.py. Hypothesis runs derandomized,
without deadline.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_flash.runtime.errors import FlashError, FlashFormatError
from mlx_flash.runtime.manifest import (
    MANIFEST_FILE,
    check_trunk_file,
    parse_manifest,
    read_manifest,
)
from mlx_flash.runtime.store import StoreReader

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def flash(tiny_flash) -> Path:
    """A real flash directory (tiny phi: non-gated, with biases and a down-bias blob), copied before
    being damaged."""
    return tiny_flash("phi")[1]


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=12),
    st.integers(-3, 3),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 63, 64, 128, 4096, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "mlx_flash",
            "float32",
            "float16",
            "bfloat16",
            "uint32",
            "bundled",
            "unbundled",
            "phi",
            "llama",
            "gate",
            "up",
            "down",
            "sha256",
            "md5",
            "no-such-hash",
            "ffn_store.bin",
            "../ffn_store.bin",
            "",
        ]
    ),
)
_json = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a decoded JSON document (the root excluded)."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        out.append(prefix + (key,))
        out += _paths(value, prefix + (key,))
    return out


def _mutate(doc: Any, path: tuple, action: str, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    elif action == "replace":
        parent[path[-1]] = value
    elif (
        action == "nudge"
        and isinstance(parent[path[-1]], int)
        and not isinstance(parent[path[-1]], bool)
    ):
        parent[path[-1]] += value if isinstance(value, int) and not isinstance(value, bool) else 1
    return doc


def _use_like_the_runtime(directory: Path) -> None:
    """What loading and running does with a manifest, minus MLX: open the store, read every layer's
    neurons (all parts, float32 destinations) and blobs, check one layer's digest."""
    manifest = read_manifest(directory)
    with StoreReader(directory, manifest, threads=2) as reader:
        for layer in manifest.layers:
            ids = np.arange(0, manifest.d_ffn, max(1, manifest.d_ffn // 7))[:8]
            dest = {
                p.name: np.zeros(
                    (ids.size, p.length), np.uint32 if p.dtype == "uint32" else np.float32
                )
                for r in layer.regions
                for p in r.parts
            }
            reader.read_neurons(layer.index, ids, dest, np.arange(ids.size))
            for name in layer.blobs:
                reader.read_blob(layer.index, name, np.float32)
        reader.layer_digest(0)


def _manifest_bytes_fail_cleanly(directory: Path, data: bytes) -> None:
    (directory / MANIFEST_FILE).write_bytes(data)
    try:
        _use_like_the_runtime(directory)
    except FlashError:
        pass


@FUZZ
@given(doc=_json)
def test_random_json_is_rejected_cleanly(doc):
    try:
        parse_manifest(doc, Path("fuzzed/flash_manifest.json"))
    except FlashFormatError as e:
        assert "fuzzed/flash_manifest.json" in str(e)


@FUZZ
@given(data=st.data())
def test_manifest_with_a_field_replaced_or_removed_fails_cleanly(flash, tmp_path_factory, data):
    original = json.loads((flash / MANIFEST_FILE).read_text())
    paths = _paths(original)
    top = [p for p in paths if len(p) == 1]  # as likely as the many per-layer fields
    edits = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(top) | st.sampled_from(paths),
                st.sampled_from(["replace", "delete", "nudge"]),
                _scalar | _json,
            ),
            min_size=1,
            max_size=3,
        )
    )
    doc = original
    for path, action, value in edits:
        try:
            doc = _mutate(doc, path, action, value)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced the path
            continue
    directory = tmp_path_factory.mktemp("manifest")
    for name in ("ffn_store.bin",):
        shutil.copy(flash / name, directory / name)
    _manifest_bytes_fail_cleanly(directory, json.dumps(doc).encode())


@FUZZ
@given(data=st.data())
def test_manifest_with_damaged_bytes_fails_cleanly(flash, tmp_path_factory, data):
    raw = bytearray((flash / MANIFEST_FILE).read_bytes())
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=6)
    )
    for position, value in edits:
        raw[position] = value
    cut = data.draw(st.none() | st.integers(0, len(raw)))
    directory = tmp_path_factory.mktemp("manifest")
    shutil.copy(flash / "ffn_store.bin", directory / "ffn_store.bin")
    _manifest_bytes_fail_cleanly(directory, bytes(raw[:cut]))


@FUZZ
@given(data=st.data())
def test_trunk_header_damage_is_caught_by_the_header_check(flash, tmp_path_factory, data):
    """A damaged or truncated trunk header gives FlashFormatError naming the file; a header that
    passes the check loads in MLX (so the loader never sees MLX's own errors for these)."""
    raw = bytearray((flash / "model.safetensors").read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    edits = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, header_end - 1),
                st.sampled_from([0x00, 0x20, 0x22, 0x2C, 0x30, 0x39, 0x5B, 0x7B, 0xFF])
                | st.integers(0, 255),
            ),
            max_size=4,
        )
    )
    for position, value in edits:
        raw[position] = value
    cut = data.draw(st.none() | st.integers(0, len(raw)))
    path = tmp_path_factory.mktemp("trunk") / "model.safetensors"
    path.write_bytes(bytes(raw[:cut]))
    try:
        tensors = check_trunk_file(path)
    except FlashFormatError as e:
        assert str(path) in str(e)
        return
    loaded = mx.load(str(path))
    assert set(loaded) == set(tensors)
    mx.eval(list(loaded.values()))


ODD_VALUES = [None, True, -1, 0, 2**70, 1.5, "", "no-such-hash", "../x", [], {}]


def test_every_top_level_field_with_odd_values_fails_cleanly(flash, tmp_path):
    """The systematic complement of the random edits above: each top-level field, each odd value."""
    original = json.loads((flash / MANIFEST_FILE).read_text())
    shutil.copy(flash / "ffn_store.bin", tmp_path / "ffn_store.bin")
    for key in original:
        for value in ODD_VALUES + ["__delete__"]:
            doc = dict(original)
            if value == "__delete__":
                del doc[key]
            else:
                doc[key] = value
            _manifest_bytes_fail_cleanly(tmp_path, json.dumps(doc).encode())


def _each_part(doc: dict, name: str, fn) -> None:
    for layer in doc["layers"]:
        for region in layer["regions"]:
            for part in region["parts"]:
                if part["name"] == name:
                    fn(part)


def _drop_part(doc: dict, layer: int, name: str) -> None:
    for region in doc["layers"][layer]["regions"]:
        region["parts"] = [p for p in region["parts"] if p["name"] != name]


GEOMETRY = {
    "no layers": lambda doc: doc.update(layers=[]),
    "layer 1 lacks a part": lambda doc: _drop_part(doc, 1, "up_bias"),
    "no down part anywhere": lambda doc: [
        _drop_part(doc, i, "down") for i in range(len(doc["layers"]))
    ],
    "a part shorter than d_model": lambda doc: _each_part(
        doc, "down", lambda p: p.update(length=p["length"] - 1)
    ),
    "a part the runtime does not know": lambda doc: _each_part(
        doc, "up_bias", lambda p: p.update(name="up_scale")
    ),
    "a gated manifest without gate rows": lambda doc: doc.update(gated=True),
    "an activation the runtime does not know": lambda doc: doc.update(activation="swish"),
    "down bias of the wrong length": lambda doc: [
        layer["blobs"]["down_bias"].update(length=7) for layer in doc["layers"]
    ],
}


@pytest.mark.parametrize("case", sorted(GEOMETRY))
def test_manifest_geometry_the_runtime_cannot_use_is_refused_at_load(case, flash, tmp_path):
    """Consistent JSON whose record layout does not make this model's FFN: refused when read, naming
    the manifest, instead of an MLX shape error in the middle of generation."""
    import mlx_lm

    import mlx_flash

    directory = tmp_path / "flash"
    shutil.copytree(flash, directory)
    doc = json.loads((directory / MANIFEST_FILE).read_text())
    GEOMETRY[case](doc)
    (directory / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(FlashFormatError) as info:
        model, tokenizer = mlx_flash.load(directory, "1GB")
        mlx_lm.generate(model, tokenizer, "hello", max_tokens=2)
    assert str(directory / MANIFEST_FILE) in str(info.value)
