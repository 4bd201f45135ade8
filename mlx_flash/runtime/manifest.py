"""The versioned manifest of a flash model directory, and the directory's file names.

A manifest says everything a reader needs without opening the store: the FFN shape and activation,
the store file's size, and per layer where each neuron's record lives and which parts it holds. A
reader rejects what it does not understand with a ``FlashFormatError`` that names the file.

Store geometry: each layer has one or more *regions* (one for the bundled layout; gate, up and down
for the unbundled one). A region holds ``n_records`` records of ``record_stride`` bytes from
``offset``; record i belongs to neuron i. A record is a sequence of *parts* (e.g. the gate row, the
up row, the down column, a per-neuron bias; for quantized stores the packed words, scales and biases
of each vector).

Mixture-of-experts stores (format version 2, ``moe`` set): the store holds only the MoE layers
(dense layers, routers and shared experts stay in the trunk), one layer entry per MoE layer in model
order, one region per layer with one record per expert. A record is the expert's tensors as mlx-lm's
``SwitchGLU`` holds them (gate, up and down projections: weights, quantization scales and biases,
per-expert biases), each flattened, kept in the source's quantization. ``moe.layers`` says which
model layer each entry is, the shape of each part and each projection's quantization.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .adapters import ACTIVATIONS
from .errors import FlashFormatError
from .files import read_json, write_json

FORMAT_NAME = "mlx_flash"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: dense stores only; 2 adds the optional "moe" section
MANIFEST_FILE = "flash_manifest.json"
STORE_FILE = "ffn_store.bin"  # must not match mlx-lm's model*.safetensors
TRUNK_FILE = "model.safetensors"

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint32": 4, "uint8": 1}
PACKED = ("uint32", "uint8")  # quantized words and fp4/fp8 scales: held in memory as stored
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def part_bytes(part: Part, itemsize: int) -> int:
    """Bytes one neuron's ``part`` takes in memory when floats are held with ``itemsize`` bytes
    (packed quantized words stay uint32, fp4/fp8 scales uint8)."""
    return part.length * (DTYPES[part.dtype] if part.dtype in PACKED else itemsize)


def numpy_storage_dtype(dtype: str) -> np.dtype:
    """numpy dtype used to move raw bytes of ``dtype`` (bfloat16 has none: it travels as uint16)."""
    return np.dtype(
        {
            "float32": np.float32,
            "float16": np.float16,
            "bfloat16": np.uint16,
            "uint32": np.uint32,
            "uint8": np.uint8,
        }[dtype]
    )


@dataclass(frozen=True)
class Part:
    """One vector inside a record: ``name`` (e.g. "gate", "up.scales"), byte offset, element
    count, dtype."""

    name: str
    offset: int
    length: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.length * DTYPES[self.dtype]


@dataclass(frozen=True)
class Region:
    """``n_records`` records of ``record_stride`` bytes starting at ``offset`` in the store file."""

    offset: int
    record_stride: int
    record_size: int
    n_records: int
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return self.record_stride * self.n_records


@dataclass(frozen=True)
class Blob:
    """A per-layer array stored once (e.g. the down-projection bias)."""

    offset: int
    length: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.length * DTYPES[self.dtype]


@dataclass(frozen=True)
class LayerEntry:
    index: int
    prefix: str
    offset: int
    nbytes: int
    checksum: str
    regions: tuple[Region, ...]
    blobs: dict[str, Blob] = field(default_factory=dict)

    def parts(self) -> list[Part]:
        """Every part of a neuron's record(s), over all regions."""
        return [p for r in self.regions for p in r.parts]

    def part_names(self) -> list[str]:
        return [p.name for p in self.parts()]


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int


EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMS = ("weight", "scales", "biases", "bias")
QUANT_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
MOE_ACTIVATIONS = ("swiglu", "swiglu_oai")  # mlx-lm's SwitchGLU activations (its own code runs)


