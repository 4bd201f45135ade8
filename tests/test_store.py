"""StoreReader: right values in the right rows, coalescing, page-cache bypass, faults, digests."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_flash.runtime.errors import StoreReadError
from mlx_flash.runtime.manifest import (
    STORE_FILE,
    Blob,
    LayerEntry,
    Manifest,
    Part,
    Region,
    numpy_storage_dtype,
    read_manifest,
)
from mlx_flash.runtime.store import ReadCount, StoreReader, plan_runs

PARTS = ("gate", "up", "down")


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to if to else n


def _encode(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw store array, the float32 values a reader must reproduce) for ``dtype``."""
    if dtype == "bfloat16":
        raw = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return raw, (raw.astype(np.uint32) << 16).view(np.float32)
    raw = values.astype(numpy_storage_dtype(dtype))
    return raw, raw.astype(np.float32)


def build_store(
    directory: Path,
    *,
    layout: str = "bundled",
    dtype: str = "float32",
    d_model: int = 8,
    d_ffn: int = 64,
    n_layers: int = 2,
    align: int = 0,
    part_gap: int = 0,
    seed: int = 0,
) -> tuple[Manifest, list[dict[str, np.ndarray]]]:
    """Write a store with random garbage in every padding byte; returns the manifest and
    per-layer truth.

    ``part_gap`` leaves a hole between parts inside a record (exercises interior sinks).
    """
    rng = np.random.default_rng(seed)
    itemsize = np.dtype(numpy_storage_dtype(dtype)).itemsize
    part_bytes = d_model * itemsize
    groups = [PARTS] if layout == "bundled" else [(p,) for p in PARTS]
    chunks: list[tuple[int, np.ndarray]] = []  # (offset, raw bytes) to write
    layers, truth, pos = [], [], 0
    for li in range(n_layers):
        pos = _round_up(pos, align)
        start, regions, values = pos, [], {}
        for group in groups:
            parts = tuple(
                Part(n, j * (part_bytes + part_gap), d_model, dtype) for j, n in enumerate(group)
            )
            size = parts[-1].offset + part_bytes
            stride = _round_up(size, align)
            records = (
                np.frombuffer(rng.bytes(stride * d_ffn), np.uint8).reshape(d_ffn, stride).copy()
            )
            for p in parts:
                raw, values[p.name] = _encode(rng.standard_normal((d_ffn, d_model)), dtype)
                records[:, p.offset : p.offset + part_bytes] = raw.view(np.uint8).reshape(
                    d_ffn, part_bytes
                )
            regions.append(Region(pos, stride, size, d_ffn, parts))
            chunks.append((pos, records))
            pos += stride * d_ffn
        bias_raw, values["down_bias"] = _encode(rng.standard_normal(d_model), dtype)
        chunks.append((pos, bias_raw.view(np.uint8)))
        blobs = {"down_bias": Blob(pos, d_model, dtype)}
        pos += bias_raw.nbytes
        layers.append(
            LayerEntry(li, f"model.layers.{li}.mlp", start, pos - start, "", tuple(regions), blobs)
        )
        truth.append(values)
    # trailing garbage: the store may hold more than the layers
    data = bytearray(rng.bytes(pos + 123))
    for off, raw in chunks:
        data[off : off + raw.nbytes] = raw.tobytes()
    layers = [
        LayerEntry(
            e.index,
            e.prefix,
            e.offset,
            e.nbytes,
            hashlib.sha256(data[e.offset : e.offset + e.nbytes]).hexdigest(),
            e.regions,
            e.blobs,
        )
        for e in layers
    ]
    with open(directory / STORE_FILE, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped from the page cache
    Manifest(
        "llama",
        d_model,
        d_ffn,
        True,
        "silu",
        layout,
        dtype,
        align,
        STORE_FILE,
        len(data),
        tuple(layers),
    ).save(directory)
    return read_manifest(directory), truth


def make_dest(
    manifest: Manifest, capacity: int, dtype=np.float32, names=PARTS
) -> dict[str, np.ndarray]:
    return {n: np.full((capacity, manifest.d_model), np.nan, dtype) for n in names}


def check_rows(dest, truth, ids, rows, capacity) -> None:
    """Rows got exactly the neurons' parts; every other row is untouched (still NaN)."""
    untouched = np.setdiff1d(np.arange(capacity), rows)
    for name, arr in dest.items():
        np.testing.assert_array_equal(arr[rows].astype(np.float32), truth[name][ids])
        assert np.isnan(arr[untouched].astype(np.float32)).all(), name


def random_request(rng, d_ffn: int, capacity: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.choice(d_ffn, n, replace=False), rng.choice(capacity, n, replace=False)


@pytest.fixture
def bundled(tmp_path):
    return tmp_path, *build_store(tmp_path)


def spy_preadv(reader: StoreReader, note) -> None:
    """Call ``note(fd, bufs, offset, flags)`` before each of ``reader``'s reads."""
    original = reader._preadv

    def read(fd, bufs, offset, flags):
        note(fd, bufs, offset, flags)
        return original(fd, bufs, offset, flags)

    reader._preadv = read


@pytest.mark.parametrize("gap_bytes", [0, 100, 1 << 20])
@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(layout="bundled"),
        dict(layout="unbundled"),
        dict(layout="bundled", align=4096),
        dict(layout="unbundled", align=512, part_gap=0),
        dict(layout="bundled", part_gap=12),
    ],
)
def test_random_ids_land_in_their_rows(tmp_path, geometry, threads, gap_bytes):
    """Whether runs read through the gaps between wanted records (gap_bytes) or not."""
    manifest, truth = build_store(tmp_path, **geometry)
    rng = np.random.default_rng(1)
    with StoreReader(tmp_path, manifest, threads=threads, gap_bytes=gap_bytes) as reader:
        for layer in range(manifest.n_layers):
            for n in (1, 7, 40, 64):
                ids, rows = random_request(rng, manifest.d_ffn, 80, n)
                dest = make_dest(manifest, 80)
                reader.read_neurons(layer, ids, dest, rows)
                check_rows(dest, truth[layer], ids, rows, 80)


