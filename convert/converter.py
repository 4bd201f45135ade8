"""Turn a source model into a flash model directory, one layer at a time.

Peak memory stays near one layer's FFN plus the trunk: each layer's FFN tensors are loaded, written
to the store and released before the next layer. Output goes to a temporary directory next to OUT
that is renamed at the very end, so an interrupted conversion leaves OUT as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model, save_config
from tqdm import tqdm

from mlx_flash.integration import write_entry_point
from mlx_flash.runtime.adapters import FFNSpec, ffn_prefixes, is_moe, spec_for
from mlx_flash.runtime.errors import (
    FlashError,
    FlashFormatError,
    OptionError,
    UnsupportedModelError,
)
from mlx_flash.runtime.files import staged
from mlx_flash.runtime.manifest import (
    DTYPES,
    MX_DTYPES,
    STORE_FILE,
    Blob,
    LayerEntry,
    Manifest,
    Quantization,
    trunk_files,
)
from mlx_flash.runtime.sizes import format_size

from .source import SourceModel, model_after_sanitize
from .writer import REGION_ALIGN, PartSpec, StoreWriter, drop_written, plan_regions

FAIL_AT_ENV = "MLX_FLASH_CONVERT_FAIL_AT"  # test hook: "layer:N", "trunk" or "finalize"
BUILTIN_CALIBRATION = "builtin"  # calibration= value for the packaged sample text


def open_source(src: str | Path) -> SourceModel:
    """Pick the reader for SRC: a .gguf file, a local model directory, or a hub repo id."""
    src = str(src)
    if src.endswith(".gguf"):
        from .gguf_source import open_gguf

        if not Path(src).is_file():
            raise FlashFormatError(f"{src}: no such GGUF file")
        return open_gguf(Path(src))
    from .hf_source import open_hf_directory, resolve_model_path

    return open_hf_directory(resolve_model_path(src))


def _maybe_stop(step: str) -> None:
    if os.environ.get(FAIL_AT_ENV) == step:
        raise KeyboardInterrupt(f"conversion stopped at {step} ({FAIL_AT_ENV})")


def _dtype_name(a: mx.array) -> str:
    for name, dt in MX_DTYPES.items():
        if a.dtype == dt:
            return name
    raise UnsupportedModelError(f"unsupported tensor dtype {a.dtype}")


def _to_numpy(a: mx.array, dtype: str) -> np.ndarray:
    """An MLX array as numpy in the storage form of ``dtype`` (bfloat16 -> uint16 bits)."""
    if dtype == "uint32":
        return np.array(a.astype(mx.uint32))
    a = a.astype(MX_DTYPES[dtype])
    if dtype == "bfloat16":
        a = a.view(mx.uint16)
    return np.array(a)


class _Matrix:
    """One Linear's weight as rows (float, or affine-packed words + scales + biases)."""

    def __init__(
        self,
        weight: mx.array,
        scales: mx.array | None = None,
        biases: mx.array | None = None,
        bits: int = 0,
        group_size: int = 0,
    ):
        self.weight, self.scales, self.biases = weight, scales, biases
        self.bits, self.group_size = bits, group_size

    @property
    def packed(self) -> bool:
        return self.scales is not None

    def rows(self, start: int, stop: int) -> _Matrix:
        take = lambda a: None if a is None else a[start:stop]  # noqa: E731
        return _Matrix(
            self.weight[start:stop],
            take(self.scales),
            take(self.biases),
            self.bits,
            self.group_size,
        )

    def dense(self) -> mx.array:
        if not self.packed:
            return self.weight
        return mx.dequantize(
            self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits
        )


def _vectors_of(
    name: str, m: _Matrix, dtype: str, quant: Quantization | None
) -> dict[str, tuple[mx.array, str]]:
    """The per-neuron parts of one row-matrix, in the output representation."""
    if quant is None:
        return {name: (m.dense(), dtype)}
    if not (m.packed and m.bits == quant.bits and m.group_size == quant.group_size):
        dense = m.dense().astype(MX_DTYPES[dtype])
        if dense.shape[-1] % quant.group_size:
            raise UnsupportedModelError(
                f"d_model={dense.shape[-1]} is not a multiple of --q-group-size {quant.group_size}"
            )
        m = _Matrix(
            *mx.quantize(dense, group_size=quant.group_size, bits=quant.bits),
            quant.bits,
            quant.group_size,
        )
    return {
        name: (m.weight, "uint32"),
        f"{name}.scales": (m.scales, dtype),
        f"{name}.biases": (m.biases, dtype),
    }


