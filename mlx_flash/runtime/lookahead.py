"""Look-ahead: while layer L computes, the kernel reads what layer L+1 will most likely need.

Why: a decode step's reads wait on its compute and its compute on its reads, layer after layer.
The FFN input of layer L is close to that of layer L+1 (the residual stream changes little from
one layer to the next), so layer L+1's own selector run on it names most of the neurons L+1 will
select (README, The I/O engine). Those not yet in DRAM are advised to the kernel
(``StoreReader.advise``), which reads them into the page cache in the background; at L+1 the
reader copies what arrived instead of waiting for the disk, and drops it from the page cache right
after. What is advised per layer is capped by the memory plan (``budget.lookahead_bytes``).

It pays only while the extra selector call costs less than the reads it hides: the share of a
layer's reads it had advised (its recall; the neurons a token newly needs are the hard ones to
foresee) times what those reads cost unadvised. So all three are tracked (moving averages; read
times only of layers nothing was advised for, such as layer 0) and the look-ahead pauses while the
selector call is the dearer, trying again every ``RETRY_CALLS`` calls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .selectors import Selector
from .store import StoreReader

RETRY_CALLS = 64
SMOOTHING = 0.1  # weight of a new sample in the moving averages


class LookAhead:
    """Advises layer ``L + 1``'s expected misses from layer ``L``'s FFN input, and counts how many
    of a layer's loaded neurons were advised (the look-ahead's recall)."""

    def __init__(self, selector: Selector, reader: StoreReader, layers: Sequence, max_bytes: int):
        self._selector, self._reader, self._layers = selector, reader, layers
        self._max_records = max(1, max_bytes // reader.manifest.neuron_bytes())
        self._advised: dict[int, np.ndarray] = {}
        self._select_s: float | None = None
        self._read_s: float | None = None  # of layers read with nothing advised
        self._recall: float | None = None
        self._paused = 0  # calls left before trying again

    def advise_next(self, layer: int, x: mx.array, read_s: float, advised: bool) -> None:
        """Advise what layer ``layer + 1`` is expected to read, from ``x`` (this layer's input);
        ``read_s``: how long this layer's own reads took, ``advised``: whether anything of them
        had been advised."""
        if not advised:
            self._read_s = _average(self._read_s, read_s)
        nxt = layer + 1
        if nxt >= len(self._layers):
            return
        if self._paused:
            self._paused -= 1
            return
        start = time.perf_counter()
        ids = self._layers[nxt].to_read(self._selector(nxt, x).ids)[: self._max_records]
        self._select_s = _average(self._select_s, time.perf_counter() - start)
        self._reader.advise(nxt, ids)
        self._advised[nxt] = ids
        recall = 1.0 if self._recall is None else self._recall
        if self._read_s is not None and self._select_s > recall * self._read_s:
            self._paused = RETRY_CALLS

    def recalled(self, layer: int, loaded: np.ndarray) -> int | None:
        """How many of ``loaded`` (the neurons ``layer`` read) were advised for it; None when
        nothing was."""
        advised = self._advised.pop(layer, None)
        if advised is None:
            return None
        hits = int(np.isin(loaded, advised, assume_unique=True).sum())
        if loaded.size:
            self._recall = _average(self._recall, hits / loaded.size)
        return hits


def _average(mean: float | None, sample: float) -> float:
    return sample if mean is None else mean + SMOOTHING * (sample - mean)
