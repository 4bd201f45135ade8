"""Cold-cache throughput of the store reader for 1, 8 and 32 threads reading random neuron sets.

Why: DESIGN.md §2/§5 — flash is fast only for large reads with many in flight; this measures what the
reader gets from this disk with the page cache bypassed, per thread count and read size.

    python tools/read_throughput.py --store FLASH_MODEL_DIR
    python tools/read_throughput.py --create 2GB --dir /var/tmp      # temporary SmolLM2-like store on disk
    python tools/read_throughput.py --create 2GB --bypass auto direct --sequential --baseline

Before every configuration the store is dropped from the page cache (posix_fadvise DONTNEED) and the reader
runs with page_cache=False, so every byte comes from the disk. Times here are noisy: compare the rows of one
run, not runs of different days.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_flash.manifest import (  # noqa: E402
    STORE_FILE,
    LayerEntry,
    Manifest,
    Part,
    Region,
    numpy_storage_dtype,
    read_manifest,
)
from mlx_flash.sizes import format_size, parse_size  # noqa: E402
from mlx_flash.store import StoreReader  # noqa: E402


def file_system_type(path: Path) -> str:
    """Type of the file system holding ``path`` (longest mount point prefix in /proc/self/mounts)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, mount, fstype, *_ = line.split()
                if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