class _LayerReader:
    """Pulls one layer's FFN tensors out of a SourceModel (each loader is called once)."""

    def __init__(self, source: SourceModel, spec: FFNSpec):
        self.source, self.spec = source, spec
        q = source.config.get("quantization") or {}
        if q and q.get("mode", "affine") != "affine":
            raise UnsupportedModelError(
                f"{source.description}: quantization mode {q.get('mode')!r} is not supported "
                "(affine only)"
            )
        self.bits, self.group_size = q.get("bits", 0), q.get("group_size", 0)

    def _take(self, name: str) -> mx.array | None:
        loader = self.source.tensors.pop(name, None)
        return None if loader is None else loader()

    def matrix(self, prefix: str, linear: str) -> tuple[_Matrix, mx.array | None]:
        base = f"{prefix}.{linear}"
        weight = self._take(f"{base}.weight")
        if weight is None:
            raise FlashFormatError(f"{self.source.description}: missing tensor {base}.weight")
        scales, biases = self._take(f"{base}.scales"), self._take(f"{base}.biases")
        bias = self._take(f"{base}.bias")
        return _Matrix(weight, scales, biases, self.bits, self.group_size), bias

    def layer(self, prefix: str, dtype: str, quant: Quantization | None):
        """(vectors, blobs) of one layer: vectors are [d_ffn, width] arrays with their storage
        dtype."""
        spec = self.spec
        parts: dict[str, tuple[mx.array, str]] = {}
        biases: dict[str, mx.array] = {}
        if spec.fused_gate_up:
            gate_up, bias = self.matrix(prefix, spec.fused_gate_up)
            half = gate_up.weight.shape[0] // 2
            gate, up = gate_up.rows(0, half), gate_up.rows(half, 2 * half)
            if bias is not None:
                biases["gate_bias"], biases["up_bias"] = bias[:half], bias[half:]
        else:
            gate = None
            if spec.gate:
                gate, b = self.matrix(prefix, spec.gate)
                if b is not None:
                    biases["gate_bias"] = b
            up, b = self.matrix(prefix, spec.up)
            if b is not None:
                biases["up_bias"] = b
        down, down_bias = self.matrix(prefix, spec.down)
        if gate is not None:
            parts.update(_vectors_of("gate", gate, dtype, quant))
        parts.update(_vectors_of("up", up, dtype, quant))
        parts.update(_vectors_of("down", _Matrix(down.dense().T), dtype, quant))
        for name, b in biases.items():
            parts[name] = (b.reshape(-1, 1), dtype)
        vectors = {name: _to_numpy(a, dt) for name, (a, dt) in parts.items()}
        dtypes = {name: dt for name, (_, dt) in parts.items()}
        blobs = {} if down_bias is None else {"down_bias": (_to_numpy(down_bias, dtype), dtype)}
        return vectors, dtypes, blobs