def test_run_plan_merges_gaps_cheaper_than_a_read_and_caps_runs():
    ids = np.array([0, 1, 2, 5, 6, 20, 21, 40])
    assert plan_runs(ids, cap=100) == [(0, 3), (3, 5), (5, 7), (7, 8)]  # adjacent ids only
    assert plan_runs(ids, cap=100, max_gap=2) == [(0, 5), (5, 7), (7, 8)]  # 3..4: a 2-record gap
    assert plan_runs(ids, cap=100, max_gap=13) == [(0, 7), (7, 8)]
    assert plan_runs(ids, cap=4, max_gap=100) == [(0, 3), (3, 5), (5, 7), (7, 8)]  # spans <= 4
    assert plan_runs(np.array([], dtype=np.int64), cap=4) == []
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = np.unique(rng.integers(0, 500, rng.integers(1, 60)))
        cap, gap = int(rng.integers(1, 50)), int(rng.integers(0, 20))
        runs = plan_runs(ids, cap, gap)
        assert [i for a, b in runs for i in range(a, b)] == list(range(len(ids)))  # each id once
        for a, b in runs:
            assert ids[b - 1] - ids[a] < cap and np.all(np.diff(ids[a:b]) <= gap + 1)
        for (a, b), (c, _) in zip(runs, runs[1:], strict=False):  # split only where it must
            assert ids[c] - ids[b - 1] > gap + 1 or ids[c] - ids[a] >= cap


def test_gaps_read_through_count_their_bytes_in_fewer_reads(bundled, monkeypatch):
    """By a reader that does not advise the kernel (macOS; one that does reads no gap through)."""
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    directory, manifest, truth = bundled
    stride = manifest.layers[0].regions[0].record_stride
    ids, rows = np.array([3, 5, 7, 9]), np.arange(4)
    with StoreReader(directory, manifest, threads=1) as split:
        apart = split.read_neurons(0, ids, make_dest(manifest, 4), rows)
    with StoreReader(directory, manifest, threads=1, gap_bytes=stride) as merged:
        dest = make_dest(manifest, 4)
        together = merged.read_neurons(0, ids, dest, rows)
    check_rows(dest, truth[0], ids, rows, 4)
    assert (apart.reads, together.reads) == (4, 1)
    assert (apart.bytes, together.bytes, together.records) == (4 * stride, 7 * stride, 4)


def test_short_runs_are_read_one_after_another_into_staging(bundled):
    """One preadv per run, each into the staging buffer right after the one before (record by
    record, from the first wanted byte), none into the destination; the rows are right."""
    directory, manifest, truth = bundled
    stride = manifest.layers[0].regions[0].record_stride
    dest = make_dest(manifest, 16)
    ids, rows = [3, 4, 9, 20, 21, 22], [9, 2, 0, 15, 4, 7]  # runs [3, 4], [9], [20..22]
    seen = []
    with StoreReader(directory, manifest, threads=1) as reader:
        spy_preadv(reader, lambda fd, bufs, off, flags: seen.append((list(bufs), off)))
        assert reader.read_neurons(0, ids, dest, rows).reads == 3
    check_rows(dest, truth[0], ids, rows, 16)
    assert [len(bufs) for bufs, _ in seen] == [1, 1, 1]
    views = [np.asarray(bufs[0]) for bufs, _ in seen]
    assert not any(np.shares_memory(v, dest[p]) for v in views for p in PARTS)
    base = views[0].__array_interface__["data"][0]
    starts = [v.__array_interface__["data"][0] - base for v in views]
    assert starts == [0, 2 * stride, 3 * stride]
    region = manifest.layers[0].regions[0]
    assert [off for _, off in seen] == [region.offset + i * stride for i in (3, 9, 20)]


