"""Convert a mixture-of-experts model: one store record per expert per layer.

Why this shape: a token routed to an expert needs all of that expert's gate, up and down weights, so
a record holds exactly those (and the expert's biases), contiguous, and one read fetches an expert.
Records keep the source's quantization (affine stays packed, mxfp4 stays mxfp4): the runtime runs
mlx-lm's own ``SwitchGLU`` on them, so packed weights are what it computes with. Everything that is
not a routed expert (attention, routers, shared experts, dense FFN layers such as DeepSeek's first
ones) goes to the trunk, which stays in DRAM.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import infer_quant_config
from tqdm import tqdm

from mlx_flash.runtime.adapters import build_model
from mlx_flash.runtime.errors import FlashFormatError, UnsupportedModelError
from mlx_flash.runtime.files import staged
from mlx_flash.runtime.manifest import (
    EXPERT_LINEARS,
    EXPERT_PARAMS,
    MX_DTYPES,
    PACKED,
    STORE_FILE,
    ExpertLayer,
    LayerEntry,
    LinearQuant,
    Manifest,
    MoELayout,
    Quantization,
)
from mlx_flash.runtime.sizes import format_size

from .source import SourceModel
from .writer import StoreWriter


@dataclass
class MoEPlan:
    """What the converter decided before writing anything. ``prefixes`` are the SwitchGLU module
    paths (the tensors under them go to the store), ``trunk`` the other parameters' shapes."""

    config: dict
    layers: list[int]  # the model layer of each SwitchGLU
    prefixes: list[str]
    trunk: dict[str, tuple[int, ...]]
    d_model: int
    d_expert: int
    n_experts: int
    top_k: int
    activation: str
    dtype: str  # of the float parts (trunk and records)
    quantize: Quantization | None  # float experts are quantized (affine) as asked
    dequantize: bool  # quantized experts are stored as floats (a dtype was asked)
    description: str = ""  # the source, for messages
    # trunk modules to quantize under --quantize (path -> group size, bits) and the config entries
    trunk_quant: dict[str, tuple[int, int]] = field(default_factory=dict)
    trunk_quant_config: dict = field(default_factory=dict)

    @property
    def source_quant(self) -> dict | None:
        return self.config.get("quantization")


def moe_plan(source: SourceModel, dtype: str | None, quantize: Quantization | None, log) -> MoEPlan:
    """Shapes from mlx-lm's own (lazy) model; the records' dtype and quantization: the source's
    unless a dtype (dequantize) or --quantize (float experts only) is asked for."""
    config = {k: v for k, v in source.config.items() if k != "model_file"}
    model = build_model(config)  # parameters stay lazy: shapes only
    switches = [(p, m) for p, m in model.named_modules() if isinstance(m, SwitchGLU)]
    switches.sort(key=lambda s: _layer_number(s[0]))
    if not switches:
        raise UnsupportedModelError(f"{source.description}: no SwitchGLU experts in the model")
    prefixes = [p for p, _ in switches]
    n_experts, d_expert, d_model = switches[0][1].gate_proj.weight.shape
    params = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    inside = tuple(p + "." for p in prefixes)
    source_quant = config.get("quantization")
    dequantize = bool(source_quant) and dtype is not None
    if dequantize:
        log(f"  note: dequantizing the quantized source experts to {dtype} as asked")
    if dtype is None:
        declared = config.get("torch_dtype") or config.get("dtype")
        dtype = declared if declared in MX_DTYPES else ("float16" if source_quant else "float32")
    activation = type(switches[0][1].activation).__name__
    plan = MoEPlan(
        config=config,
        layers=[_layer_number(p) for p in prefixes],
        prefixes=prefixes,
        trunk={k: v for k, v in params.items() if not k.startswith(inside)},
        d_model=d_model,
        d_expert=d_expert,
        n_experts=n_experts,
        top_k=int(model.args.num_experts_per_tok),
        activation="swiglu_oai" if activation == "SwigluOAI" else "swiglu",
        dtype=dtype,
        quantize=None if source_quant else quantize,
        dequantize=dequantize,
        description=source.description,
    )
    if plan.quantize:  # the trunk is quantized as mlx-lm quantizes it, like a dense model's
        from .converter import trunk_quantization

        plan.trunk_quant, plan.trunk_quant_config = trunk_quantization(
            model, config, plan.quantize, prefixes
        )
    return plan