@dataclass(frozen=True)
class LinearQuant:
    """How one expert projection is quantized: mlx's ``mode``, ``bits`` and ``group_size``."""

    mode: str
    bits: int
    group_size: int


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer of the store: the model's layer number, each record part's shape (one expert's
    tensor, e.g. ``"gate_proj.weight": (768, 256)``) and each projection's quantization (None:
    float)."""

    layer: int
    shapes: dict[str, tuple[int, ...]]
    quant: dict[str, LinearQuant | None]


@dataclass(frozen=True)
class MoELayout:
    """The experts of a mixture-of-experts store (see the module docstring)."""

    n_experts: int
    top_k: int
    d_expert: int
    activation: str
    layers: tuple[ExpertLayer, ...]


@dataclass(frozen=True)
class Manifest:
    """What a flash model directory holds; see the module docstring for the geometry."""

    model_type: str
    d_model: int
    d_ffn: int
    gated: bool
    activation: str
    layout: str
    dtype: str
    align: int
    store_file: str
    store_size: int
    layers: tuple[LayerEntry, ...]
    quantization: Quantization | None = None
    checksum_algorithm: str = "sha256"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    moe: MoELayout | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_records(self) -> int:
        """Records per layer: one per neuron, or one per expert in a MoE store."""
        return self.d_ffn if self.moe is None else self.moe.n_experts

    def neuron_bytes(self) -> int:
        """Record bytes one neuron occupies in a layer (all regions, without padding)."""
        return sum(r.record_size for r in self.layers[0].regions)

    def ffn_bytes(self) -> int:
        """Bytes of all FFN records (with padding) of the model."""
        return sum(r.nbytes for layer in self.layers for r in layer.regions)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"format": FORMAT_NAME, **d}
        return d

    def save(self, directory: Path) -> None:
        """Write the manifest atomically."""
        write_json(Path(directory) / MANIFEST_FILE, self.to_json())


def _require(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise FlashFormatError(f"{path}: manifest has no {where}{key!r}")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool:
        raise FlashFormatError(f"{path}: manifest field {where}{key!r} has the wrong type")
    if not isinstance(value, kind):
        raise FlashFormatError(f"{path}: manifest field {where}{key!r} has the wrong type")
    return value


def _count(d: Any, key: str, path: Path, where: str) -> int:
    """A non-negative integer field (an offset, a size, a count)."""
    value = _require(d, key, int, path, where)
    if value < 0:
        raise FlashFormatError(f"{path}: manifest field {where}{key} is negative")
    return value


def _dtype(d: Any, path: Path, where: str) -> str:
    dtype = _require(d, "dtype", str, path, where)
    if dtype not in DTYPES:
        raise FlashFormatError(f"{path}: unknown dtype {dtype!r} at {where}")
    return dtype


def _parse_part(d: Any, path: Path, where: str) -> Part:
    dtype = _dtype(d, path, where)
    return Part(
        name=_require(d, "name", str, path, where),
        offset=_count(d, "offset", path, where),
        length=_count(d, "length", path, where),
        dtype=dtype,
    )


def _parse_region(d: Any, path: Path, where: str) -> Region:
    parts = tuple(
        _parse_part(p, path, f"{where}parts[{j}].")
        for j, p in enumerate(_require(d, "parts", list, path, where))
    )
    region = Region(
        offset=_count(d, "offset", path, where),
        record_stride=_count(d, "record_stride", path, where),
        record_size=_count(d, "record_size", path, where),
        n_records=_count(d, "n_records", path, where),
        parts=parts,
    )
    if region.record_size > region.record_stride or region.record_stride == 0:
        raise FlashFormatError(f"{path}: {where}record_size exceeds record_stride")
    for p in parts:
        if p.offset + p.nbytes > region.record_size:
            raise FlashFormatError(f"{path}: part {p.name!r} at {where} runs past its record")
    return region


def _parse_blob(d: Any, path: Path, where: str) -> Blob:
    dtype = _dtype(d, path, where)
    return Blob(
        offset=_count(d, "offset", path, where),
        length=_count(d, "length", path, where),
        dtype=dtype,
    )


def parse_manifest(data: Any, path: Path) -> Manifest:
    """Validate a decoded manifest; every problem is a FlashFormatError naming ``path``."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise FlashFormatError(f"{path}: not an mlx_flash manifest")
    version = _require(data, "format_version", int, path, "")
    if version not in READABLE_VERSIONS:
        raise FlashFormatError(
            f"{path}: format version {version} is not supported by this mlx_flash (it reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}); re-convert the model or upgrade "
            "mlx_flash"
        )
    moe = _parse_moe(data.get("moe"), path) if version >= 2 else None
    layers = tuple(
        _parse_layer(entry, i, path)
        for i, entry in enumerate(_require(data, "layers", list, path, ""))
    )
    manifest = Manifest(
        model_type=_require(data, "model_type", str, path, ""),
        d_model=_require(data, "d_model", int, path, ""),
        d_ffn=_require(data, "d_ffn", int, path, ""),
        gated=_require(data, "gated", bool, path, ""),
        activation=_one_of(
            data, "activation", MOE_ACTIVATIONS if moe else tuple(ACTIVATIONS), path
        ),
        layout=_one_of(data, "layout", ("bundled", "unbundled"), path),
        dtype=_one_of(data, "dtype", ("float32", "float16", "bfloat16"), path),
        align=_count(data, "align", path, ""),
        store_file=_require(data, "store_file", str, path, ""),
        store_size=_count(data, "store_size", path, ""),
        layers=layers,
        quantization=_parse_quantization(data.get("quantization"), path),
        checksum_algorithm=_require(data, "checksum_algorithm", str, path, ""),
        source=str(data.get("source", "")),
        extra=data.get("extra") if isinstance(data.get("extra"), dict) else {},
        format_version=version,
        moe=moe,
    )
    if manifest.d_model <= 0 or manifest.d_ffn <= 0:
        raise FlashFormatError(f"{path}: d_model and d_ffn must be positive")
    if manifest.checksum_algorithm not in hashlib.algorithms_available:
        algorithm = manifest.checksum_algorithm
        raise FlashFormatError(f"{path}: unknown checksum algorithm {algorithm!r}")
    if "/" in manifest.store_file or manifest.store_file.startswith("."):
        raise FlashFormatError(f"{path}: store_file must be a plain file name")
    if moe is None:
        _check_ffn_parts(manifest, path)
    else:
        _check_expert_parts(manifest, path)
    _check_geometry(manifest, path)
    return manifest


