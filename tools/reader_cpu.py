"""The store reader's time and CPU per sparse call on a converted store: cold (page cache
bypassed, as the runtime reads) and warm (the store in the page cache, one thread: the reader's own
work with no disk).

    python tools/reader_cpu.py --model DIR [--share 0.15] [--rounds 5]

Each call reads ``--share`` of a layer's neurons, chosen at random, into buffer-like rows (sorted
ids into consecutive rows, as a neuron buffer asks), once per layer per round. Prints per call:
wall ms, and CPU ms split into user (Python, numpy) and kernel time; medians of the rounds.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from mlx_flash.runtime.loader import disk_model, open_store
from mlx_flash.runtime.manifest import read_manifest
from mlx_flash.runtime.options import FlashOptions
from mlx_flash.runtime.store import StoreReader


def rounds(reader: StoreReader, share: float, n_rounds: int) -> list[tuple[float, float, float]]:
    """(wall, user, kernel) seconds per call, one entry per round."""
    m = reader.manifest
    k = max(1, int(share * m.d_ffn))
    dest = {p.name: np.zeros((k, p.length), np.float32) for p in m.layers[0].parts()}
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_rounds):
        calls = [np.sort(rng.choice(m.d_ffn, k, replace=False)) for _ in range(m.n_layers)]
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for layer, ids in enumerate(calls):
            reader.read_neurons(layer, ids, dest, np.arange(k))
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        user, kernel = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
        out.append((wall / m.n_layers, user / m.n_layers, kernel / m.n_layers))
    return out


def report(name: str, samples: list[tuple[float, float, float]]) -> None:
    wall, user, kernel = (1e3 * statistics.median(s[i] for s in samples) for i in range(3))
    print(f"{name:>5}: {wall:6.2f} ms per call, CPU {user:5.2f} ms user + {kernel:5.2f} ms kernel")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="converted flash directory")
    ap.add_argument("--share", type=float, default=0.15, help="share of a layer's neurons per call")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    manifest = read_manifest(args.model)
    cost, threads = disk_model(args.model, manifest)
    uncached = FlashOptions.build({"page_cache": False})
    with open_store(args.model, manifest, uncached, cost, threads) as reader:
        report("cold", rounds(reader, args.share, args.rounds))
    with open(args.model / manifest.store_file, "rb") as store:  # into the page cache
        while store.read(1 << 24):
            pass
    with StoreReader(args.model, manifest, threads=1) as reader:
        rounds(reader, args.share, 1)  # first touch of the rows
        report("warm", rounds(reader, args.share, args.rounds))


if __name__ == "__main__":
    main()