def create_store(directory: Path, size: int, d_model: int, d_ffn: int, dtype: str, align: int) -> Manifest:
    """Write a bundled gate/up/down store of about ``size`` bytes with random contents."""
    itemsize = numpy_storage_dtype(dtype).itemsize
    parts = tuple(Part(n, j * d_model * itemsize, d_model, dtype) for j, n in enumerate(("gate", "up", "down")))
    record = 3 * d_model * itemsize
    stride = -(-record // align) * align if align else record
    n_layers = max(1, size // (stride * d_ffn))
    rng = np.random.default_rng(0)
    layers = []
    with open(directory / STORE_FILE, "wb") as f:
        for i in range(n_layers):
            offset = i * stride * d_ffn
            f.write(rng.bytes(stride * d_ffn))
            layers.append(LayerEntry(i, f"model.layers.{i}.mlp", offset, stride * d_ffn, "", (Region(offset, stride, record, d_ffn, parts),)))
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped from the page cache
    manifest = Manifest("llama", d_model, d_ffn, True, "silu", "bundled", dtype, align, STORE_FILE, n_layers * stride * d_ffn, tuple(layers))
    manifest.save(directory)
    return read_manifest(directory)


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: Path) -> str:
    """Bytes of ``path`` in the page cache (fincore), to show the bypass held."""
    if shutil.which("fincore") is None:
        return "?"
    out = subprocess.run(["fincore", "--bytes", "--noheadings", str(path)], capture_output=True, text=True)
    return format_size(int(out.stdout.split()[0])) if out.returncode == 0 else "?"


def measure(directory: Path, manifest: Manifest, threads: int, bypass: str, fraction: float, seconds: float, sequential: bool) -> str:
    """Read random neuron sets (or whole layers) layer after layer for ``seconds``; one result line."""
    d_ffn, rng = manifest.d_ffn, np.random.default_rng(threads)
    k = d_ffn if sequential else max(1, int(fraction * d_ffn))
    dest = {p.name: np.empty((k, p.length), numpy_storage_dtype(p.dtype)) for r in manifest.layers[0].regions for p in r.parts}
    id_sets = [np.sort(rng.choice(d_ffn, k, replace=False)) for _ in range(64)]
    store = directory / manifest.store_file
    drop_from_page_cache(store)
    with StoreReader(directory, manifest, threads=threads, page_cache=False, bypass=bypass) as reader:
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            layer = n % manifest.n_layers
            if sequential:
                reader.read_range(layer, 0, d_ffn, dest)
            else:
                reader.read_neurons(layer, id_sets[n % len(id_sets)], dest, np.arange(k))
            n += 1
        stats, mode = reader.stats.snapshot(), reader.cache_mode
    useful = stats.calls * k * manifest.neuron_bytes() / stats.seconds
    pattern = "sequential" if sequential else f"random {k}/{d_ffn}"
    return (
        f"{mode:9s} {pattern:15s} threads={threads:2d}  {stats.bytes_read / stats.seconds / 1e9:6.3f} GB/s "
        f"({useful / 1e9:6.3f} of records)  mean read {stats.mean_read_bytes / 1024:7.1f} KiB  "
        f"{stats.reads / stats.seconds:7.0f} reads/s  {stats.seconds / stats.calls * 1e3:7.2f} ms/layer  "
        f"page cache after: {cached_bytes(store)}"
    )


def measure_raw(manifest: Manifest, store: Path, threads: int, seconds: float) -> str:
    """Baseline without the reader: threads issuing one uncached preadv per random record, nothing else."""
    region = manifest.layers[0].regions[0]
    records = manifest.store_size // region.record_stride
    drop_from_page_cache(store)
    fd = os.open(store, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    counts = [0] * threads
    offsets = [(np.random.default_rng(i).integers(0, records, 1 << 16) * region.record_stride).tolist() for i in range(threads)]
    start = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        buf = bytearray(region.record_size)
        start.wait()
        while time.perf_counter() < stop:
            os.preadv(fd, [buf], offsets[i][counts[i] % len(offsets[i])], 0x80)  # RWF_DONTCACHE
            counts[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    stop = time.perf_counter() + seconds
    start.wait()
    for t in pool:
        t.join()
    os.close(fd)
    reads = sum(counts) / seconds
    return f"raw preadv one record/read    threads={threads:2d}  {reads * region.record_size / 1e9:6.3f} GB/s  {reads:7.0f} reads/s"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, help="flash model directory to read")
    src.add_argument("--create", help="create a temporary store of this size (e.g. 2GB) and delete it afterwards")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where --create writes (must be on disk, not tmpfs)")
    ap.add_argument("--d-model", type=int, default=576, help="--create: record = 3 x d_model values (SmolLM2-135M: 576)")
    ap.add_argument("--d-ffn", type=int, default=1536, help="--create: neurons per layer")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--align", type=int, default=0, help="--create: pad records to this many bytes")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--bypass", nargs="+", default=["auto"], choices=["auto", "dontcache", "direct", "nocache"])
    ap.add_argument("--fraction", type=float, default=0.1, help="share of a layer's neurons read per call")
    ap.add_argument("--seconds", type=float, default=3.0, help="per configuration")
    ap.add_argument("--sequential", action="store_true", help="also measure whole-layer read_range")
    ap.add_argument("--baseline", action="store_true", help="also measure bare preadv of single records (Linux)")
    args = ap.parse_args(argv)

    tmp = None
    if args.create:
        if file_system_type(args.dir) == "tmpfs":
            ap.error(f"{args.dir} is tmpfs (RAM): pick a directory on disk with --dir")
        tmp = Path(tempfile.mkdtemp(prefix="read_throughput-", dir=args.dir))
        manifest = create_store(tmp, parse_size(args.create), args.d_model, args.d_ffn, args.dtype, args.align)
        directory = tmp
    else:
        directory, manifest = args.store, read_manifest(args.store)
    try:
        print(
            f"store {directory / manifest.store_file}: {format_size(manifest.store_size)}, {manifest.n_layers} layers x "
            f"{manifest.d_ffn} neurons, {format_size(manifest.neuron_bytes())} per neuron, fs {file_system_type(directory)}"
        )
        for bypass in args.bypass:
            for sequential in [False, True] if args.sequential else [False]:
                for threads in args.threads:
                    print(measure(directory, manifest, threads, bypass, args.fraction, args.seconds, sequential), flush=True)
        if args.baseline:
            for threads in args.threads:
                print(measure_raw(manifest, directory / manifest.store_file, threads, args.seconds), flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
