"""FlashFFN: the drop-in FFN module whose neurons live in flash and stream into neuron buffers.

Per call (one layer, one forward pass):
- decode (one token per sequence): the selector picks neuron ids (the union over a batch); pinned
  neurons are always resident; the rest go through the sliding window, which loads only neurons not
  already buffered and drops those that left it. The FFN is computed on every resident row (pinned +
  window buffer): rows the selector did not pick this token are neurons active in the last k tokens,
  so computing them only moves the result towards the dense FFN (exactly so for ReLU-family models,
  where an inactive neuron contributes zero) and costs no extra I/O.
- prefill (many tokens) and decode steps whose selection does not fit the buffer: the needed neurons
  are streamed through the buffer in chunks of its capacity, each chunk a few large sequential reads,
  and the partial outputs are summed. This is exact (dense) for prompts: per-token selection over
  hundreds of tokens would select nearly every neuron anyway and cost many small reads.
Large state lives in ``_LayerState`` (a plain object), not in MLX parameters, so strict loading of
the trunk still checks every trunk weight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .adapters import ACTIVATIONS
from .buffer import NeuronBuffer
from .manifest import Quantization
from .window import SlidingWindow


@dataclass
class _LayerState:
    index: int
    d_ffn: int
    pinned: NeuronBuffer | None
    pinned_ids: np.ndarray
    buffer: NeuronBuffer | None
    window: SlidingWindow | None
    down_bias: mx.array | None
    io: list = field(default_factory=lambda: [0, 0, 0.0])  # bytes, reads, seconds (filled by the loader)


def ffn_rows(x: mx.array, parts: dict[str, mx.array], activation: str, gated: bool,
             quant: Quantization | None) -> mx.array:
    """The FFN restricted to the neurons whose rows are in ``parts`` (without the down bias)."""

    def project_in(name: str) -> mx.array:
        if quant is None:
            y = x @ parts[name].T
        else:
            y = mx.quantized_matmul(x, parts[name], parts[f"{name}.scales"], parts[f"{name}.biases"],
                                    transpose=True, group_size=quant.group_size, bits=quant.bits)
        bias = parts.get(f"{name}_bias")
        return y if bias is None else y + bias[:, 0]

    act = ACTIVATIONS[activation]
    h = act(project_in("gate")) * project_in("up") if gated else act(project_in("up"))
    if quant is None:
        return h @ parts["down"]
    return mx.quantized_matmul(h, parts["down"], parts["down.scales"], parts["down.biases"], transpose=False,
                               group_size=quant.group_size, bits=quant.bits)


class FlashFFN(nn.Module):
    """An FFN whose weights are streamed from the flash store (see the module docstring)."""

    def __init__(self, runtime, state: _LayerState):
        super().__init__()
        self._runtime = runtime
        self._state = state

    def __call__(self, x: mx.array) -> mx.array:
        rt, st = self._runtime, self._state
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        prefill = x.ndim >= 2 and x.shape[-2] > 1
        if st.index == 0:
            rt.telemetry.begin("prefill" if prefill else "decode", xf.shape[0])
        mx.eval(xf)
        t0 = time.perf_counter()
        st.io[:] = [0, 0, 0.0]
        loaded = hits = dropped = 0
        out = None
        if st.pinned is not None:
            if st.pinned.n_used < st.pinned_ids.size:  # first use: pinned rows arrive lazily, not at load
                loaded += st.pinned.append(st.pinned_ids).size
            out = self._rows(xf, st.pinned)
        if prefill:
            requested = st.d_ffn
            needed = self._unpinned(np.arange(st.d_ffn))
        else:
            selected = rt.selector(st.index, xf)
            requested = selected.size
            needed = self._unpinned(selected)
        hits += requested - needed.size
        computed = 0 if st.pinned is None else st.pinned.n_used
        if needed.size and not prefill and needed.size <= st.buffer.capacity:
            to_load, to_drop = st.window.step(needed, st.buffer.neurons)
            st.buffer.delete(to_drop)
            st.buffer.append(to_load)
            hits += needed.size - to_load.size
            loaded += to_load.size
            dropped += to_drop.size
            part = self._rows(xf, st.buffer)
            out = part if out is None else out + part
            computed += st.buffer.n_used
        elif needed.size:
            part, chunk_hits, chunk_loaded, chunk_dropped = self._stream(xf, needed)
            out = part if out is None else out + part
            hits += chunk_hits
            loaded += chunk_loaded
            dropped += chunk_dropped
            computed += needed.size
        if out is None:
            out = mx.zeros_like(xf)
        if st.down_bias is not None:
            out = out + st.down_bias
        out = out.astype(x.dtype).reshape(shape)
        mx.eval(out)
        elapsed = time.perf_counter() - t0
        bytes_read, reads, io_s = st.io
        rt.telemetry.add(st.index, requested=requested, hits=hits, loaded=loaded, dropped=dropped, computed=computed,
                         bytes_read=bytes_read, reads=reads, io_s=io_s, compute_s=max(0.0, elapsed - io_s))
        return out

    def _unpinned(self, ids: np.ndarray) -> np.ndarray:
        st = self._state
        if st.pinned is None:
            return ids
        return ids[~st.pinned.resident(ids)] if st.pinned.n_used else np.setdiff1d(ids, st.pinned_ids)

    def _rows(self, xf: mx.array, buffer: NeuronBuffer) -> mx.array:
        rt = self._runtime
        y = ffn_rows(xf, buffer.arrays(), rt.activation, rt.gated, rt.quantization)
        buffer.fence(y)
        return y

    def _stream(self, xf: mx.array, needed: np.ndarray) -> tuple[mx.array, int, int, int]:
        """Compute over ``needed`` in chunks of the buffer's capacity; chunks already resident go first."""
        st = self._state
        buf = st.buffer
        cap = buf.capacity
        chunks = [needed[i:i + cap] for i in range(0, needed.size, cap)]
        chunks.sort(key=lambda c: -int(buf.resident(c).sum()))  # reuse what the last call left behind
        out, hits, loaded, dropped = None, 0, 0, 0
        for chunk in chunks:
            resident = buf.neurons
            stale = np.setdiff1d(resident, chunk, assume_unique=True)
            buf.delete(stale)
            new = buf.append(chunk)
            hits += chunk.size - new.size
            loaded += new.size
            dropped += stale.size
            y = self._rows(xf, buf)
            out = y if out is None else out + y
        return out, hits, loaded, dropped
