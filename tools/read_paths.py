"""The store reader's read paths, cold and warm: preadv through the page cache, preadv bypassing it,
and copies from the store's mapping (``--read-path mmap``).

    python tools/read_paths.py --dir /path/on/the/disk [--gb 1.5] [--reps 3]

Writes a store of random float32 records (6 KiB: gate, up and down rows of d_model 512) in
``--dir`` once, then reads it with ``StoreReader`` in two patterns: small records (1500 random ids
of 5000 per call, with no gap read through and with the loader's default gap) and whole layers (one
10.4 MB run per call). Cold passes follow a dropped page cache (needs root); warm is a second pass
over the same calls. Prints MB/s of record payload and microseconds per call, medians of the
repetitions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mlx_flash.runtime.costmodel import CostModel
from mlx_flash.runtime.manifest import STORE_FILE, LayerEntry, Manifest, Part, Region
from mlx_flash.runtime.store import StoreReader

D_MODEL, D_FFN = 512, 5000
RECORD = 3 * D_MODEL * 4
THREADS = 4
SMALL_IDS, WHOLE_RECORDS = 1500, 1700
PATHS = {
    "preadv, page cache": {"page_cache": True},
    "preadv, uncached": {"page_cache": False},
    "mmap": {"read_path": "mmap"},
}


def make_store(directory: Path, layers: int) -> Manifest:
    """The store (written once, in 64 MiB pieces) and its manifest."""
    path, size = directory / STORE_FILE, layers * D_FFN * RECORD
    if not path.is_file() or path.stat().st_size != size:
        rng = np.random.default_rng(0)
        with open(path, "wb") as f, tqdm(total=size, unit="B", unit_scale=True) as bar:
            for start in range(0, size, 64 << 20):
                piece = min(64 << 20, size - start)
                f.write(rng.integers(0, 255, piece, dtype=np.uint8).tobytes())
                bar.update(piece)
    names = ("gate", "up", "down")
    parts = tuple(Part(n, j * D_MODEL * 4, D_MODEL, "float32") for j, n in enumerate(names))
    entries = tuple(
        LayerEntry(
            i,
            f"model.layers.{i}.mlp",
            i * D_FFN * RECORD,
            D_FFN * RECORD,
            "",
            (Region(i * D_FFN * RECORD, RECORD, RECORD, D_FFN, parts),),
            {},
        )
        for i in range(layers)
    )
    return Manifest(
        "llama", D_MODEL, D_FFN, True, "silu", "bundled", "float32", 0, STORE_FILE, size, entries
    )


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def small_calls(rng: np.random.Generator, first: int, layers: int) -> list:
    """Every other layer from ``first``: random ids, sorted."""
    return [
        (i, np.sort(rng.choice(D_FFN, SMALL_IDS, replace=False))) for i in range(first, layers, 2)
    ]


def one_pass(reader: StoreReader, calls: list) -> tuple[float, float]:
    """(MB/s of record payload, microseconds per call)."""
    dest = {n: np.empty((D_FFN, D_MODEL), np.float32) for n in ("gate", "up", "down")}
    seconds = sum(
        reader.read_neurons(layer, ids, dest, np.arange(ids.size)).seconds for layer, ids in calls
    )
    payload = sum(ids.size for _, ids in calls) * RECORD
    return payload / seconds / 1e6, 1e6 * seconds / len(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="a directory on the disk")
    parser.add_argument("--gb", type=float, default=1.5, help="store size in GB")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("cold passes drop the page cache: run as root")
    layers = max(2, int(args.gb * 1e9 / (D_FFN * RECORD)))
    args.dir.mkdir(parents=True, exist_ok=True)
    manifest = make_store(args.dir, layers)
    gap = CostModel.defaults().gap_bytes(THREADS)
    results: dict[tuple[str, str], list] = {}
    for rep in range(args.reps):
        rng = np.random.default_rng(rep)

        whole = [
            (i, np.arange(WHOLE_RECORDS) + int(rng.integers(0, D_FFN - WHOLE_RECORDS)))
            for i in range(layers)
        ]
        patterns = {
            "small records": (0, small_calls(rng, 0, layers)),
            "small records, gaps read through": (gap, small_calls(rng, 1, layers)),
            "whole layer": (0, whole),
        }
        for pattern, (gap_bytes, calls) in patterns.items():
            for name, how in PATHS.items():
                drop_caches()
                with StoreReader(
                    args.dir, manifest, THREADS, max_run_bytes=1 << 19, gap_bytes=gap_bytes, **how
                ) as reader:
                    cold, warm = one_pass(reader, calls), one_pass(reader, calls)
                results.setdefault((pattern, name), []).append((cold, warm))
    print("| pattern | path | cold MB/s | cold µs/call | warm MB/s | warm µs/call |")
    print("|---|---|---:|---:|---:|---:|")
    for (pattern, name), runs in results.items():
        med = [statistics.median(r[i][j] for r in runs) for i in (0, 1) for j in (0, 1)]
        print(f"| {pattern} | {name} | " + " | ".join(f"{v:.0f}" for v in med) + " |")


if __name__ == "__main__":
    main()
