"""FlashFFN: the drop-in FFN module whose neurons live in flash and stream into neuron buffers.

One token's pass through a layer (``_decode``), top to bottom:
1. the selector picks neuron ids from the layer's input (the union over a batch of sequences);
2. pinned neurons (the hottest, resident for the whole run) are computed from their buffer;
3. the others go through the sliding window, which says which are missing (load) and which left it
   (drop); the buffer deletes those and appends these, reading straight into its rows;
4. the FFN is computed on the buffer's rows and the partial outputs are summed.

A prompt (many tokens per sequence, ``_prefill``) and a selection larger than the buffer stream the
needed neurons through the buffer in chunks of its capacity, a few large reads each, and sum the
partial outputs. That is exact; per-token selection over hundreds of prompt tokens would select
nearly every neuron anyway. A short multi-token call (at most ``MAX_UNION_TOKENS`` per sequence:
speculative decoding's verify step, a short prompt) is a decode step over the union of its tokens'
selections, unless the disk's cost model says streaming the FFN is cheaper (``_union_pays``).

Step 4 multiplies every resident row by default: rows the selector did not pick this token are
neurons active in the last k tokens, so computing them only moves the result towards the dense FFN
(exactly so for ReLU-family models, where an inactive neuron contributes zero) and costs no I/O.
``compute_rows="selected"`` multiplies only this token's selection. With a selector that computed
act(gate) exactly (``Selection.gate``), the FFN reuses it and the buffers hold no gate rows.

Large state lives in ``LayerState`` (a plain object), not in MLX parameters, so strict loading of
the trunk still checks every trunk weight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .buffer import NeuronBuffer
from .errors import FlashError
from .ffn import partial_output
from .store import plan_runs
from .telemetry import LayerStats
from .window import SlidingWindow


@dataclass
class LayerState:
    """One layer's streaming state."""

    index: int
    d_ffn: int
    pinned: NeuronBuffer | None  # rows resident for the whole run (filled on first use)
    pinned_ids: np.ndarray
    buffer: NeuronBuffer | None  # the sliding window's rows
    window: SlidingWindow | None
    down_bias: mx.array | None
    # makes ``pinned`` and ``buffer`` (FlashFFN.allocate); None once they exist
    allocate: Callable[[LayerState], None] | None = None


class ThreadGuard:
    """Refuses a model's FFN call while another thread is inside a forward pass of the same model.

    A forward pass starts at layer 0; the thread that starts it owns the model until another
    thread starts one. Buffers and windows are per model, so two overlapping passes would corrupt
    each other (wrong tokens, or errors deep inside the buffers): the second one gets a clear
    FlashError instead.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    @contextmanager
    def layer(self, index: int) -> Iterator[None]:
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            raise self._busy()
        try:
            if index != 0 and self._owner not in (None, me):
                raise self._busy()
            self._owner = me
            yield
        finally:
            self._lock.release()

    @staticmethod
    def _busy() -> FlashError:
        return FlashError(
            "this flash model is in use by another thread: use it from one thread at a time "
            "(a lock around generation) or load one model per thread"
        )


MAX_UNION_TOKENS = 16  # calls with more tokens per sequence are prompts: the whole FFN streams


def call_phase(tokens: int) -> str:
    """What a call with this many tokens per sequence is: a decode step (one token), a verify
    step (speculative decoding checks 2-8 draft tokens at once; short prompts look the same) or a
    prompt's prefill."""
    if tokens == 1:
        return "decode"
    return "verify" if tokens <= MAX_UNION_TOKENS else "prefill"


