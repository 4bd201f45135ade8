"""The memory plan of a mixture-of-experts model: what the budget leaves after the trunk, the KV
cache and temporaries becomes expert slots, the same number in every MoE layer.

An expert slot holds one expert's record as computed with: floats in the compute dtype, packed
words and fp4/fp8 scales as stored. Fewer slots than experts per token still run (the layer then
computes in chunks) but read every expert every token, so the plan asks for at least top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .budget import BudgetPlan, ModelFacts, budget_bytes, context_tokens, prefill_temporaries
from .errors import BudgetError
from .manifest import Manifest, part_bytes
from .options import FlashOptions
from .sizes import format_size


@dataclass(frozen=True)
class ExpertPlan(BudgetPlan):
    """A ``BudgetPlan`` whose buffers are expert slots: ``window_rows`` slots in each of the
    ``n_layers`` MoE layers, ``slot_bytes`` for one slot in all of them."""

    n_experts: int = 0
    top_k: int = 0
    slot_bytes: int = 0

    @property
    def expert_slots(self) -> int:
        return self.window_rows

    @property
    def buffers(self) -> int:
        return self.expert_slots * self.slot_bytes

    @property
    def ffn_share(self) -> float:
        """Share of each MoE layer's experts the slots hold."""
        return self.expert_slots / self.n_experts

    def as_dict(self) -> dict:
        return {**super().as_dict(), "expert_slots": self.expert_slots}

    def describe(self) -> str:
        f = format_size
        return (
            f"budget {f(self.total)}: trunk {f(self.trunk)}, KV cache {f(self.kv_cache)}, expert "
            f"slots {f(self.buffers)} ({self.expert_slots} of {self.n_experts} experts in each of "
            f"{self.n_layers} MoE layers), temporaries {f(self.temporaries)}"
        )


def slot_bytes(manifest: Manifest, itemsize: int) -> int:
    """Bytes of one expert slot in every MoE layer, floats held with ``itemsize`` bytes."""
    return sum(part_bytes(p, itemsize) for layer in manifest.layers for p in layer.parts())


def moe_temporaries(facts: ModelFacts, config: dict, manifest: Manifest, options: FlashOptions):
    """Peak activations of a prefill step. A MoE layer copies each token's input per chosen expert
    (sorted), and holds per (token, expert) its up, gate and activation rows and two outputs:
    ``top_k * (4 d_model + 3 d_expert)`` values a token, written as an FFN width for the dense
    formula; dense layers and shared experts are as wide as their FFN."""
    moe = manifest.moe
    width = -(-moe.top_k * (4 * facts.d_model + 3 * moe.d_expert) // 3) + moe.n_experts
    dense = (config.get(k) or 0 for k in ("intermediate_size", "shared_expert_intermediate_size"))
    return prefill_temporaries(replace(facts, d_ffn=max(width, *dense)), options)


def plan_experts(
    facts: ModelFacts, config: dict, manifest: Manifest, options: FlashOptions
) -> ExpertPlan:
    """Expert slots per MoE layer the budget allows; a budget that cannot hold top-k is refused
    with what it needs. ``options.ffn_cache`` fixes the share of experts instead."""
    moe, total = manifest.moe, budget_bytes(options)
    per_slot = slot_bytes(manifest, facts.itemsize)
    fixed = {
        "trunk": facts.trunk,
        "KV cache": facts.kv_bytes(context_tokens(options)),
        "temporaries": moe_temporaries(facts, config, manifest, options),
    }
    least = min(moe.top_k, moe.n_experts)
    slots = min(moe.n_experts, max(0, total - sum(fixed.values())) // per_slot)
    if options.ffn_cache is not None:
        slots = min(slots, max(least, round(options.ffn_cache * moe.n_experts)))
    if slots < least:
        parts = ", ".join(f"{k} {format_size(v)}" for k, v in fixed.items())
        raise BudgetError(
            f"memory budget {format_size(total)} is too small: this model needs at least "
            f"{format_size(sum(fixed.values()) + least * per_slot)} ({parts}, {least} expert "
            f"slots per MoE layer {format_size(least * per_slot)})"
        )
    return expert_plan(manifest, facts.itemsize, slots, total, fixed)


def expert_plan(
    manifest: Manifest, itemsize: int, slots: int, total: int = 0, fixed: dict | None = None
) -> ExpertPlan:
    """The plan of ``slots`` expert slots per MoE layer beside ``fixed`` bytes (trunk, KV cache,
    temporaries; none for the bench's FFN-only harness)."""
    fixed = fixed or {}
    return ExpertPlan(
        total=total,
        trunk=fixed.get("trunk", 0),
        kv_cache=fixed.get("KV cache", 0),
        temporaries=fixed.get("temporaries", 0),
        selector=0,
        neuron_bytes=slot_bytes(manifest, itemsize) // manifest.n_layers,
        n_layers=manifest.n_layers,
        d_ffn=manifest.moe.n_experts,
        pinned_rows=0,
        window_rows=slots,
        n_experts=manifest.moe.n_experts,
        top_k=manifest.moe.top_k,
        slot_bytes=slot_bytes(manifest, itemsize),
    )
