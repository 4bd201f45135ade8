"""``--verify DIR``: check every layer's checksum and the files a flash model directory needs."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from mlx_flash.errors import FlashFormatError
from mlx_flash.manifest import check_store_file, read_manifest
from mlx_flash.store import StoreReader


def verify(directory: str | Path, progress: bool = True) -> list[str]:
    """Problems found in DIR (empty when it is intact). Raises FlashFormatError if it is unreadable."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_store_file(directory, manifest)
    problems = []
    for name in ("config.json",):
        if not (directory / name).is_file():
            problems.append(f"{directory / name}: missing")
    if not list(directory.glob("model*.safetensors")):
        problems.append(f"{directory}: no trunk weights (model*.safetensors)")
    if not list(directory.glob("tokenizer*")):
        problems.append(f"{directory}: no tokenizer files")
    with StoreReader(directory, manifest, threads=1) as reader:
        for layer in tqdm(manifest.layers, desc="verify", unit="layer", disable=not progress):
            if reader.layer_digest(layer.index) != layer.checksum:
                problems.append(
                    f"{directory / manifest.store_file}: layer {layer.index} is damaged (checksum mismatch in bytes "
                    f"{layer.offset}..{layer.offset + layer.nbytes})"
                )
    return problems


__all__ = ["verify", "FlashFormatError"]
