"""FlashExperts: mlx-lm's ``SwitchGLU`` with its experts in preallocated slots, streamed from flash.

Why this shape: every MoE architecture mlx-lm runs hands ``SwitchGLU(x, indices)`` its router's
expert ids, so replacing that module alone keeps each model's routing exact. The ``SwitchGLU``
object itself is kept: its stacked expert parameters ``[E, ...]`` become slot arrays ``[S, ...]``,
views of a ``NeuronBuffer``'s preallocated rows (one row per expert), and it is called with the ids
mapped from experts to slots (same shape and dtype). It then runs the same ``gather_mm`` or
``gather_qmm``, sort decision and activation as the plain model: its result is bit-identical.

One call, top to bottom:
1. the router's ids (its sync point) and their union over the call's tokens (a decode batch, or a
   prompt);
2. if the union fits the slots: evict (by policy) resident experts this call does not need, read
   the misses in one parallel read into the freed slots, call the ``SwitchGLU`` once on slot ids;
3. else (a long prompt or a large batch): chunks of at most S experts, resident ones first, each
   expert loaded once; each chunk computes exactly its (token, k) pairs with ``SwitchGLU``'s own
   ops (``_sorted_chunks``: on the CPU, ``gather_mm``'s float32 rounding depends on how its input
   was built, so the input is built as ``SwitchGLU`` builds it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from .buffer import NeuronBuffer
from .expert_policy import Policy
from .manifest import EXPERT_LINEARS, ExpertLayer, LinearQuant
from .telemetry import LayerStats

SORT_PAIRS = 64  # SwitchGLU sorts its (token, k) pairs by expert from this many on


class ExpertCache:
    """One MoE layer's resident experts: ``buffer`` rows are slots, ``policy`` picks evictions."""

    def __init__(self, buffer: NeuronBuffer, policy: Policy, in_place: bool = True) -> None:
        # in_place=False: delete + append (holes filled by moving whole experts), for the bench
        self.buffer, self.policy, self.in_place = buffer, policy, in_place

    @property
    def capacity(self) -> int:
        return self.buffer.capacity

    def resident(self, experts: np.ndarray) -> np.ndarray:
        return self.buffer.resident(experts)

    def slot_ids(self, experts: np.ndarray) -> mx.array:
        """``experts`` (any shape) mapped to their slots, as the uint32 ids SwitchGLU takes."""
        slots = self.buffer.slots_of(experts).reshape(experts.shape)
        return mx.array(slots.astype(np.uint32))

    def ensure(self, needed: np.ndarray, counts: np.ndarray, stats: LayerStats) -> None:
        """Make ``needed`` (sorted, distinct, at most ``capacity``) resident, evicting by policy
        among the other experts, in one parallel read; count it in ``stats``."""
        missing = needed[~self.buffer.resident(needed)]
        stats.requested += needed.size
        stats.computed += needed.size
        stats.hits += needed.size - missing.size
        if missing.size:
            others = np.setdiff1d(self.buffer.neurons, needed, assume_unique=True)
            room = self.capacity - self.buffer.n_used
            drop = self.policy.victims(others, missing.size - room)
            if self.in_place:
                stats.read += self.buffer.replace(drop, missing)
            else:
                self.buffer.delete(drop)
                stats.read += self.buffer.append(missing)
            stats.dropped += drop.size
        self.policy.touch(needed, counts)


def bind_slots(switch: SwitchGLU, buffer: NeuronBuffer, layer: ExpertLayer) -> None:
    """Point ``switch``'s expert parameters at ``buffer``'s slots.

    The arrays are evaluated views of the preallocated rows: they keep their identity and memory
    for the whole run, and show whatever the rows hold when a computation runs (hence the fences).
    """
    rows = buffer.arrays(buffer.capacity)
    bound = {name: a.reshape(buffer.capacity, *layer.shapes[name]) for name, a in rows.items()}
    mx.eval(bound)
    for linear in EXPERT_LINEARS:
        params = {
            name.partition(".")[2]: a for name, a in bound.items() if name.startswith(linear + ".")
        }
        setattr(switch, linear, _slot_linear(params, layer.quant[linear]))


def _slot_linear(params: dict[str, mx.array], quant: LinearQuant | None) -> nn.Module:
    """mlx-lm's (Quantized)SwitchLinear over slot arrays, built without its random initial
    weights (which would draw from the global random state)."""
    cls = SwitchLinear if quant is None else QuantizedSwitchLinear
    linear = cls.__new__(cls)
    nn.Module.__init__(linear)
    if quant is not None:
        linear.group_size, linear.bits, linear.mode = quant.group_size, quant.bits, quant.mode
        linear.biases, linear.global_scale = None, None
    for name, a in params.items():
        setattr(linear, name, a)
    if quant is not None:
        linear.freeze()
    return linear