def _part_specs(
    d_model: int, gated: bool, has_bias: tuple[bool, bool], dtype: str, quant: Quantization | None
) -> list[PartSpec]:
    """Part list of a record, computed from shapes alone (for the up-front size estimate)."""
    specs = []
    for name in (["gate"] if gated else []) + ["up", "down"]:
        if quant is None:
            specs.append(PartSpec(name, d_model, dtype))
        else:
            specs += [
                PartSpec(name, d_model * quant.bits // 32, "uint32"),
                PartSpec(f"{name}.scales", d_model // quant.group_size, dtype),
                PartSpec(f"{name}.biases", d_model // quant.group_size, dtype),
            ]
    for name, present in zip(("gate_bias", "up_bias"), has_bias, strict=True):
        if present:
            specs.append(PartSpec(name, 1, dtype))
    return specs


TRUNK_SHARD_BYTES = 64 << 20  # small shards: only one shard of trunk tensors is in memory at a time


def _save_trunk(out: Path, names: list[str], load: Callable[[str], dict[str, mx.array]]) -> None:
    """Save the trunk as mlx-lm-style shards + index, loading each tensor just before its shard
    is written. ``load(name)`` gives the evaluated tensors stored for ``name`` (the tensor, or a
    quantized weight's packed words, scales and biases)."""
    shards: list[dict[str, mx.array]] = [{}]
    written, weight_map, total = [], {}, 0

    def flush() -> None:
        if shards[-1]:
            path = out / f".trunk-{len(written):05d}.safetensors"
            mx.save_safetensors(str(path), shards[-1], metadata={"format": "mlx"})
            with open(path, "rb+") as f:
                drop_written(f)
            written.append((path, list(shards[-1])))
            shards[-1] = {}

    for name in names:
        arrays = load(name)
        size = sum(a.nbytes for a in arrays.values())
        total += size
        if shards[-1] and sum(v.nbytes for v in shards[-1].values()) + size > TRUNK_SHARD_BYTES:
            flush()
        shards[-1].update(arrays)
    flush()
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(written) > 1 else "model.safetensors"
    for i, (path, keys) in enumerate(written):
        final = pattern.format(i + 1, len(written))
        os.replace(path, out / final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _check_free_disk(out: Path, needed: int) -> None:
    existing = next(p for p in out.parents if p.exists())  # OUT's parents may not exist yet
    free = shutil.disk_usage(existing).free
    if free < needed * 1.05 + (64 << 20):
        raise FlashError(
            f"{out.parent}: not enough free disk for the conversion: about "
            f"{format_size(needed)} needed, {format_size(free)} free"
        )


@dataclass
class _Plan:
    """What the converter decided from the source's config before writing anything."""

    config: dict
    spec: FFNSpec
    prefixes: list[str]  # every layer's FFN module name, e.g. model.layers.3.mlp
    trunk: dict[str, tuple[int, ...]]  # expected trunk parameters and their shapes
    d_model: int
    d_ffn: int
    dtype: str
    quant: Quantization | None
    has_bias: tuple[bool, bool]  # gate, up
    # trunk modules to quantize (path -> group size, bits), and the config entries saying so
    trunk_quant: dict[str, tuple[int, int]] = field(default_factory=dict)
    trunk_quant_config: dict = field(default_factory=dict)

    @property
    def source_quant(self) -> dict | None:
        return self.config.get("quantization")


def _plan(source: SourceModel, dtype: str | None, quant: Quantization | None, log) -> _Plan:
    """Shapes from mlx-lm's own (lazy) model; the store's dtype and quantization: as asked, else the
    source's (a quantized source stays quantized unless a dtype is asked for)."""
    config = {k: v for k, v in source.config.items() if k != "model_file"}
    spec = spec_for(config["model_type"])
    # parameters stay lazy (shapes only); sanitize may drop what the weights lack (a tied lm_head)
    model = model_after_sanitize(config, source.tensors)
    prefixes = ffn_prefixes(model, spec)
    params = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    d_ffn, d_model = params[f"{prefixes[0]}.{spec.fused_gate_up or spec.up}.weight"]
    d_ffn //= 2 if spec.fused_gate_up else 1
    source_quant = config.get("quantization")
    if quant is None and source_quant:
        if dtype is None:
            quant = Quantization(source_quant["bits"], source_quant["group_size"])
        else:
            log(
                f"  note: dequantizing the {source_quant['bits']}-bit source FFN to {dtype} "
                "as asked"
            )
    if dtype is None:
        declared = config.get("torch_dtype") or config.get("dtype")
        dtype = declared if declared in MX_DTYPES else ("float16" if source_quant else "float32")
    if quant and d_model % quant.group_size:
        raise UnsupportedModelError(
            f"d_model={d_model} is not a multiple of the quantization group size {quant.group_size}"
        )
    has_bias = (
        bool(spec.gate) and f"{prefixes[0]}.{spec.gate}.bias" in params,
        f"{prefixes[0]}.{spec.up}.bias" in params,
    )
    inside = tuple(p + "." for p in prefixes)
    trunk = {k: v for k, v in params.items() if not k.startswith(inside)}
    plan = _Plan(config, spec, prefixes, trunk, d_model, d_ffn, dtype, quant, has_bias)
    if quant and not source_quant:  # a quantized source's trunk stays as it is
        plan.trunk_quant, plan.trunk_quant_config = trunk_quantization(
            model, config, quant, prefixes
        )
    return plan


def trunk_quantization(
    model, config: dict, quant: Quantization, prefixes: list[str]
) -> tuple[dict[str, tuple[int, int]], dict]:
    """The trunk modules ``mlx_lm.convert -q`` quantizes (path -> group size, bits) and the
    config entries it writes, from mlx-lm's own ``quantize_model`` (its predicate, the model's
    ``quant_predicate``) run on the lazily built model: nothing is computed. FFN modules are left
    out: the store holds them, quantized per record."""
    with contextlib.redirect_stdout(io.StringIO()):  # its bits-per-weight line
        model, config = quantize_model(model, config, quant.group_size, quant.bits)
    chosen = {
        path: (m.group_size, m.bits)
        for path, m in model.named_modules()
        if "scales" in m and not _in_ffn(path, prefixes)
    }
    entry = {k: v for k, v in config["quantization"].items() if not _in_ffn(k, prefixes)}
    return chosen, {"quantization": entry, "quantization_config": entry}


def _in_ffn(path: str, prefixes: list[str]) -> bool:
    """Whether a module path is one of the FFN modules or inside one."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _size_estimate(plan: _Plan, layout: str, align: int) -> int:
    """Bytes the output will take on disk."""
    specs = _part_specs(plan.d_model, plan.spec.gated, plan.has_bias, plan.dtype, plan.quant)
    layer = sum(r.nbytes for r in plan_regions(specs, layout, align, 0, plan.d_ffn))
    store = (layer + REGION_ALIGN + plan.d_model * 4) * len(plan.prefixes)
    elements = sum(math.prod(shape) for shape in plan.trunk.values())
    return store + elements * DTYPES[plan.dtype]


def planned_manifest(
    source: SourceModel, dtype: str | None = None, layout: str = "bundled", align: int = 0
) -> tuple[Manifest, _Plan]:
    """The manifest converting ``source`` would write (no calibration, no checksums), and the
    plan, from shapes alone: what ``mlx_flash.forecast`` plans memory and reads with."""
    plan = _plan(source, dtype, None, lambda _: None)
    specs = _part_specs(plan.d_model, plan.spec.gated, plan.has_bias, plan.dtype, plan.quant)
    down_bias = f"{plan.prefixes[0]}.{plan.spec.down}.bias" in source.tensors
    layers, end = [], 0
    for i, prefix in enumerate(plan.prefixes):
        start = -(-end // REGION_ALIGN) * REGION_ALIGN
        regions = plan_regions(specs, layout, align, start, plan.d_ffn)
        end = regions[-1].offset + regions[-1].record_stride * plan.d_ffn
        blobs = {}
        if down_bias:  # written after the records, as the store writer does
            blobs["down_bias"] = Blob(end, plan.d_model, plan.dtype)
            end += plan.d_model * DTYPES[plan.dtype]
        layers.append(LayerEntry(i, prefix, start, end - start, "", tuple(regions), blobs))
    return _manifest(plan, source, layout, align, layers, end), plan


def _manifest(
    plan: _Plan, source: SourceModel, layout: str, align: int, layers: list, store_size: int
) -> Manifest:
    """The manifest of a store written (or planned) from ``plan``, without calibration."""
    return Manifest(
        model_type=plan.config["model_type"],
        d_model=plan.d_model,
        d_ffn=plan.d_ffn,
        gated=plan.spec.gated,
        activation=plan.spec.activation,
        layout=layout,
        dtype=plan.dtype,
        align=align,
        store_file=STORE_FILE,
        store_size=store_size,
        layers=tuple(layers),
        quantization=plan.quant,
        source=source.description,
    )


def _write_store(
    tmp: Path, source: SourceModel, plan: _Plan, layout: str, align: int, progress: bool
) -> list[LayerEntry]:
    """Every layer's FFN into the store, one layer in memory at a time."""
    reader = _LayerReader(source, plan.spec)
    entries = []
    with open(tmp / STORE_FILE, "wb") as f:
        writer = StoreWriter(f, layout, align)
        bar = tqdm(plan.prefixes, desc="FFN layers", unit="layer", disable=not progress)
        for i, prefix in enumerate(bar):
            vectors, dtypes, blobs = reader.layer(prefix, plan.dtype, plan.quant)
            entries.append(writer.write_layer(i, prefix, vectors, blobs, dtypes))
            del vectors, blobs
            _maybe_stop(f"layer:{i}")
        f.flush()
        os.fsync(f.fileno())
    return entries


def _write_trunk(tmp: Path, source: SourceModel, plan: _Plan) -> None:
    """Every tensor outside the FFN, in the store's dtype (packed quantized words as they are)."""
    inside = tuple(p + "." for p in plan.prefixes)
    names = []
    for name in source.tensors:
        if name.startswith(inside):
            raise FlashFormatError(f"{source.description}: unexpected FFN tensor {name}")
        packed_part = plan.source_quant and f"{name.rsplit('.', 1)[0]}.weight" in plan.trunk
        if name in plan.trunk or packed_part:
            names.append(name)
    missing = sorted(set(plan.trunk) - set(names))
    if missing:
        raise FlashFormatError(
            f"{source.description}: missing trunk tensors: {', '.join(missing[:5])}"
        )
    dtype = MX_DTYPES[plan.dtype]

    def load(name: str) -> dict[str, mx.array]:
        a = source.tensors.pop(name)()
        a = a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a
        module, _, leaf = name.rpartition(".")
        quantize = plan.trunk_quant.get(module) if leaf == "weight" else None
        if quantize is None:
            out = {name: a}
        else:  # as mlx-lm's QuantizedLinear / QuantizedEmbedding.from_... do
            group_size, bits = quantize
            w, scales, biases = mx.quantize(a, group_size=group_size, bits=bits)
            out = {name: w, f"{module}.scales": scales, f"{module}.biases": biases}
        mx.eval(out)  # the source tensor goes now, not when its shard is written
        return out

    _save_trunk(tmp, names, load)


def convert(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    layout: str = "bundled",
    align: int = 0,
    force: bool = False,
    calibration: str | Path | None = BUILTIN_CALIBRATION,
    sparsity: float | None = None,
    predictor_rank: int | None = None,
    placement: bool = True,
    settings: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert SRC (model dir, hub repo id or .gguf) into the flash model directory OUT.

    ``calibration``: a text file, or "builtin" (the default) for the packaged English sample, to
    measure activations on and train the predictors with (``calibrate.py``); None skips it (the
    model then runs dense unless a selector is given). ``sparsity``/``predictor_rank``/
    ``placement``: see ``calibrate``. ``settings``: options stored with the model
    (``mlx_flash.settings``).
    """
    out = Path(out).absolute()
    _check_arguments(out, force, layout, dtype, align)
    source = open_source(src)
    asked = Quantization(q_bits, q_group_size) if quantize else None
    if is_moe(source.config.get("model_type", "")):
        from .moe import convert_moe

        return convert_moe(
            source, out, dtype=dtype, quantize=asked, align=align, force=force, settings=settings,
            calibrate=calibration is not None, progress=progress, log=log,
        )  # fmt: skip
    plan = _plan(source, dtype, asked, log)
    _check_free_disk(out, _size_estimate(plan, layout, align))
    quant = f" {plan.quant.bits}-bit (group {plan.quant.group_size})" if plan.quant else ""
    log(f"Converting {source.description} -> {out}")
    log(
        f"  {plan.config['model_type']}: {len(plan.prefixes)} layers, d_model {plan.d_model}, "
        f"d_ffn {plan.d_ffn}, store {plan.dtype}{quant}, {layout}"
    )
    with staged(out, force) as tmp:
        manifest = _write_directory(tmp, source, plan, layout, align, settings, progress)
        if calibration is not None:
            from .calibrate import calibrate

            text = None if calibration == BUILTIN_CALIBRATION else calibration
            calibrate(
                tmp, text, sparsity=sparsity, ranks=predictor_rank, placement=placement,
                progress=progress, log=log,
            )  # fmt: skip
        _maybe_stop("finalize")
    trunk = sum(f.stat().st_size for f in trunk_files(out))
    log(
        f"  store {format_size(manifest.store_size)} ({manifest.neuron_bytes()} B per neuron), "
        f"trunk {format_size(trunk)}"
    )
    return out


def _write_directory(
    tmp: Path,
    source: SourceModel,
    plan: _Plan,
    layout: str,
    align: int,
    settings: dict | None,
    progress: bool,
) -> Manifest:
    """The whole flash model directory but its calibration: store, trunk, config with the
    mlx-lm entry point, tokenizer, and last the manifest that describes them."""
    entries = _write_store(tmp, source, plan, layout, align, progress)
    write_beside_store(tmp, source, plan, settings)
    store_size = (tmp / STORE_FILE).stat().st_size
    manifest = _manifest(plan, source, layout, align, entries, store_size)
    manifest.save(tmp)
    return manifest


def write_beside_store(tmp: Path, source: SourceModel, plan, settings: dict | None) -> None:
    """What a flash directory holds besides its store and manifest: the trunk, the config with the
    mlx-lm entry point, the tokenizer (``plan``: a dense or a MoE plan)."""
    _maybe_stop("trunk")
    _write_trunk(tmp, source, plan)
    config = {**plan.config, **plan.trunk_quant_config}
    save_config(write_entry_point(tmp, config, settings), tmp / "config.json")
    source.write_tokenizer(tmp)


def _check_arguments(out: Path, force: bool, layout: str, dtype: str | None, align: int) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FlashError(f"{out}: exists and is not empty; pass --force to replace it")
    if layout not in ("bundled", "unbundled"):
        raise OptionError(f"unknown layout {layout!r} (bundled or unbundled)")
    if dtype is not None and dtype not in MX_DTYPES:
        raise OptionError(f"unknown dtype {dtype!r} (float16, bfloat16 or float32)")
    if align < 0 or (align and align & (align - 1)):
        raise OptionError(f"--align must be 0 or a power of two, not {align}")
