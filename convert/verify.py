"""``--verify DIR``: check every layer's checksum and the files a flash model directory needs."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from mlx_flash.errors import FlashFormatError
from mlx_flash.manifest import check_store_file, check_trunk_file, read_manifest
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
    trunk = sorted(directory.glob("model*.safetensors"))
    if not trunk:
        problems.append(f"{directory}: no trunk weights (model*.safetensors)")
    for path in trunk:
        try:
            check_trunk_file(path)
        except FlashFormatError as e:
            problems.append(str(e))
    if (
        not (directory / "tokenizer.json").is_file()
        and not (directory / "tokenizer.model").is_file()
    ):
        problems.append(f"{directory}: no tokenizer (tokenizer.json or tokenizer.model)")
    with StoreReader(directory, manifest, threads=1) as reader:
        for layer in tqdm(manifest.layers, desc="verify", unit="layer", disable=not progress):
            if reader.layer_digest(layer.index) != layer.checksum:
                problems.append(
                    f"{directory / manifest.store_file}: layer {layer.index} is damaged (checksum mismatch in bytes "
                    f"{layer.offset}..{layer.offset + layer.nbytes})"
                )
    return problems


__all__ = ["verify", "FlashFormatError"]