class FlashFFN(nn.Module):
    """An FFN whose weights are streamed from the flash store (see the module docstring)."""

    def __init__(self, runtime, state: LayerState):
        super().__init__()
        self._runtime = runtime
        self._state = state

    def allocate(self) -> None:
        """Allocate the neuron buffers, once. The loader does it after casting the trunk, so that
        the cast's transient (one stored tensor) uses room the buffers take later; a model built
        by stock mlx-lm allocates them on its first call."""
        st = self._state
        if st.allocate is not None:
            st.allocate(st)
            st.allocate = None

    @property
    def buffer(self) -> NeuronBuffer | None:
        """The sliding window's neuron buffer (None when the whole FFN is pinned)."""
        return self._state.buffer

    @property
    def pinned(self) -> NeuronBuffer | None:
        """The buffer of the pinned neurons (None when nothing is pinned)."""
        return self._state.pinned

    @property
    def pinned_ids(self) -> np.ndarray:
        """The neurons pinned for the whole run."""
        return self._state.pinned_ids

    def __call__(self, x: mx.array) -> mx.array:
        rt, st = self._runtime, self._state
        with rt.guard.layer(st.index):
            self.allocate()
            phase = call_phase(x.shape[-2] if x.ndim >= 2 else 1)
            xf = x.reshape(-1, x.shape[-1])
            if st.index == 0:
                rt.telemetry.begin(phase, xf.shape[0])
            at_rest = self._at_rest()
            if not at_rest:
                mx.eval(xf)
            start = time.perf_counter()
            selects = phase == "decode" or (phase == "verify" and rt.selector.needs_input)
            outs, stats = self._decode(xf, phase) if selects else self._prefill(xf)
            out = sum(outs[1:], outs[0]) if outs else mx.zeros_like(xf)
            if st.down_bias is not None:
                out = out + st.down_bias
            out = out.astype(x.dtype).reshape(x.shape)
            if not at_rest:  # else nothing will change the rows ``out`` reads: it may stay lazy
                mx.eval(out)
            for buffer in (st.pinned, st.buffer):  # everything fenced in this call fed ``out``
                if buffer is not None:
                    buffer.settled()
            stats.seconds = time.perf_counter() - start
            rt.telemetry.record(st.index, stats)
            return out

    def _decode(self, x: mx.array, phase: str) -> tuple[list[mx.array], LayerStats]:
        """Compute the selection's neurons; for several tokens, the union of their selections
        (the window restarts from them, so a short prompt does not compute what an earlier
        generation left), unless streaming the whole FFN costs no more (``_union_pays``)."""
        rt, st = self._runtime, self._state
        selection = rt.selector(st.index, x)
        if rt.observe is not None:
            rt.observe(st.index, x, selection)
        if phase == "verify":
            if not self._union_pays(self._unpinned(selection.ids)):
                return self._dense(x, selection.gate)
            if st.window is not None:  # the call's tokens are the window's history now
                st.window.restart()
        keep = selection.ids if rt.compute_rows == "selected" else None
        stats = LayerStats(requested=selection.ids.size)
        outs = self._compute_pinned(x, selection.gate, keep, stats)
        needed = self._unpinned(selection.ids)
        stats.hits = selection.ids.size - needed.size
        if needed.size and needed.size <= st.buffer.capacity:
            step = st.window.step(needed, st.buffer.neurons)
            st.buffer.delete(step.drop)
            read = st.buffer.append(step.load)
            stats.read += read
            stats.hits += step.hits
            stats.dropped += step.drop.size
            if rt.lookahead is not None:
                advised = rt.lookahead.recalled(st.index, step.load)
                stats.advised = advised or 0
                # the kernel reads the next layer's while this one computes
                rt.lookahead.advise_next(
                    st.index, x, read.seconds, step.load.size, advised is not None
                )
            outs += self._compute(x, st.buffer, selection.gate, keep, stats)
        elif needed.size:
            outs += self._stream(x, needed, selection.gate, stats)
        self._forget(stats)
        return outs, stats

    def _at_rest(self) -> bool:
        """Whether this call can neither read nor change a buffer: the whole FFN pinned and loaded,
        and a selector that needs no input. Then nothing has to be waited for, and the call stays
        lazy like mlx-lm's MLP (no synchronisation)."""
        st = self._state
        return (
            st.buffer is None
            and not self._runtime.selector.needs_input
            and st.pinned is not None
            and st.pinned.n_used == st.pinned_ids.size
        )

    def to_read(self, ids: np.ndarray) -> np.ndarray:
        """Of the sorted ``ids``, those neither pinned nor in the window's buffer."""
        ids = self._unpinned(ids)
        buffer = self._state.buffer
        return ids if buffer is None else ids[~buffer.resident(ids)]

    def _prefill(self, x: mx.array) -> tuple[list[mx.array], LayerStats]:
        rt, st = self._runtime, self._state
        gate = rt.selector(st.index, x).gate if rt.selector.exact_gate else None
        return self._dense(x, gate)

    def _dense(self, x: mx.array, gate: mx.array | None) -> tuple[list[mx.array], LayerStats]:
        """Every neuron: pinned rows, the rest streamed through the buffer in large reads."""
        st = self._state
        stats = LayerStats(requested=st.d_ffn)
        outs = self._compute_pinned(x, gate, None, stats)
        needed = self._unpinned(np.arange(st.d_ffn))
        stats.hits = st.d_ffn - needed.size
        if needed.size:
            outs += self._stream(x, needed, gate, stats)
        self._forget(stats)
        return outs, stats

    def _compute_pinned(self, x: mx.array, gate: mx.array | None, keep: np.ndarray | None,
                        stats: LayerStats) -> list[mx.array]:  # fmt: skip
        st = self._state
        if st.pinned is None:
            return []
        if st.pinned.n_used < st.pinned_ids.size:  # pinned rows arrive on first use, not at load
            stats.read += st.pinned.append(st.pinned_ids)
        return self._compute(x, st.pinned, gate, keep, stats)

    def _stream(self, x: mx.array, needed: np.ndarray, gate: mx.array | None,
                stats: LayerStats) -> list[mx.array]:  # fmt: skip
        """Compute over ``needed`` in chunks of the buffer's capacity; resident chunks go first."""
        buffer = self._state.buffer
        cap = buffer.capacity
        chunks = [needed[i : i + cap] for i in range(0, needed.size, cap)]
        chunks.sort(key=lambda c: -int(buffer.resident(c).sum()))  # reuse what is left behind
        outs = []
        for chunk in chunks:
            stale = np.setdiff1d(buffer.neurons, chunk, assume_unique=True)
            buffer.delete(stale)
            read = buffer.append(chunk)
            stats.read += read
            stats.hits += chunk.size - read.records
            stats.dropped += stale.size
            outs += self._compute(x, buffer, gate, None, stats)
        return outs

    def _compute(self, x: mx.array, buffer: NeuronBuffer, gate: mx.array | None,
                 keep: np.ndarray | None, stats: LayerStats) -> list[mx.array]:  # fmt: skip
        """The FFN over the buffer's rows, or only those of the ids in ``keep``.

        ``gate``: exact act(gate) of every neuron of the layer, [tokens, d_ffn].
        """
        rt = self._runtime
        parts, rows = buffer.arrays(), None  # rows: the slots computed (None: all in use)
        if keep is not None:
            slots = buffer.slots_of(keep)
            slots = np.sort(slots[slots >= 0])
            if slots.size == 0:
                return []
            if slots.size < buffer.n_used:
                take = mx.array(slots)
                parts, rows = {k: v[take] for k, v in parts.items()}, slots
        if gate is not None:
            ids = buffer.neurons if rows is None else buffer.neurons[rows]
            gate = gate[:, mx.array(ids)]
        y = partial_output(x, parts, rt.activation, rt.gated, rt.quantization, gate)
        buffer.fence(y)
        stats.computed += buffer.n_used if rows is None else rows.size
        return [y]

    def _union_pays(self, needed: np.ndarray) -> bool:
        """Whether reading a multi-token call's union of selections costs less than streaming the
        whole FFN, which is exact: the union of many tokens' selections spans most of the FFN, and
        once its reads cost as much, the exact FFN is no dearer.

        Both from the disk's cost model as the reader plans its runs (reading through small gaps),
        as if nothing were buffered: the choice, and so the result, depends on the call's tokens
        only, not on what earlier calls left in the buffer.
        """
        if self._state.buffer is None:  # the whole FFN is pinned: nothing to read either way
            return True
        everything = self._unpinned(np.arange(self._state.d_ffn))
        return self._read_seconds(needed) < self._read_seconds(everything)

    def _read_seconds(self, ids: np.ndarray) -> float:
        """The cost model's time for the reader to fetch these sorted neuron ids."""
        rt = self._runtime
        reader, record = rt.reader, rt.manifest.neuron_bytes()
        runs = plan_runs(ids, max(1, reader.max_run_bytes // record), reader.gap_bytes // record)
        nbytes = sum(int(ids[b - 1] - ids[a]) + 1 for a, b in runs) * record
        return rt.cost.read_seconds(nbytes, len(runs), reader.threads)

    def _unpinned(self, ids: np.ndarray) -> np.ndarray:
        st = self._state
        if st.pinned is None:
            return ids
        if st.pinned.n_used == st.pinned.n_neurons:  # the whole FFN: nothing to look up
            return ids[:0]
        if st.pinned.n_used:
            return ids[~st.pinned.resident(ids)]
        return np.setdiff1d(ids, st.pinned_ids)

    def _forget(self, stats: LayerStats) -> None:
        """With window k=0 only the pinned rows are kept between calls (the bench's baselines)."""
        st = self._state
        if self._runtime.options.window == 0 and st.buffer is not None:
            stats.dropped += st.buffer.clear()
