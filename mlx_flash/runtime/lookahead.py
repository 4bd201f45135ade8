"""Look-ahead: while layer L computes, the kernel reads what layer L+1 will most likely need.

Why: a decode step's reads wait on its compute and its compute on its reads, layer after layer.
The FFN input of layer L is close to that of layer L+1 (the residual stream changes little from
one layer to the next), so layer L+1's own selector run on it names most of the neurons L+1 will
select (README, The I/O engine: look-ahead recall). Those not yet in DRAM are advised to the kernel
(``StoreReader.advise``), which reads them into the page cache in the background; at L+1 the
reader copies what arrived instead of waiting for the disk, and drops it from the page cache right
after. What is advised per layer is capped by the memory plan (``budget.lookahead_bytes``).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .selectors import Selector
from .store import StoreReader


class LookAhead:
    """Advises layer ``L + 1``'s expected misses from layer ``L``'s FFN input, and counts how many
    of a layer's loaded neurons were advised (the look-ahead's recall)."""

    def __init__(self, selector: Selector, reader: StoreReader, layers: Sequence, max_bytes: int):
        self._selector, self._reader, self._layers = selector, reader, layers
        self._max_records = max(1, max_bytes // reader.manifest.neuron_bytes())
        self._advised: dict[int, np.ndarray] = {}

    def advise_next(self, layer: int, x: mx.array) -> None:
        """Advise what layer ``layer + 1`` is expected to read, from ``x`` (this layer's input)."""
        nxt = layer + 1
        if nxt >= len(self._layers):
            return
        ids = self._layers[nxt].to_read(self._selector(nxt, x).ids)[: self._max_records]
        self._reader.advise(nxt, ids)
        self._advised[nxt] = ids

    def recalled(self, layer: int, loaded: np.ndarray) -> int:
        """How many of ``loaded`` (the neurons ``layer`` read) were advised for it."""
        advised = self._advised.pop(layer, None)
        if advised is None or loaded.size == 0:
            return 0
        return int(np.isin(loaded, advised, assume_unique=True).sum())