def _one_of(data: dict, key: str, allowed: tuple[str, ...], path: Path) -> str:
    value = _require(data, key, str, path, "")
    if value not in allowed:
        raise FlashFormatError(f"{path}: unknown {key} {value!r} (known: {', '.join(allowed)})")
    return value


def _parse_layer(entry: Any, i: int, path: Path) -> LayerEntry:
    where = f"layers[{i}]."
    blobs = _require(entry, "blobs", dict, path, where)
    regions = _require(entry, "regions", list, path, where)
    layer = LayerEntry(
        index=_require(entry, "index", int, path, where),
        prefix=_require(entry, "prefix", str, path, where),
        offset=_count(entry, "offset", path, where),
        nbytes=_count(entry, "nbytes", path, where),
        checksum=_require(entry, "checksum", str, path, where),
        regions=tuple(
            _parse_region(r, path, f"{where}regions[{j}].") for j, r in enumerate(regions)
        ),
        blobs={str(k): _parse_blob(v, path, f"{where}blobs.{k}.") for k, v in blobs.items()},
    )
    if layer.index != i:
        raise FlashFormatError(f"{path}: layer entry {i} says it is layer {layer.index}")
    if not layer.regions:
        raise FlashFormatError(f"{path}: layer {i} has no regions")
    return layer


def _parse_quantization(quant: Any, path: Path) -> Quantization | None:
    if quant is None:
        return None
    quant = Quantization(
        bits=_require(quant, "bits", int, path, "quantization."),
        group_size=_require(quant, "group_size", int, path, "quantization."),
    )
    if quant.bits not in (2, 3, 4, 5, 6, 8) or quant.group_size not in (32, 64, 128):
        raise FlashFormatError(f"{path}: unsupported quantization {quant}")
    return quant


