"""Loading a mixture-of-experts flash directory: expert slots planned from the budget, each of
mlx-lm's ``SwitchGLU`` modules bound to its layer's slots and swapped for a ``FlashExperts``.

``loader`` calls ``prepare_moe_runtime`` for a MoE manifest when mlx-lm builds the model (before any
weight is loaded) and ``install_experts`` right after, as it does for dense models. The rest of
these models (attention, routers, shared experts, dense layers) is trunk, loaded by mlx-lm.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchGLU

from .budget import model_facts
from .buffer import NeuronBuffer
from .costmodel import cost_model_for
from .errors import FlashFormatError
from .expert_budget import ExpertPlan, plan_experts
from .expert_policy import make_policy
from .experts import ExpertCache, ExpertState, FlashExperts, bind_slots
from .limit import metered_loader
from .loader import FlashRuntime, default_compute_dtype, open_store
from .manifest import MX_DTYPES, Manifest, trunk_files
from .options import FlashOptions
from .selectors import Choice, Selection
from .telemetry import Telemetry
from .trace import TraceRecorder


class Routers:
    """The selector of a MoE model: its own routers, inside the trunk (nothing to hold or call)."""

    name = "router"
    nbytes = 0
    needs_input = True
    exact_gate = False

    def __call__(self, layer: int, x: mx.array) -> Selection:
        raise TypeError("a MoE model's experts are chosen by its own routers")


ROUTED = Choice("router", None, "resident", None, "mixture of experts: the model's routers choose")


def prepare_moe_runtime(
    directory: Path, manifest: Manifest, config: dict, options: FlashOptions, model
) -> FlashRuntime:
    """Plan the expert slots from the freshly built ``model``, bind its SwitchGLUs to them (no
    record is read) and open the store."""
    dtype = MX_DTYPES[options.compute_dtype or default_compute_dtype(manifest)]
    facts = model_facts(model, config, manifest, trunk_files(directory), dtype, options)
    plan = plan_experts(facts, config, manifest, options)
    return open_experts(
        directory, manifest, options, plan, dtype, find_switches(model, manifest, directory)
    )


def open_experts(
    directory: Path,
    manifest: Manifest,
    options: FlashOptions,
    plan: ExpertPlan,
    dtype: mx.Dtype,
    switches: list[SwitchGLU],
) -> FlashRuntime:
    """The runtime of a MoE store: its reader, and one FlashExperts per MoE layer with
    ``plan.expert_slots`` slots bound into ``switches`` (the bench passes bare SwitchGLUs)."""
    cost = cost_model_for(directory)
    record = manifest.layers[0].regions[0].record_size
    threads = options.threads or cost.best_threads(record)  # whole experts: the disk decides
    reader = open_store(directory, manifest, options, cost, threads)
    try:
        moe = manifest.moe
        telemetry = Telemetry(manifest.n_layers, moe.n_experts, options.telemetry, experts=True)
        runtime = FlashRuntime(
            directory, manifest, options, None, reader, plan, Routers(), ROUTED, telemetry, dtype,
            cost,
        )  # fmt: skip
        if options.record_trace:
            meta = {"model": str(directory), "layers": [e.layer for e in moe.layers]}
            runtime.trace = TraceRecorder("experts", moe.n_experts, manifest.n_layers, meta)
        runtime.layers = [_make_layer(runtime, i, switch) for i, switch in enumerate(switches)]
    except BaseException:
        reader.close()
        raise
    return runtime


def find_switches(model, manifest: Manifest, directory: Path) -> list[SwitchGLU]:
    """The model's SwitchGLU of every MoE layer of the store, checked against it: config.json
    must describe the experts the store holds (the trunk cannot tell: they are not in it)."""
    modules = dict(model.named_modules())
    moe, where = manifest.moe, f"{directory / 'config.json'}"
    expected = (moe.n_experts, moe.d_expert, manifest.d_model)
    switches = []
    for entry in manifest.layers:
        switch = modules.get(entry.prefix)
        if not isinstance(switch, SwitchGLU):
            raise FlashFormatError(
                f"{where}: the model has no experts at {entry.prefix}, where the store "
                f"({manifest.store_file}) has MoE layer {entry.index}"
            )
        shape = tuple(switch.gate_proj.weight.shape)
        if shape != expected:
            raise FlashFormatError(
                f"{where}: the experts at {entry.prefix} are {shape} (experts, width, d_model) "
                f"but the store ({manifest.store_file}) holds {expected}"
            )
        switches.append(switch)
    stored = {entry.prefix for entry in manifest.layers}
    extra = sorted(p for p, m in modules.items() if isinstance(m, SwitchGLU) and p not in stored)
    if extra:
        raise FlashFormatError(f"{where}: experts at {extra[:3]} are not in the store")
    return switches


def _make_layer(runtime: FlashRuntime, index: int, switch: SwitchGLU) -> FlashExperts:
    """A MoE layer's FlashExperts: preallocated slots (empty until a token needs them) bound into
    mlx-lm's SwitchGLU."""
    manifest, moe = runtime.manifest, runtime.manifest.moe
    packed = {"uint32": mx.uint32, "uint8": mx.uint8}
    parts = {
        p.name: (p.length, packed.get(p.dtype, runtime.compute_dtype))
        for p in manifest.layers[index].parts()
    }
    load = metered_loader(runtime, index)
    buffer = NeuronBuffer(runtime.plan.expert_slots, parts, load, moe.n_experts)
    bind_slots(switch, buffer, moe.layers[index])
    cache = ExpertCache(buffer, make_policy(runtime.options.expert_policy, moe.n_experts))
    return FlashExperts(runtime, ExpertState(index, moe.layers[index].layer, switch, cache))


def install_experts(model, runtime: FlashRuntime):
    """Swap each bound SwitchGLU of a freshly built model for its FlashExperts."""
    modules = dict(model.named_modules())
    for entry, layer in zip(runtime.manifest.layers, runtime.layers, strict=True):
        parent, attr = entry.prefix.rsplit(".", 1)
        setattr(modules[parent], attr, layer)
    model.flash = runtime
    return model