def test_batches_follow_staging_size_and_thread_count():
    from mlx_flash.runtime.store import _batches

    assert _batches([1, 1, 5, 1, 1], [True, True, True, False, True], 6) == [
        (0, 2),
        (2, 3),
        (3, 4),
        (4, 5),
    ]
    assert _batches([2, 9, 1], [True] * 3, 4) == [(0, 1), (1, 2), (2, 3)]  # a long run alone
    assert _batches([1] * 7, [True] * 7, 7) == [(0, 7)]
    assert _batches([], [], 4) == []


@pytest.mark.parametrize("threads,batches,largest", [(1, 3, 2), (8, 6, 1)])
def test_a_batch_fits_the_staging_buffer_and_the_pool_gets_one_per_thread(
    tmp_path, monkeypatch, threads, batches, largest
):
    """6 KiB records, a 16 KiB staging buffer: batches of two records; on 8 threads (a reader that
    cannot advise the kernel, as on macOS, so the pool reads) 6 runs of one record make 6 batches,
    one per thread."""
    import mlx_flash.runtime.store as store

    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    manifest, truth = build_store(tmp_path, d_model=512, d_ffn=64)
    stride = manifest.layers[0].regions[0].record_stride
    assert stride == 6144
    conversions = []
    convert = store._convert_into
    monkeypatch.setattr(
        store,
        "_convert_into",
        lambda dst, rows, src, dt: (conversions.append(len(src)), convert(dst, rows, src, dt)),
    )
    ids = np.arange(0, 60, 10)  # 6 runs of one record
    rows = np.random.default_rng(5).permutation(6)
    with StoreReader(tmp_path, manifest, threads=threads, max_run_bytes=stride) as reader:
        assert reader._staging_size == 16384
        dest = make_dest(manifest, 6)
        assert reader.read_neurons(1, ids, dest, rows).reads == 6
    check_rows(dest, truth[1], ids, rows, 6)
    assert len(conversions) == batches * len(PARTS)
    assert max(conversions) == largest and sum(conversions) == 6 * len(PARTS)