def _parse_moe(d: Any, path: Path) -> MoELayout | None:
    """The ``moe`` section of a version-2 manifest (None for dense stores)."""
    if d is None:
        return None
    where = "moe."
    layers = _require(d, "layers", list, path, where)
    moe = MoELayout(
        n_experts=_count(d, "n_experts", path, where),
        top_k=_count(d, "top_k", path, where),
        d_expert=_count(d, "d_expert", path, where),
        activation=_require(d, "activation", str, path, where),
        layers=tuple(
            _parse_expert_layer(e, path, f"{where}layers[{i}].") for i, e in enumerate(layers)
        ),
    )
    if not 1 <= moe.top_k <= moe.n_experts or moe.d_expert == 0:
        raise FlashFormatError(
            f"{path}: moe has {moe.n_experts} experts, top_k {moe.top_k}, d_expert {moe.d_expert}"
        )
    numbers = [e.layer for e in moe.layers]
    if numbers != sorted(set(numbers)):
        raise FlashFormatError(f"{path}: moe.layers must name distinct layers in order ({numbers})")
    return moe


def _parse_expert_layer(d: Any, path: Path, where: str) -> ExpertLayer:
    shapes = _require(d, "shapes", dict, path, where)
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and all(type(n) is int and n > 0 for n in shape)):
            raise FlashFormatError(f"{path}: {where}shapes.{name} is not a list of sizes")
    quant = _require(d, "quant", dict, path, where)
    if set(quant) != set(EXPERT_LINEARS):
        raise FlashFormatError(f"{path}: {where}quant must name {', '.join(EXPERT_LINEARS)}")
    return ExpertLayer(
        layer=_count(d, "layer", path, where),
        shapes={str(k): tuple(v) for k, v in shapes.items()},
        quant={k: _parse_linear_quant(q, path, f"{where}quant.{k}.") for k, q in quant.items()},
    )


def _parse_linear_quant(d: Any, path: Path, where: str) -> LinearQuant | None:
    if d is None:
        return None
    quant = LinearQuant(
        mode=_require(d, "mode", str, path, where),
        bits=_require(d, "bits", int, path, where),
        group_size=_require(d, "group_size", int, path, where),
    )
    if (
        quant.mode not in QUANT_MODES
        or quant.bits not in (2, 3, 4, 5, 6, 8)
        or quant.group_size not in (16, 32, 64, 128)
    ):
        raise FlashFormatError(f"{path}: unsupported quantization {quant} at {where}")
    return quant


def _expert_part_dtype(name: str, quant: LinearQuant | None, floats: str) -> str | None:
    """The dtype a record part must have (None: the part cannot exist with this quantization)."""
    param = name.partition(".")[2]
    if param == "weight":
        return floats if quant is None else "uint32"
    if param == "scales" and quant is not None:
        return floats if quant.mode == "affine" else "uint8"
    if param == "biases" and quant is not None and quant.mode == "affine":
        return floats
    return floats if param == "bias" else None


def _check_expert_parts(manifest: Manifest, path: Path) -> None:
    """Each MoE layer's record holds one expert's gate, up and down projections as ``moe`` says:
    what the runtime's slots assume."""
    moe = manifest.moe
    if len(moe.layers) != manifest.n_layers:
        raise FlashFormatError(
            f"{path}: moe.layers has {len(moe.layers)} entries for {manifest.n_layers} store layers"
        )
    for entry, experts in zip(manifest.layers, moe.layers, strict=True):
        where = f"{path}: MoE layer {entry.index} (model layer {experts.layer})"
        parts = {p.name: p for r in entry.regions for p in r.parts}
        if len(entry.regions) != 1 or set(parts) != set(experts.shapes):
            raise FlashFormatError(f"{where}: record parts {sorted(parts)} do not match moe.shapes")
        for name, part in parts.items():
            linear, _, param = name.partition(".")
            if linear not in EXPERT_LINEARS or param not in EXPERT_PARAMS:
                raise FlashFormatError(f"{where}: unknown record part {name!r}")
            dtype = _expert_part_dtype(name, experts.quant[linear], manifest.dtype)
            if (part.length, part.dtype) != (math.prod(experts.shapes[name]), dtype):
                raise FlashFormatError(
                    f"{where}: record part {name!r} is {part.length} x {part.dtype}, expected "
                    f"{math.prod(experts.shapes[name])} x {dtype}"
                )
        _check_expert_shapes(experts, moe, manifest.d_model, where)