@dataclass
class ExpertState:
    """One MoE layer's streaming state: its place among the MoE layers, mlx-lm's SwitchGLU (bound
    to the slots) and the slot cache."""

    position: int
    layer: int
    switch: SwitchGLU
    cache: ExpertCache


class FlashExperts(nn.Module):
    """Drop-in for a ``SwitchGLU`` whose experts stream from flash (see the module docstring).

    ``runtime`` gives ``guard`` (one thread per model), ``telemetry`` and ``trace`` (or None).
    """

    def __init__(self, runtime: Any, state: ExpertState) -> None:
        super().__init__()
        self._runtime = runtime
        self._state = state

    @property
    def cache(self) -> ExpertCache:
        return self._state.cache

    def allocate(self) -> None:
        """The loader's hook after the trunk's cast: the slots already exist (bound into mlx-lm's
        SwitchGLU when the layer was built), so there is nothing left to allocate."""

    @property
    def switch(self) -> SwitchGLU:
        """mlx-lm's SwitchGLU, its parameters bound to the slots."""
        return self._state.switch

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        rt, st = self._runtime, self._state
        with rt.guard.layer(st.position):
            mx.eval(x, indices)
            ids = np.array(indices)
            if st.position == 0:
                prompt = x.shape[-2] > 1 if x.ndim >= 3 else x.shape[0] > 1
                rt.telemetry.begin("prefill" if prompt else "decode", ids.size // ids.shape[-1])
            start = time.perf_counter()
            stats = LayerStats()
            needed, counts = np.unique(ids, return_counts=True)
            if needed.size <= st.cache.capacity:
                st.cache.ensure(needed, counts, stats)
                y = st.switch(x, st.cache.slot_ids(ids))
            elif ids.size >= SORT_PAIRS:
                y = self._sorted_chunks(x, ids, self._chunks(needed, counts), stats)
            else:
                y = self._masked_chunks(x, ids, self._chunks(needed, counts), stats)
            mx.eval(y)
            st.cache.buffer.settled()
            stats.seconds = time.perf_counter() - start
            rt.telemetry.record(st.position, stats)
            if rt.trace is not None:
                rt.trace.add(st.position, ids.reshape(-1, ids.shape[-1]))
            return y

    def _chunks(self, needed: np.ndarray, counts: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        """``needed`` in chunks of at most S experts (with their token counts), resident first."""
        resident = self._state.cache.resident(needed)
        order = np.concatenate([np.flatnonzero(resident), np.flatnonzero(~resident)])
        size = self._state.cache.capacity
        picks = [np.sort(order[c : c + size]) for c in range(0, order.size, size)]
        return [(needed[p], counts[p]) for p in picks]

    def _sorted_chunks(self, x: mx.array, ids: np.ndarray, chunks: list, stats: LayerStats):
        """The sorted path chunk by chunk: each chunk takes its pairs in SwitchGLU's own order
        (the same ``argsort`` of the same ids), so every expert's group of rows is the plain
        call's, and builds its input with SwitchGLU's ops; the outputs are put back in order."""
        st = self._state
        k, flat = ids.shape[-1], ids.reshape(-1)
        rows = mx.expand_dims(x, (-2, -3)).flatten(0, -3)
        order = np.array(mx.argsort(mx.array(flat)))
        outs, taken = [], []
        for experts, counts in chunks:
            st.cache.ensure(experts, counts, stats)
            pairs = order[np.isin(flat[order], experts)]
            x_chunk = rows[mx.array((pairs // k).astype(np.uint32))]
            y = _sorted_switch(st.switch, x_chunk, st.cache.slot_ids(flat[pairs]))
            st.cache.buffer.fence(y)
            outs.append(y)
            taken.append(pairs)
        back = np.argsort(np.concatenate(taken))
        return mx.concatenate(outs)[mx.array(back.astype(np.uint32))].reshape(*ids.shape, -1)

    def _masked_chunks(self, x: mx.array, ids: np.ndarray, chunks: list, stats: LayerStats):
        """The unsorted path (few pairs, more experts than slots): each chunk runs the plain call
        with the other pairs pointed at one of its experts, and keeps its own pairs' rows."""
        st = self._state
        out = None
        for experts, counts in chunks:
            st.cache.ensure(experts, counts, stats)
            inside = np.isin(ids, experts)
            y = st.switch(x, st.cache.slot_ids(np.where(inside, ids, experts[0])))
            out = y if out is None else mx.where(mx.array(inside)[..., None], y, out)
            st.cache.buffer.fence(out)
        return out


def _sorted_switch(switch: SwitchGLU, x: mx.array, idx: mx.array) -> mx.array:
    """``SwitchGLU.__call__``'s body for pairs already sorted by expert."""
    x_up = switch.up_proj(x, idx, sorted_indices=True)
    x_gate = switch.gate_proj(x, idx, sorted_indices=True)
    return switch.down_proj(switch.activation(x_up, x_gate), idx, sorted_indices=True)