def test_half_to_float32_is_numpys_cast_bit_for_bit():
    """Every float16 bit pattern (zeros, subnormals, infinities, NaN payloads, both signs), read
    through a strided view as records in staging are, gives numpy's float32 bits."""
    from mlx_flash.runtime.store import _half_to_float32

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    strided = np.stack([every, every[::-1]], axis=1)[:, :1]  # a column: stride of two values
    for half in (every, strided):
        got = _half_to_float32(half)
        assert got.dtype == np.float32 and got.shape == half.shape
        np.testing.assert_array_equal(got.view(np.uint32), half.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
def test_half_precision_stores_convert_into_float32(tmp_path, dtype, layout):
    manifest, truth = build_store(tmp_path, dtype=dtype, layout=layout, align=64)
    rng = np.random.default_rng(2)
    ids, rows = random_request(rng, manifest.d_ffn, 50, 30)
    with StoreReader(tmp_path, manifest, threads=4) as reader:
        dest = make_dest(manifest, 50)
        reader.read_neurons(1, ids, dest, rows)
    check_rows(dest, truth[1], ids, rows, 50)


def test_half_precision_runs_convert_once_per_part_and_batch(tmp_path, monkeypatch):
    """float16 records for float32 rows: short runs and a long one, read on one thread, are one
    batch: one preadv per run, one conversion per part for the whole call."""
    import mlx_flash.runtime.store as store

    manifest, truth = build_store(tmp_path, dtype="float16")
    conversions = []
    convert = store._convert_into
    monkeypatch.setattr(
        store,
        "_convert_into",
        lambda dst, rows, src, dt: (conversions.append(1), convert(dst, rows, src, dt)),
    )
    ids = list(range(0, 40, 4)) + list(range(44, 56))  # 10 runs of one record, one of 12
    rows = np.random.default_rng(3).permutation(len(ids))
    with StoreReader(tmp_path, manifest, threads=1) as reader:
        dest = make_dest(manifest, len(ids))
        assert reader.read_neurons(0, ids, dest, rows).reads == 11
    check_rows(dest, truth[0], ids, rows, len(ids))
    assert len(conversions) == len(PARTS)


def test_bfloat16_into_uint16_dest_is_raw(tmp_path):
    manifest, truth = build_store(tmp_path, dtype="bfloat16")
    dest = {n: np.zeros((4, manifest.d_model), np.uint16) for n in PARTS}
    with StoreReader(tmp_path, manifest, threads=1) as reader:
        reader.read_neurons(0, [5, 6], dest, [0, 1])
    got = (dest["up"][:2].astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got, truth[0]["up"][[5, 6]])


def test_float16_dest_from_float32_store(bundled):
    directory, manifest, truth = bundled
    dest = {"up": np.zeros((4, manifest.d_model), np.float16)}
    with StoreReader(directory, manifest, threads=1) as reader:
        reader.read_neurons(0, [10], dest, [3])
    np.testing.assert_array_equal(dest["up"][3], truth[0]["up"][10].astype(np.float16))


@pytest.mark.parametrize("layout,reads", [("bundled", 1), ("unbundled", 2)])
def test_missing_part_is_skipped_and_unwanted_region_not_read(tmp_path, layout, reads):
    manifest, truth = build_store(tmp_path, layout=layout, part_gap=8)
    dest = make_dest(manifest, 20, names=("up", "down"))
    with StoreReader(tmp_path, manifest, threads=2) as reader:
        count = reader.read_neurons(0, range(10), dest, range(10, 20))
    assert count.reads == reads
    check_rows(dest, truth[0], np.arange(10), np.arange(10, 20), 20)


def test_middle_part_skipped_is_not_copied(tmp_path):
    manifest, truth = build_store(tmp_path, align=256, part_gap=4)
    dest = make_dest(manifest, 12, names=("gate", "down"))
    with StoreReader(tmp_path, manifest, threads=1) as reader:
        reader.read_neurons(1, [0, 1, 2, 30, 31], dest, [4, 0, 11, 2, 7])
    check_rows(dest, truth[1], [0, 1, 2, 30, 31], [4, 0, 11, 2, 7], 12)


@pytest.mark.parametrize("layout,regions", [("bundled", 1), ("unbundled", 3)])
def test_coalescing_one_read_per_run_per_region(tmp_path, layout, regions):
    manifest, _ = build_store(tmp_path, layout=layout)
    with StoreReader(tmp_path, manifest, threads=4) as reader:
        assert (
            reader.read_neurons(0, range(10), make_dest(manifest, 10), range(10)).reads == regions
        )
        ids = [21, 3, 4, 5, 1, 9, 20, 63]  # runs: [1] [3..5] [9] [20, 21] [63]
        assert reader.read_neurons(0, ids, make_dest(manifest, 10), range(8)).reads == 5 * regions


def test_runs_are_capped_by_max_run_bytes(bundled):
    directory, manifest, truth = bundled
    stride = manifest.layers[0].regions[0].record_stride
    with StoreReader(directory, manifest, threads=3, max_run_bytes=3 * stride) as reader:
        dest = make_dest(manifest, 64)
        count = reader.read_range(0, 0, 10, dest, row0=5)
    assert count.reads == 4  # 3 + 3 + 3 + 1
    check_rows(dest, truth[0], np.arange(10), np.arange(5, 15), 64)


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
def test_thread_counts_and_bypass_modes_agree(tmp_path, layout):
    manifest, truth = build_store(tmp_path, layout=layout, align=4096)
    ids, rows = random_request(np.random.default_rng(3), manifest.d_ffn, 64, 50)
    results = {}
    for threads, page_cache, bypass in [
        (1, True, "auto"),
        (8, True, "auto"),
        (8, False, "auto"),
        (8, False, "direct"),
        (1, False, "direct"),
    ]:
        try:
            reader = StoreReader(
                tmp_path, manifest, threads=threads, page_cache=page_cache, bypass=bypass
            )
        except StoreReadError as e:  # e.g. O_DIRECT on tmpfs
            pytest.skip(str(e))
        with reader:
            dest = make_dest(manifest, 64)
            reader.read_neurons(0, ids, dest, rows)
            results[(threads, page_cache, bypass, reader.cache_mode)] = dest
    first = next(iter(results.values()))
    for key, dest in results.items():
        for name in PARTS:
            np.testing.assert_array_equal(dest[name], first[name], err_msg=str(key))
    check_rows(first, truth[0], ids, rows, 64)


def _read_both(directory, manifest, layer, ids, rows, capacity, dtype=np.float32, **kwargs):
    """The same read by the preadv and the mmap read path: their destinations and counts."""
    out = []
    for read_path in ("preadv", "mmap"):
        with StoreReader(directory, manifest, read_path=read_path, **kwargs) as reader:
            dest = make_dest(manifest, capacity, dtype)
            out.append((dest, reader.read_neurons(layer, ids, dest, rows)))
    return out


@pytest.mark.parametrize("threads,gap_bytes", [(1, 0), (8, 0), (8, 1 << 20)])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(layout="bundled"),
        dict(layout="unbundled", align=512),
        dict(layout="bundled", part_gap=12, d_ffn=300),
        dict(layout="bundled", dtype="float16", align=64),
        dict(layout="unbundled", dtype="bfloat16"),
    ],
)
def test_mmap_reads_the_same_rows_and_counts_as_preadv(
    tmp_path, monkeypatch, geometry, threads, gap_bytes
):
    """Byte for byte, float16 and bfloat16 stores converted into float32 included; the counts
    mean the same (a run copied from the mapping counts as one read of its bytes) where both
    plan with the gap given (``preadv`` not advising the kernel, as on macOS)."""
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    manifest, truth = build_store(tmp_path, **geometry)
    rng = np.random.default_rng(6)
    for n in (1, 9, manifest.d_ffn // 2, manifest.d_ffn):
        ids, rows = random_request(rng, manifest.d_ffn, manifest.d_ffn, n)
        (pread, a), (mapped, b) = _read_both(
            tmp_path, manifest, 1, ids, rows, manifest.d_ffn, threads=threads, gap_bytes=gap_bytes
        )
        for name in PARTS:
            assert pread[name].tobytes() == mapped[name].tobytes(), name
        assert (a.records, a.bytes, a.reads) == (b.records, b.bytes, b.reads)
        check_rows(mapped, truth[1], ids, rows, manifest.d_ffn)


def test_mmap_reads_raw_and_narrowed_destinations_as_preadv(tmp_path):
    """Destinations of the store dtype and of another are filled alike from the mapping."""
    manifest, _ = build_store(tmp_path, dtype="float16", part_gap=6)
    ids, rows = random_request(np.random.default_rng(7), manifest.d_ffn, 64, 40)
    for dtype in (np.float16, np.float32):
        (pread, _), (mapped, _) = _read_both(tmp_path, manifest, 0, ids, rows, 64, dtype, threads=4)
        for name in PARTS:
            assert pread[name].tobytes() == mapped[name].tobytes(), (dtype, name)


def test_mmap_reads_quantized_stores_as_preadv(tmp_path):
    """Packed quantized words (uint32) and their scales and biases, raw and converted."""
    from conftest import convert_quietly
    from tiny_models import save_tiny_model

    src, _ = save_tiny_model("llama", tmp_path / "src")
    flash = convert_quietly(src, tmp_path / "flash", quantize=True, q_bits=4, q_group_size=32)
    manifest = read_manifest(flash)
    parts = {p.name: p for p in manifest.layers[0].parts()}
    assert "uint32" in {p.dtype for p in parts.values()}
    ids, rows = random_request(np.random.default_rng(8), manifest.d_ffn, 40, 25)
    got = []
    for read_path in ("preadv", "mmap"):
        with StoreReader(flash, manifest, threads=4, read_path=read_path) as reader:
            dest = {
                n: np.zeros((40, p.length), numpy_storage_dtype(p.dtype)) for n, p in parts.items()
            }
            reader.read_neurons(1, ids, dest, rows)
            got.append((dest, reader.read_layer(1), reader.read_layer(1, floats=None)))
    for pread, mapped in zip(*got, strict=True):
        assert pread.keys() == mapped.keys() == parts.keys()
        for name in parts:
            assert pread[name].tobytes() == mapped[name].tobytes(), name


def test_mmap_needs_the_page_cache_and_advises_through_the_mapping(bundled):
    from mlx_flash import cli, generate
    from mlx_flash.runtime.errors import OptionError
    from mlx_flash.runtime.options import FlashOptions

    directory, manifest, truth = bundled
    message = "read_path mmap reads through the page cache: it cannot be combined with page_cache"
    with pytest.raises(OptionError, match=message):
        FlashOptions(read_path="mmap", page_cache=False)
    args = generate.build_parser().parse_args(["--read-path", "mmap", "--no-page-cache"])
    with pytest.raises(OptionError, match=message):
        FlashOptions.build(cli.load_options(args, "generate"))
    with pytest.raises(OptionError, match="read_path must be one of preadv, mmap"):
        FlashOptions(read_path="io_uring")
    args = generate.build_parser().parse_args(["--read-path", "mmap"])
    assert FlashOptions.build(cli.load_options(args, "generate")).read_path == "mmap"
    assert FlashOptions().read_path == "preadv"
    with pytest.raises(ValueError, match="needs page_cache=True"):
        StoreReader(directory, manifest, page_cache=False, read_path="mmap")
    with StoreReader(directory, manifest, threads=2, read_path="mmap") as reader:
        stride = manifest.layers[0].regions[0].record_stride
        assert reader.advise(1, [3, 4, 9]) == 3 * stride  # runs [3, 4] and [9]
        dest = make_dest(manifest, 3)
        reader.read_neurons(1, [3, 4, 9], dest, [2, 0, 1])
        check_rows(dest, truth[1], [3, 4, 9], [2, 0, 1], 3)
        assert reader.layer_digest(1) == manifest.layers[1].checksum


def test_direct_io_reads_unaligned_records(tmp_path):
    manifest, truth = build_store(tmp_path, d_model=24, d_ffn=300, part_gap=4)  # 296-byte records
    try:
        reader = StoreReader(
            tmp_path, manifest, threads=4, page_cache=False, bypass="direct", max_run_bytes=5000
        )
    except StoreReadError as e:
        pytest.skip(str(e))
    ids, rows = random_request(np.random.default_rng(4), 300, 300, 200)
    with reader:
        assert reader.cache_mode == "direct"
        dest = make_dest(manifest, 300)
        reader.read_neurons(1, ids, dest, rows)
    check_rows(dest, truth[1], ids, rows, 300)


def test_uncached_reads_go_direct_from_their_size_on(tmp_path, monkeypatch):
    """Beside RWF_DONTCACHE, staged runs of at least DIRECT_MIN_BYTES are read O_DIRECT (aligned,
    no flags) and short runs with the flag; the rows are the same either way."""
    import mlx_flash.runtime.uncached as uncached

    monkeypatch.setattr(uncached, "DIRECT_MIN_BYTES", 4096)
    manifest, truth = build_store(tmp_path, d_model=24, d_ffn=300, part_gap=4)  # 296-byte records
    reader = StoreReader(tmp_path, manifest, threads=1, page_cache=False, max_run_bytes=1 << 16)
    if reader.cache_mode != "dontcache" or reader._file.direct_min is None:
        reader.close()
        pytest.skip(f"needs RWF_DONTCACHE and O_DIRECT here (mode {reader.cache_mode})")
    reads = []
    with reader:
        spy_preadv(
            reader,
            lambda fd, bufs, off, flags: reads.append(
                (fd == reader._file.direct_fd, flags, off, sum(len(b) for b in bufs))
            ),
        )
        ids = np.array([7, 8, *range(100, 140)])  # a short pair, then a long run
        dest = make_dest(manifest, 64)
        reader.read_neurons(1, ids, dest, np.arange(ids.size))
    check_rows(dest, truth[1], ids, np.arange(ids.size), 64)
    (short, long) = sorted(reads, key=lambda r: r[3])
    assert short[:2] == (False, uncached.RWF_DONTCACHE) and short[3] < 4096
    assert long[:2] == (True, 0) and long[2] % uncached.DIRECT_ALIGN == 0
    assert long[3] % uncached.DIRECT_ALIGN == 0 and long[3] >= 40 * 296


def _cached_bytes(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
@pytest.mark.parametrize("bypass", ["auto", "direct"])
def test_bypass_leaves_page_cache_almost_empty(tmp_path, bypass):
    # 6 KiB records, 12 MiB
    manifest, truth = build_store(tmp_path, d_model=512, d_ffn=1024, n_layers=2)
    store = tmp_path / STORE_FILE
    fd = os.open(store, os.O_RDONLY)
    try:
        for page_cache in (False, True):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert _cached_bytes(store) == 0
            try:
                reader = StoreReader(
                    tmp_path, manifest, threads=8, page_cache=page_cache, bypass=bypass
                )
            except StoreReadError as e:
                pytest.skip(str(e))
            with reader:
                if reader.cache_mode == "cached" and not page_cache:
                    pytest.skip("no page-cache bypass on this file system")
                dest, rng = make_dest(manifest, 1024), np.random.default_rng(5)
                for layer in range(2):
                    reader.read_range(layer, 0, 1024, dest)
                    for _ in range(5):  # scattered reads are where readahead used to fill the cache
                        reader.read_neurons(
                            layer, rng.choice(1024, 200, replace=False), dest, range(200)
                        )
                # the look-ahead: advised records are in the cache until that layer's next read
                ahead = reader.advise(1, rng.choice(1024, 300, replace=False))
                assert (ahead > 0) == reader.advises
                if ahead:
                    time.sleep(0.2)  # the kernel reads them in the background
                    assert _cached_bytes(store) >= 0.5 * ahead
                ids, fresh = rng.choice(1024, 200, replace=False), make_dest(manifest, 200)
                reader.read_neurons(1, ids, fresh, range(200))
                check_rows(fresh, truth[1], ids, range(200), 200)
            cached, size = _cached_bytes(store), manifest.store_size
            if page_cache:
                assert cached > 0.9 * size  # the check can see cached pages
            else:
                assert cached < 0.05 * size, (reader.cache_mode, cached, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fault", ["eio", "short"])
@pytest.mark.parametrize("threads", [1, 8])
def test_faults_raise_store_read_error_and_reader_recovers(bundled, fault, threads):
    directory, manifest, truth = bundled
    region = manifest.layers[1].regions[0]
    bad_offset = region.offset + 20 * region.record_stride
    with StoreReader(directory, manifest, threads=threads) as reader:
        original = reader._preadv

        def faulty(fd, bufs, offset, flags):
            if offset == bad_offset:
                if fault == "eio":
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                return original(fd, bufs, offset, flags) - 1
            return original(fd, bufs, offset, flags)

        reader._preadv = faulty
        ids = [0, 5, 6, 20, 33, 40, 41, 60]
        with pytest.raises(StoreReadError) as info:
            reader.read_neurons(1, ids, make_dest(manifest, 8), range(8))
        message = str(info.value)
        assert (
            str(directory / STORE_FILE) in message
            and "layer 1" in message
            and f"offset {bad_offset}" in message
        )
        assert ("Input/output error" if fault == "eio" else "short read") in message
        reader._preadv = original
        dest = make_dest(manifest, 8)
        reader.read_neurons(1, ids, dest, range(8))
        check_rows(dest, truth[1], ids, np.arange(8), 8)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_close_is_idempotent_and_releases_threads_and_fds(bundled):
    directory, manifest, _ = bundled
    threads_before, fds_before = threading.active_count(), _open_fds()
    reader = StoreReader(directory, manifest, threads=8, read_path="mmap")
    # starts pool threads (mapped runs are copied on the pool; advised short runs inline)
    reader.read_neurons(0, [1, 3, 5, 7, 9, 11], make_dest(manifest, 6), range(6))
    assert threading.active_count() > threads_before
    reader.close()
    reader.close()
    assert threading.active_count() == threads_before and _open_fds() == fds_before
    with pytest.raises(StoreReadError, match="closed"):
        reader.read_neurons(0, [1], make_dest(manifest, 1), [0])


def test_advised_short_runs_are_read_by_the_calling_thread(bundled):
    """Where the kernel is told of every short run at once (advised, the page cache kept or
    bypassed), the calling thread copies them as they land: no pool thread wakes. Elsewhere the
    pool reads them."""
    directory, manifest, _ = bundled
    for page_cache in (False, True):
        before = threading.active_count()
        with StoreReader(directory, manifest, threads=8, page_cache=page_cache) as reader:
            reader.read_neurons(0, [1, 3, 5, 7, 9, 11], make_dest(manifest, 6), range(6))
            assert (threading.active_count() == before) == reader.advises


def test_advised_reads_read_no_gaps_through(bundled):
    """An advising reader (Linux) reads exactly the wanted records, one read per run of adjacent
    ones, whatever gap it was given; a reader that does not advise merges the gaps."""
    directory, manifest, truth = bundled
    stride = manifest.layers[0].regions[0].record_stride
    ids, rows = [1, 3, 5, 7, 9, 11], range(6)
    for page_cache in (False, True):
        with StoreReader(
            directory, manifest, threads=2, page_cache=page_cache, gap_bytes=4 * stride
        ) as reader:
            dest = make_dest(manifest, 6)
            got = reader.read_neurons(0, ids, dest, rows)
            check_rows(dest, truth[0], ids, rows, 6)
            if reader.advises:
                assert (reader.gap_bytes, got.reads, got.bytes) == (0, 6, 6 * stride)
            else:
                assert (got.reads, got.bytes) == (1, 11 * stride)


def test_layer_digest_matches_hashlib_and_manifest(tmp_path):
    manifest, _ = build_store(tmp_path, align=4096, n_layers=3)
    data = (tmp_path / STORE_FILE).read_bytes()
    for page_cache, bypass in [(True, "auto"), (False, "direct")]:
        try:
            reader = StoreReader(
                tmp_path,
                manifest,
                threads=2,
                page_cache=page_cache,
                bypass=bypass,
                max_run_bytes=10000,
            )
        except StoreReadError as e:
            pytest.skip(str(e))
        with reader:
            for e in manifest.layers:
                digest = reader.layer_digest(e.index)
                assert (
                    digest
                    == hashlib.sha256(data[e.offset : e.offset + e.nbytes]).hexdigest()
                    == e.checksum
                )


def test_read_blob(tmp_path):
    manifest, truth = build_store(tmp_path, dtype="bfloat16")
    with StoreReader(tmp_path, manifest, threads=1) as reader:
        raw = reader.read_blob(1, "down_bias")
        assert raw.dtype == np.uint16
        np.testing.assert_array_equal(
            reader.read_blob(1, "down_bias", np.float32), truth[1]["down_bias"]
        )
        with pytest.raises(KeyError, match="up_bias"):
            reader.read_blob(1, "up_bias")


def test_totals_count_reads_and_reset(bundled):
    directory, manifest, _ = bundled
    with StoreReader(directory, manifest, threads=4) as reader:
        a = reader.read_neurons(0, [1, 2, 3, 10], make_dest(manifest, 4), range(4))
        b = reader.read_neurons(1, [7, 9], make_dest(manifest, 4), range(2))
        totals = reader.totals
        stride = manifest.layers[0].regions[0].record_stride
        assert totals == a + b
        assert (totals.records, totals.reads, totals.bytes, totals.calls) == (6, 4, 6 * stride, 2)
        assert a.seconds > 0 and b.seconds > 0
        assert reader.reset_totals() == totals
        assert reader.totals == ReadCount()


def test_rejects_bad_requests(bundled):
    directory, manifest, _ = bundled
    with StoreReader(directory, manifest, threads=1) as reader:
        dest = make_dest(manifest, 4)
        with pytest.raises(ValueError, match="duplicate neuron ids"):
            reader.read_neurons(0, [3, 3], dest, [0, 1])
        with pytest.raises(ValueError, match="duplicate neuron ids"):
            reader.read_neurons(0, [5, 3, 5], dest, [0, 1, 2])
        for ids in ([3, 4], [4, 3]):  # sorted ids take a shorter path
            with pytest.raises(ValueError, match="duplicate destination rows"):
                reader.read_neurons(0, ids, dest, [1, 1])
        for ids in ([64], [5, -1], [-1, 5]):
            with pytest.raises(ValueError, match=r"\[0, 64\)"):
                reader.read_neurons(0, ids, dest, [0, 1][: len(ids)])
        with pytest.raises(ValueError, match=r"rows must be in \[0, 4\)"):
            reader.read_neurons(0, [1], dest, [4])
        with pytest.raises(ValueError, match="bias"):
            reader.read_neurons(0, [1], {**dest, "bias": dest["up"]}, [0])
        with pytest.raises(ValueError, match="2-D"):
            reader.read_neurons(0, [1], {"up": np.zeros((4, 3), np.float32)}, [0])
        with pytest.raises(IndexError):
            reader.read_neurons(2, [1], dest, [0])
        with pytest.raises(ValueError, match="threads"):
            StoreReader(directory, manifest, threads=65)
        empty = reader.read_neurons(0, [], dest, [])
        assert (empty.records, empty.bytes, empty.reads) == (0, 0, 0)


def test_reads_into_mlx_arrays_without_copy(bundled):
    mx = pytest.importorskip("mlx.core")
    directory, manifest, truth = bundled
    buffers = {n: mx.zeros((8, manifest.d_model), dtype=mx.float32) for n in PARTS}
    mx.eval(*buffers.values())
    dest = {n: np.array(a, copy=False) for n, a in buffers.items()}
    with StoreReader(directory, manifest, threads=2) as reader:
        reader.read_neurons(0, [40, 2, 3], dest, [7, 0, 1])
    for n in PARTS:
        np.testing.assert_array_equal(np.array(buffers[n][[7, 0, 1]]), truth[0][n][[40, 2, 3]])


def test_a_model_loaded_with_mmap_computes_what_preadv_does(tiny_flash):
    """A third of the FFN buffered, so every decode step reads records: same logits, same reads."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.models.cache import make_prompt_cache

    import mlx_flash

    _, flash = tiny_flash("llama")
    logits, totals = {}, {}
    for read_path in ("preadv", "mmap"):
        model, _ = mlx_flash.load(flash, "1GB", ffn_cache=1 / 3, pin_share=0.0, read_path=read_path)
        assert model.flash.reader.read_path == read_path
        cache = make_prompt_cache(model)
        out = [model(mx.array([[3, 17, 42, 99, 7]]), cache=cache)[0]]
        for token in (5, 64, 120):
            out.append(model(mx.array([[token]]), cache=cache)[0])
        logits[read_path] = np.concatenate([np.array(o) for o in out])
        t = model.flash.reader.totals
        totals[read_path] = (t.records, t.bytes, t.reads)
        model.flash.close()
    np.testing.assert_array_equal(logits["mmap"], logits["preadv"])
    assert totals["mmap"] == totals["preadv"] and totals["mmap"][1] > 0