def _check_expert_shapes(experts: ExpertLayer, moe: MoELayout, d_model: int, where: str) -> None:
    """Every projection is there, and its output rows are the expert's (d_expert or d_model)."""
    for linear, rows in (
        ("gate_proj", moe.d_expert),
        ("up_proj", moe.d_expert),
        ("down_proj", d_model),
    ):
        shape = experts.shapes.get(f"{linear}.weight")
        if shape is None or shape[0] != rows:
            raise FlashFormatError(
                f"{where}: {linear}.weight has shape {shape}, expected {rows} output rows"
            )


def _check_geometry(manifest: Manifest, path: Path) -> None:
    """Every layer holds d_ffn records (n_experts in a MoE store), and everything lies inside the
    store file."""
    end = manifest.store_size
    what = "d_ffn" if manifest.moe is None else "n_experts"
    for layer in manifest.layers:
        for r in layer.regions:
            if r.n_records != manifest.n_records:
                raise FlashFormatError(
                    f"{path}: layer {layer.index} has {r.n_records} records, expected "
                    f"{what}={manifest.n_records}"
                )
            if r.offset + r.nbytes > end:
                raise FlashFormatError(
                    f"{path}: layer {layer.index} runs past the end of the store ({end} bytes)"
                )
        for name, b in layer.blobs.items():
            if b.offset + b.nbytes > end:
                raise FlashFormatError(
                    f"{path}: layer {layer.index} blob {name!r} runs past the end of the store"
                )
        if layer.offset + layer.nbytes > end:
            raise FlashFormatError(f"{path}: layer {layer.index} runs past the end of the store")


