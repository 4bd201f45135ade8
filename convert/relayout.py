"""Rewrite a flash model directory's store in the other layout (bundled <-> unbundled), nothing
else changed.

Why: the bench compares the same neurons read as one record per neuron (bundled) and as separate
gate, up and down records (unbundled). Re-laying out the converted store copies its bytes exactly
(same dtype, same quantization, same neuron order, same predictors and settings), which
converting again from the source could not promise. Other files are hard-linked where the file
system allows it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mlx_flash.runtime.errors import OptionError
from mlx_flash.runtime.files import staged
from mlx_flash.runtime.manifest import MANIFEST_FILE, LayerEntry, Manifest, read_manifest
from mlx_flash.runtime.store import StoreReader

from .writer import StoreWriter


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_store(
    reader: StoreReader,
    manifest: Manifest,
    path: Path,
    layout: str,
    orders: list[np.ndarray] | None = None,
    progress: bool = True,
) -> list[LayerEntry]:
    """Write the store ``reader`` reads to ``path`` in ``layout``, layer i's records in the order
    ``orders[i]`` (new record j is old record ``orders[i][j]``; None: as stored); returns the
    layers' manifest entries."""
    entries = []
    with open(path, "wb") as f:
        writer = StoreWriter(f, layout, manifest.align)
        for entry in tqdm(manifest.layers, desc="layers", unit="layer", disable=not progress):
            vectors = reader.read_layer(entry.index, floats=None)
            if orders is not None:
                vectors = {k: v[orders[entry.index]] for k, v in vectors.items()}
            blobs = {n: (reader.read_blob(entry.index, n), b.dtype) for n, b in entry.blobs.items()}
            dtypes = {p.name: p.dtype for p in entry.parts()}
            entries.append(writer.write_layer(entry.index, entry.prefix, vectors, blobs, dtypes))
        f.flush()
        os.fsync(f.fileno())
    return entries


def relayout(
    src: str | Path,
    out: str | Path,
    layout: str,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Write OUT: flash directory SRC with its FFN store in ``layout``; returns OUT."""
    src, out = Path(src), Path(out).absolute()
    manifest = read_manifest(src)
    if layout not in ("bundled", "unbundled"):
        raise OptionError(f"unknown layout {layout!r} (bundled or unbundled)")
    log(f"Re-laying out {src} ({manifest.layout}) -> {out} ({layout})")
    with staged(out, force) as tmp:
        for item in src.iterdir():
            if item.name in (manifest.store_file, MANIFEST_FILE) or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(item, tmp / item.name)
        with StoreReader(src, manifest, threads=4) as reader:
            entries = write_store(
                reader, manifest, tmp / manifest.store_file, layout, progress=progress
            )
        dataclasses.replace(
            manifest,
            layout=layout,
            layers=tuple(entries),
            store_size=(tmp / manifest.store_file).stat().st_size,
        ).save(tmp)
    return out


def _fingerprint(directory: Path, manifest: Manifest) -> str:
    """Changes whenever the directory's manifest or any of its other files does."""
    h = hashlib.sha256((directory / MANIFEST_FILE).read_bytes())
    for item in sorted(directory.rglob("*")):
        if item.is_file() and item.name != manifest.store_file and not item.name.startswith("."):
            st = item.stat()
            h.update(f"{item.relative_to(directory)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def layout_sibling(
    directory: str | Path,
    layout: str,
    cache: Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """DIRECTORY itself if its store has ``layout``, else a re-laid-out copy cached under ``cache``.

    The copy is named after the directory and a fingerprint of it, so a re-converted model gets a
    new copy; older copies of the same directory are removed.
    """
    directory = Path(directory).absolute()
    manifest = read_manifest(directory)
    if manifest.layout == layout:
        return directory
    stem = f"{directory.name}-{hashlib.sha256(str(directory).encode()).hexdigest()[:8]}-{layout}"
    out = cache / f"{stem}-{_fingerprint(directory, manifest)}"
    if (out / MANIFEST_FILE).is_file():
        return out
    for stale in cache.glob(f"{stem}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return relayout(directory, out, layout, force=True, progress=progress, log=log)
