"""``--verify DIR``: check every layer's checksum and the files a flash model directory needs."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from mlx_flash.runtime.manifest import directory_problems, read_manifest
from mlx_flash.runtime.proxy import file_digest
from mlx_flash.runtime.store import StoreReader


def verify(directory: str | Path, progress: bool = True) -> list[str]:
    """Problems found in DIR (empty when it is intact). Raises FlashFormatError if its manifest is
    unreadable."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = directory_problems(directory, manifest)
    if any(str(directory / manifest.store_file) in p for p in problems):
        return problems  # the store's size is wrong: its checksums cannot be read
    with StoreReader(directory, manifest, threads=1) as reader:
        for layer in tqdm(manifest.layers, desc="verify", unit="layer", disable=not progress):
            if reader.layer_digest(layer.index) != layer.checksum:
                problems.append(
                    f"{directory / manifest.store_file}: layer {layer.index} is damaged (checksum "
                    f"mismatch in bytes {layer.offset}..{layer.offset + layer.nbytes})"
                )
    return problems + _proxy_problems(directory, manifest.extra.get("proxy"))


def _proxy_problems(directory: Path, meta: dict | None) -> list[str]:
    """The proxy file the manifest names must be there, with the digest it recorded."""
    if not meta:
        return []
    path = directory / meta["file"]
    if not path.is_file():
        return [f"{path}: missing (the manifest names it); re-run the calibration"]
    if file_digest(path) != meta["sha256"]:
        return [f"{path}: damaged (sha256 mismatch); re-run the calibration"]
    return []