def _part_shape(name: str, manifest: Manifest) -> tuple[int, str] | None:
    """(elements, dtype) a record part of this name must have, from the FFN shape; None for
    unknown names."""
    q, base, suffix = manifest.quantization, *name.partition(".")[::2]
    if name in ("gate_bias", "up_bias"):
        return 1, manifest.dtype
    if (
        base not in ("gate", "up", "down")
        or suffix not in ("", "scales", "biases")
        or (suffix and q is None)
    ):
        return None
    if not suffix:
        return (
            (manifest.d_model, manifest.dtype)
            if q is None
            else (manifest.d_model * q.bits // 32, "uint32")
        )
    return manifest.d_model // q.group_size, manifest.dtype


def _check_ffn_parts(manifest: Manifest, path: Path) -> None:
    """Every layer's records hold the same parts, and those make this FFN: what the runtime's
    buffers assume."""
    if not manifest.layers:
        raise FlashFormatError(f"{path}: manifest has no layers")
    first = sorted((p.name, p.length, p.dtype) for r in manifest.layers[0].regions for p in r.parts)
    names = [n for n, _, _ in first]
    if len(set(names)) != len(names):
        raise FlashFormatError(f"{path}: layer 0 holds a record part twice ({names})")
    for name, length, dtype in first:
        shape = _part_shape(name, manifest)
        if shape is None:
            raise FlashFormatError(f"{path}: unknown record part {name!r}")
        if (length, dtype) != shape:
            raise FlashFormatError(
                f"{path}: record part {name!r} is {length} x {dtype}, expected "
                f"{shape[0]} x {shape[1]} for d_model={manifest.d_model}"
            )
    wanted = {"up", "down"} | ({"gate"} if manifest.gated else set())
    vectors = {n.partition(".")[0] for n in names} - {"gate_bias", "up_bias"}
    if vectors != wanted:
        raise FlashFormatError(
            f"{path}: record parts {names} do not make a{' gated' if manifest.gated else ''} FFN"
        )
    for layer in manifest.layers[1:]:
        if sorted((p.name, p.length, p.dtype) for r in layer.regions for p in r.parts) != first:
            raise FlashFormatError(
                f"{path}: layer {layer.index}'s record parts differ from layer 0's"
            )
    for layer in manifest.layers:
        bias = layer.blobs.get("down_bias")
        if bias is not None and bias.length != manifest.d_model:
            raise FlashFormatError(
                f"{path}: layer {layer.index}'s down_bias has {bias.length} values, expected "
                f"{manifest.d_model}"
            )


def read_manifest(directory: str | Path) -> Manifest:
    """Read and validate ``DIR/flash_manifest.json``."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FlashFormatError(
            f"{path}: missing; {directory} is not a flash model directory "
            "(convert it with python -m mlx_flash.convert)"
        )
    return parse_manifest(read_json(path), path)


def check_store_file(directory: str | Path, manifest: Manifest) -> Path:
    """The cheap load-time check: the store exists and has exactly the size the manifest says."""
    store = Path(directory) / manifest.store_file
    if not store.is_file():
        raise FlashFormatError(f"{store}: store file missing")
    size = store.stat().st_size
    if size != manifest.store_size:
        raise FlashFormatError(
            f"{store}: store is {size} bytes but the manifest says {manifest.store_size} "
            "(truncated or replaced?)"
        )
    return store


def trunk_files(directory: str | Path) -> list[Path]:
    """The trunk's safetensors files (mlx-lm's naming)."""
    return sorted(Path(directory).glob("model*.safetensors"))


def directory_problems(directory: str | Path, manifest: Manifest) -> list[str]:
    """What is wrong with a flash model directory besides its manifest (the store's size, the
    config, the trunk files' headers, the tokenizer), cheaply: nothing large is read. Empty
    when intact."""
    directory = Path(directory)
    problems = []
    try:
        check_store_file(directory, manifest)
    except FlashFormatError as e:
        problems.append(str(e))
    if not (directory / "config.json").is_file():
        problems.append(f"{directory / 'config.json'}: missing")
    trunk = trunk_files(directory)
    if not trunk:
        problems.append(f"{directory}: no trunk weights (model*.safetensors)")
    for path in trunk:
        try:
            check_trunk_file(path)
        except FlashFormatError as e:
            problems.append(str(e))
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        problems.append(f"{directory}: no tokenizer (tokenizer.json or tokenizer.model)")
    return problems


SAFETENSORS_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own limit


def check_trunk_file(path: str | Path) -> dict[str, Any]:
    """The cheap load-time check of a trunk safetensors file: its header parses and every tensor
    lies in the file.

    Reads only the header (a few KB), so a truncated or damaged trunk is reported with its name
    before MLX allocates anything. Returns the header's tensor entries.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, MAX_SAFETENSORS_HEADER):
            raise FlashFormatError(
                f"{path}: not a safetensors file, or truncated "
                f"(header length {n}, file {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FlashFormatError(f"{path}: damaged safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise FlashFormatError(f"{path}: damaged safetensors header (not a JSON object)")
    data = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, t in tensors.items():
        ok = isinstance(t, dict) and t.get("dtype") in SAFETENSORS_DTYPES
        shape, span = (t.get("shape"), t.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        ok = ok and isinstance(span, list) and len(span) == 2 and all(type(o) is int for o in span)
        if not ok or not 0 <= span[0] <= span[1]:
            raise FlashFormatError(f"{path}: damaged safetensors header entry for tensor {name!r}")
        if span[1] > data:
            raise FlashFormatError(
                f"{path}: tensor {name!r} ends at byte {span[1]} of the data but the file holds "
                f"{data} (truncated?)"
            )
        if math.prod(shape) * SAFETENSORS_DTYPES[t["dtype"]] != span[1] - span[0]:
            raise FlashFormatError(
                f"{path}: tensor {name!r} has shape {shape} but {span[1] - span[0]} bytes"
            )
    return tensors


FLOAT_TENSORS = ("F64", "F32", "F16", "BF16")


def tensor_bytes(path: str | Path, itemsize: int) -> int:
    """Bytes the tensors of a safetensors file take in memory: floats held with ``itemsize``
    bytes, packed quantized words as stored. Reads only the header."""
    total = 0
    for t in check_trunk_file(path).values():
        size = itemsize if t["dtype"] in FLOAT_TENSORS else SAFETENSORS_DTYPES[t["dtype"]]
        total += math.prod(t["shape"]) * size
    return total
