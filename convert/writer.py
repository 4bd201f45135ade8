"""Write the neuron-major FFN store: one record per neuron (bundled) or per matrix row (unbundled).

A layer's FFN arrives as per-neuron *vectors* ([d_ffn, width] numpy arrays: the gate row, up row and
down column of every neuron, per-neuron biases, and for quantized stores packed words, scales and
biases) plus *blobs* stored once per layer (the down bias). The writer lays them out as the manifest
describes, streams them to the store file in chunks and hashes each layer as it goes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from mlx_flash.runtime.manifest import Blob, LayerEntry, Part, Region

REGION_ALIGN = 4096  # regions start on page boundaries, so O_DIRECT reads of whole regions work
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class PartSpec:
    name: str
    length: int
    dtype: str


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def part_group(name: str) -> str:
    """Which matrix a part belongs to ("gate.scales" -> "gate", "up_bias" -> "up"), to unbundle."""
    return name.split(".")[0].removesuffix("_bias")


def plan_regions(
    parts: list[PartSpec], layout: str, align: int, offset: int, n_records: int
) -> list[Region]:
    """Geometry of one layer's regions starting at ``offset`` (already region-aligned)."""
    groups: list[list[PartSpec]]
    if layout == "bundled":
        groups = [parts]
    else:
        order: dict[str, list[PartSpec]] = {}
        for p in parts:
            order.setdefault(part_group(p.name), []).append(p)
        groups = list(order.values())
    regions = []
    for group in groups:
        placed, cursor = [], 0
        for p in group:
            placed.append(Part(p.name, cursor, p.length, p.dtype))
            cursor += placed[-1].nbytes
        stride = _round_up(cursor, align) if align else cursor
        regions.append(Region(offset, stride, cursor, n_records, tuple(placed)))
        offset = _round_up(offset + stride * n_records, REGION_ALIGN)
    return regions


def drop_written(file: BinaryIO, offset: int = 0, length: int = 0) -> None:
    """Flush written bytes to disk and drop them from the page cache.

    Dirty pages of a large output would otherwise pile up in the page cache, which counts against
    the memory of a converter run in a tight budget (it is, on a machine smaller than the model).
    """
    file.flush()
    os.fdatasync(file.fileno())
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(file.fileno(), offset, length, os.POSIX_FADV_DONTNEED)


class StoreWriter:
    """Appends layers to an open store file; returns each layer's manifest entry."""

    def __init__(self, file: BinaryIO, layout: str, align: int):
        self.file = file
        self.layout = layout
        self.align = align
        self.offset = 0

    def _pad_to(self, target: int, digest) -> None:
        if target > self.offset:
            zeros = bytes(target - self.offset)
            self.file.write(zeros)
            if digest is not None:
                digest.update(zeros)
            self.offset = target

    def write_layer(
        self,
        index: int,
        prefix: str,
        vectors: dict[str, np.ndarray],
        blobs: dict[str, tuple[np.ndarray, str]],
        part_dtypes: dict[str, str],
    ) -> LayerEntry:
        """Write one layer. ``vectors[name]`` is [n_neurons, length] in the storage numpy dtype."""
        self._pad_to(_round_up(self.offset, REGION_ALIGN), None)
        start = self.offset
        digest = hashlib.sha256()
        n = next(iter(vectors.values())).shape[0]
        specs = [PartSpec(name, v.shape[1], part_dtypes[name]) for name, v in vectors.items()]
        regions = plan_regions(specs, self.layout, self.align, start, n)
        for region in regions:
            self._pad_to(region.offset, digest)
            rows_per_chunk = max(1, CHUNK_BYTES // region.record_stride)
            for c0 in range(0, n, rows_per_chunk):
                c1 = min(n, c0 + rows_per_chunk)
                chunk = np.zeros((c1 - c0, region.record_stride), dtype=np.uint8)
                for part in region.parts:
                    src = np.ascontiguousarray(vectors[part.name][c0:c1])
                    chunk[:, part.offset : part.offset + part.nbytes] = src.view(np.uint8).reshape(
                        c1 - c0, part.nbytes
                    )
                data = chunk.tobytes()
                self.file.write(data)
                digest.update(data)
                self.offset += len(data)
        blob_entries = {}
        for name, (array, dtype) in blobs.items():
            data = np.ascontiguousarray(array).tobytes()
            blob_entries[name] = Blob(self.offset, array.size, dtype)
            self.file.write(data)
            digest.update(data)
            self.offset += len(data)
        drop_written(self.file, start, self.offset - start)
        return LayerEntry(
            index,
            prefix,
            start,
            self.offset - start,
            digest.hexdigest(),
            tuple(regions),
            blob_entries,
        )
