"""Look-ahead: while layer L computes, the kernel reads what layer L+1 will most likely need.

Why: a decode step's reads wait on its compute and its compute on its reads, layer after layer.
The FFN input of layer L is close to that of layer L+1 (the residual stream changes little from
one layer to the next), so layer L+1's own selector run on it names most of the neurons L+1 will
select (README, The I/O engine). Those not yet in DRAM are advised to the kernel
(``StoreReader.advise``), which reads them into the page cache in the background; at L+1 the
reader copies what arrived instead of waiting for the disk, and drops it from the page cache right
after. What is advised per layer is capped by the memory plan (``budget.lookahead_bytes``).

It pays only while its own work costs less than the read time it saves, and both are measured:
its work is the selector call and the advice, per call; the saving is what a layer's records cost
read cold (layers nothing was advised for: layer 0 always, every layer while paused, and every
layer for the first ``RETRY_CALLS`` calls) minus what they cost advised, per record, times the
records a layer reads. An advised read still copies its records and waits for those the kernel
has not read yet, so its recall alone overstates the saving (README, The I/O engine). It pauses
while its work is the dearer, trying again every ``RETRY_CALLS`` calls.
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
        self._work_s: float | None = None  # selector call and advice, per call
        self._cold_s: float | None = None  # per record read with nothing advised
        self._warm_s: float | None = None  # per record read after advice
        self._records: float | None = None  # records a layer reads per call
        self._paused = RETRY_CALLS  # calls left before advising (again): cold reads first

    def advise_next(
        self, layer: int, x: mx.array, read_s: float, records: int, advised: bool
    ) -> None:
        """Advise what layer ``layer + 1`` is expected to read, from ``x`` (this layer's input);
        ``read_s``: how long this layer's own reads of ``records`` records took, ``advised``:
        whether anything of them had been advised."""
        if records:
            per_record = read_s / records
            if advised:
                self._warm_s = _average(self._warm_s, per_record)
            else:
                self._cold_s = _average(self._cold_s, per_record)
            self._records = _average(self._records, records)
        nxt = layer + 1
        if nxt >= len(self._layers):
            return
        if self._paused:
            self._paused -= 1
            return
        start = time.perf_counter()
        ids = self._layers[nxt].to_read(self._selector(nxt, x).ids)[: self._max_records]
        self._reader.advise(nxt, ids)
        self._work_s = _average(self._work_s, time.perf_counter() - start)
        self._advised[nxt] = ids
        if self._work_s > self.saving_s():
            self._paused = RETRY_CALLS

    def saving_s(self) -> float:
        """Read time a layer's advice saves, as measured (infinite until both cold and advised
        reads were)."""
        if self._cold_s is None or self._warm_s is None:
            return float("inf")
        return (self._cold_s - self._warm_s) * self._records

    def recalled(self, layer: int, loaded: np.ndarray) -> int | None:
        """How many of ``loaded`` (the neurons ``layer`` read) were advised for it; None when
        nothing was."""
        advised = self._advised.pop(layer, None)
        if advised is None:
            return None
        return int(np.isin(loaded, advised, assume_unique=True).sum())


def _average(mean: float | None, sample: float) -> float:
    return sample if mean is None else mean + SMOOTHING * (sample - mean)