def _layer_number(path: str) -> int:
    match = re.search(r"\.layers\.(\d+)\.", path)
    if match is None:
        raise UnsupportedModelError(f"cannot tell which layer the experts at {path} belong to")
    return int(match.group(1))


def _linear_quant(
    plan: MoEPlan, path: str, in_dims: int, weight: mx.array, scales: mx.array | None
) -> LinearQuant | None:
    """How the source packed one expert projection, decided as mlx-lm's ``load_model`` does: the
    config's entry for the path, else inferred from the tensors' shapes."""
    if scales is None:
        return None
    q = (plan.source_quant or {}).get(path)
    if not isinstance(q, dict):
        module = SimpleNamespace(weight=SimpleNamespace(shape=(in_dims,)))
        q = infer_quant_config(path, module, {f"{path}.scales": scales, f"{path}.weight": weight})
    return LinearQuant(q.get("mode", "affine"), q["bits"], q["group_size"])


def _expert_linear(
    plan: MoEPlan, path: str, in_dims: int, tensors: dict[str, mx.array]
) -> tuple[dict[str, mx.array], LinearQuant | None]:
    """One projection's stacked tensors ``{param: [E, ...]}`` as the store keeps them, and their
    quantization: the source's, dequantized (a dtype was asked) or quantized (--quantize)."""
    if "weight" not in tensors:
        raise FlashFormatError(f"{plan.description}: missing tensor {path}.weight")
    if "global_scale" in tensors:
        raise UnsupportedModelError(f"{path}: nvfp4 experts with a global scale")
    quant = _linear_quant(plan, path, in_dims, tensors["weight"], tensors.get("scales"))
    out = dict(tensors)
    if quant is not None and plan.dequantize:
        out["weight"] = mx.dequantize(
            tensors["weight"],
            tensors["scales"],
            tensors.get("biases"),
            group_size=quant.group_size,
            bits=quant.bits,
            mode=quant.mode,
        )
        out.pop("scales"), out.pop("biases", None)
        quant = None
    elif quant is None and plan.quantize is not None:
        q = plan.quantize
        weight = out["weight"].astype(MX_DTYPES[plan.dtype])
        out["weight"], out["scales"], out["biases"] = mx.quantize(weight, q.group_size, q.bits)
        quant = LinearQuant("affine", q.bits, q.group_size)
    return out, quant


def _storage(a: mx.array, dtype: str) -> np.ndarray:
    """An MLX array as numpy in the store's form of ``dtype`` (bfloat16 as its uint16 bits)."""
    if dtype in PACKED:
        return np.array(a)
    a = a.astype(MX_DTYPES[dtype])
    return np.array(a.view(mx.uint16) if dtype == "bfloat16" else a)


def _store_dtype(param: str, a: mx.array, floats: str) -> str:
    if param == "weight" and a.dtype == mx.uint32:
        return "uint32"
    if param == "scales" and a.dtype == mx.uint8:
        return "uint8"
    return floats


def expert_records(
    source: SourceModel, plan: MoEPlan, index: int
) -> tuple[dict[str, np.ndarray], dict[str, str], ExpertLayer]:
    """One MoE layer's records: each part as [n_experts, elements] in its storage dtype, the
    parts' dtypes, and the layer's manifest entry (shapes, quantization)."""
    prefix = plan.prefixes[index]
    vectors, dtypes, shapes, quants = {}, {}, {}, {}
    for linear in EXPERT_LINEARS:
        path = f"{prefix}.{linear}"
        loaded = {
            param: source.tensors.pop(f"{path}.{param}")()
            for param in (*EXPERT_PARAMS, "global_scale")
            if f"{path}.{param}" in source.tensors
        }
        in_dims = plan.d_expert if linear == "down_proj" else plan.d_model
        tensors, quants[linear] = _expert_linear(plan, path, in_dims, loaded)
        for param, a in tensors.items():
            name = f"{linear}.{param}"
            if a.shape[0] != plan.n_experts:
                raise FlashFormatError(
                    f"{plan.description}: {path}.{param} has shape {a.shape}, expected "
                    f"{plan.n_experts} experts"
                )
            dtypes[name] = _store_dtype(param, a, plan.dtype)
            shapes[name] = tuple(a.shape[1:])
            vectors[name] = _storage(a, dtypes[name]).reshape(plan.n_experts, -1)
    return vectors, dtypes, ExpertLayer(plan.layers[index], shapes, quants)


def _write_store(
    tmp: Path, source: SourceModel, plan: MoEPlan, align: int, progress: bool
) -> tuple[list[LayerEntry], list[ExpertLayer]]:
    """Every MoE layer's experts into the store, one layer in memory at a time."""
    from .converter import _maybe_stop

    entries, layers = [], []
    with open(tmp / STORE_FILE, "wb") as f:
        writer = StoreWriter(f, "bundled", align)
        bar = tqdm(plan.prefixes, desc="MoE layers", unit="layer", disable=not progress)
        for i, prefix in enumerate(bar):
            vectors, dtypes, layer = expert_records(source, plan, i)
            entries.append(writer.write_layer(i, prefix, vectors, {}, dtypes))
            layers.append(layer)
            del vectors
            _maybe_stop(f"layer:{i}")
        f.flush()
        os.fsync(f.fileno())
    return entries, layers


def size_estimate(plan: MoEPlan) -> int:
    """Bytes the output will take on disk (the experts at the bits they will have)."""
    itemsize = MX_DTYPES[plan.dtype].size
    bits, group = 8 * itemsize, 0
    if plan.quantize is not None:
        bits, group = plan.quantize.bits, plan.quantize.group_size
    elif plan.source_quant and not plan.dequantize:
        bits, group = plan.source_quant["bits"], plan.source_quant["group_size"]
    per_weight = bits / 8 + (2 * itemsize / group if group else 0)
    experts = 3 * plan.n_experts * plan.d_expert * plan.d_model * len(plan.prefixes)
    trunk = sum(math.prod(shape) for shape in plan.trunk.values()) * itemsize
    return int(experts * per_weight) + trunk


def convert_moe(
    source: SourceModel,
    out: Path,
    *,
    dtype: str | None,
    quantize: Quantization | None,
    align: int,
    force: bool,
    settings: dict | None,
    progress: bool,
    log: Callable[[str], None],
    calibrate: bool = False,
) -> Path:
    """Convert a MoE ``source`` into the flash model directory ``out`` (see the module docstring).
    Calibration does not apply: the model's own routers choose the experts."""
    from .converter import _check_free_disk

    if calibrate:
        log("  note: MoE models are not calibrated (their own routers choose the experts)")
    plan = moe_plan(source, dtype, quantize, log)
    _check_free_disk(out, size_estimate(plan))
    log(f"Converting {source.description} -> {out}")
    log(
        f"  {plan.config['model_type']}: {len(plan.prefixes)} MoE layers of {plan.n_experts} "
        f"experts (top {plan.top_k}), d_model {plan.d_model}, expert width {plan.d_expert}"
    )
    with staged(out, force) as tmp:
        manifest = _write_directory(tmp, source, plan, align, settings, progress)
    record = manifest.layers[0].regions[0].record_size
    log(f"  store {format_size(manifest.store_size)} ({record} B per expert record)")
    return out


def _write_directory(
    tmp: Path,
    source: SourceModel,
    plan: MoEPlan,
    align: int,
    settings: dict | None,
    progress: bool,
) -> Manifest:
    """Store, trunk, config with the mlx-lm entry point, tokenizer, and last the manifest."""
    from .converter import write_beside_store

    entries, layers = _write_store(tmp, source, plan, align, progress)
    write_beside_store(tmp, source, plan, settings)
    manifest = Manifest(
        model_type=plan.config["model_type"],
        d_model=plan.d_model,
        d_ffn=plan.d_expert,
        gated=True,
        activation=plan.activation,
        layout="bundled",
        dtype=plan.dtype,
        align=align,
        store_file=STORE_FILE,
        store_size=(tmp / STORE_FILE).stat().st_size,
        layers=tuple(entries),
        source=source.description,
        moe=MoELayout(plan.n_experts, plan.top_k, plan.d_expert, plan.activation, tuple(layers)),
    )
    manifest.save(tmp)
    return manifest
