"""The per-layer neuron buffer: the paper's DRAM management for streamed FFN neurons.

One preallocated MLX matrix per part (gate row, up row, down column, biases, quantization scales...)
with room for ``capacity`` neurons, a slot <-> neuron map and a count of used rows. Deleting neurons
moves the last used rows into the freed slots; new neurons are appended after the used rows; nothing
is ever reallocated. Row order does not change the FFN result, so compute runs on the first
``n_used`` rows (``arrays()``).

Rows are written in place through writable numpy views that share memory with the MLX arrays
(unified memory on Apple silicon, plain host memory on Linux). That is what makes loads zero-copy,
and it is also a hazard: MLX is lazy and asynchronous (on Metal the GPU may still be reading a row
when Python returns), so a computation built from ``arrays()`` but not yet evaluated would read
whatever the rows hold *when it runs*, not when it was built. Callers therefore register the lazy
outputs they compute from the buffer with ``fence(...)``; ``delete`` and ``append`` evaluate (and
wait for) every registered output before they touch any row. ``arrays()`` views themselves follow
the rows: they are valid only until the next ``delete``/``append``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlx.core as mx
import numpy as np

from .errors import FlashError
from .store import ReadCount

Loader = Callable[[np.ndarray, dict[str, np.ndarray], np.ndarray], ReadCount]
"""``loader(ids, dest, rows)`` writes part p of neuron ``ids[j]`` into ``dest[p][rows[j]]`` and says
what that read cost (the store reader's ``read_neurons`` bound to a layer)."""

# numpy has no bfloat16: such parts are stored and written as raw uint16 and viewed as
# bfloat16 for MLX.
_STORAGE = {mx.bfloat16: mx.uint16}


def check_ids(ids: np.ndarray, n_neurons: int) -> np.ndarray:
    """``ids`` as a flat int64 array, after checking they are integers in [0, n_neurons)."""
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"neuron ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= n_neurons):
        raise IndexError(f"neuron ids must be in [0, {n_neurons}), got {ids.min()}..{ids.max()}")
    return ids


def unique_ids(ids: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Sorted distinct ``ids``, checked; O(len(ids)) plus a fast scan of ``scratch``
    (np.unique sorts).

    ``scratch`` is an all-False bool array of size n_neurons, left all-False.
    """
    ids = check_ids(ids, scratch.size)
    scratch[ids] = True
    out = np.flatnonzero(scratch)
    scratch[out] = False
    return out


class BufferFullError(FlashError):
    """An append would need more rows than the buffer has: the caller must delete (evict) first."""


class NeuronBuffer:
    """Resident FFN neurons of one layer, in preallocated rows that never move in memory.

    ``parts`` maps a part name to (row width, MLX dtype). ``n_neurons`` is the layer's FFN size
    (valid ids are 0..n_neurons-1). ``loader`` fills rows, typically the store reader's
    ``read_neurons`` bound to this layer.
    """

    def __init__(
        self,
        capacity: int,
        parts: Mapping[str, tuple[int, mx.Dtype]],
        loader: Loader,
        n_neurons: int,
    ) -> None:
        if capacity < 0 or n_neurons < 0:
            raise ValueError(f"capacity ({capacity}) and n_neurons ({n_neurons}) must be >= 0")
        if not parts:
            raise ValueError("a neuron buffer needs at least one part")
        self.capacity = capacity
        self.n_neurons = n_neurons
        self.n_used = 0
        self._loader = loader
        self._dtypes = {name: dtype for name, (_, dtype) in parts.items()}
        self._storage: dict[str, mx.array] = {}
        self._rows: dict[str, np.ndarray] = {}
        for name, (width, dtype) in parts.items():
            store_dtype = _STORAGE.get(dtype, dtype)
            a = mx.zeros((capacity, width), dtype=store_dtype)
            mx.eval(a)
            view = np.array(a, copy=False)
            if not (
                view.flags.writeable and view.flags.c_contiguous and view.shape == (capacity, width)
            ):
                raise RuntimeError(f"MLX did not give a writable contiguous view of part {name!r}")
            self._storage[name] = a
            self._rows[name] = view
        self._slot_neuron = np.full(capacity, -1, dtype=np.int64)
        self._neuron_slot = np.full(n_neurons, -1, dtype=np.int64)
        self._scratch = np.zeros(n_neurons, dtype=bool)
        self._pending: list[mx.array] = []

    @property
    def nbytes(self) -> int:
        """Bytes held by all parts at full capacity (what the memory budget must reserve)."""
        return sum(v.nbytes for v in self._rows.values())

    @property
    def neurons(self) -> np.ndarray:
        """Resident neuron ids in slot order (a copy): row i of ``arrays()`` belongs to
        ``neurons[i]``."""
        return self._slot_neuron[: self.n_used].copy()

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id, -1 where the neuron is not resident."""
        return self._neuron_slot[check_ids(ids, self.n_neurons)]

    def resident(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are resident."""
        return self.slots_of(ids) >= 0

    def arrays(self, n: int | None = None) -> dict[str, mx.array]:
        """Each part's first ``n`` rows (default ``n_used``) as MLX views of the buffer, for
        compute.

        Rows at or past ``n_used`` hold stale data. Register outputs computed from these
        with ``fence``.
        """
        n = self.n_used if n is None else n
        if not 0 <= n <= self.capacity:
            raise ValueError(f"cannot take {n} rows of a buffer of capacity {self.capacity}")
        out = {}
        for name, a in self._storage.items():
            rows = a[:n]
            out[name] = rows if rows.dtype == self._dtypes[name] else rows.view(self._dtypes[name])
        return out

    def fence(self, *outputs: mx.array) -> None:
        """Register lazy results that read the buffer; they are evaluated before any row changes."""
        self._pending.extend(outputs)

    def settled(self) -> None:
        """The caller has evaluated (and waited for) every registered result: let them go.

        Without this a buffer whose rows never change (the pinned one) would keep every output ever
        computed from it alive: a leak of tokens x d_model per layer.
        """
        self._pending.clear()

    def delete(self, ids: np.ndarray) -> None:
        """Free the rows of ``ids`` by moving the last used rows into the holes (O(deleted)).

        Ids that are not resident are ignored (windows may drop what an eviction already removed).
        """
        ids = unique_ids(ids, self._scratch)
        slots = self._neuron_slot[ids]
        slots = slots[slots >= 0]
        if slots.size == 0:
            return
        self._sync()
        n_new = self.n_used - slots.size
        self._neuron_slot[self._slot_neuron[slots]] = -1
        self._slot_neuron[slots] = -1
        holes = slots[slots < n_new]
        tail = np.arange(n_new, self.n_used)
        # as many survivors past n_new as holes before it
        movers = tail[self._slot_neuron[tail] >= 0]
        for view in self._rows.values():
            view[holes] = view[movers]
        moved = self._slot_neuron[movers]
        self._slot_neuron[holes] = moved
        self._slot_neuron[movers] = -1
        self._neuron_slot[moved] = holes
        self.n_used = n_new

    def append(self, ids: np.ndarray) -> ReadCount:
        """Load the ids that are not resident yet into the rows after the used ones; what it read.

        Calls the loader once (not at all when nothing is missing). Raises ``BufferFullError``
        before loading if they do not fit. If the loader raises, the buffer is unchanged and the
        error propagates.
        """
        ids = unique_ids(ids, self._scratch)
        new = ids[self._neuron_slot[ids] < 0]
        if new.size == 0:
            return ReadCount()
        if self.n_used + new.size > self.capacity:
            raise BufferFullError(
                f"appending {new.size} neurons to {self.n_used} resident would exceed the "
                f"capacity of {self.capacity}; delete some first"
            )
        self._sync()
        rows = np.arange(self.n_used, self.n_used + new.size)
        read = self._loader(new, self._rows, rows)
        self._slot_neuron[rows] = new
        self._neuron_slot[new] = rows
        self.n_used += new.size
        return read

    def replace(self, drop: np.ndarray, load: np.ndarray) -> ReadCount:
        """``delete(drop)`` then ``append(load)``, but loading into the dropped rows in place.

        Why: a dropped row is refilled by an incoming neuron instead of by a move of the last row,
        so a full buffer that swaps k rows copies nothing (an expert is megabytes; see the README).
        Only the slot order differs from delete + append. Capacity is checked before anything
        changes; if the loader raises, ``drop`` is deleted and nothing is loaded.
        """
        drop = unique_ids(drop, self._scratch)
        drop = drop[self._neuron_slot[drop] >= 0]
        load = unique_ids(load, self._scratch)
        new = load[(self._neuron_slot[load] < 0) | np.isin(load, drop)]
        if self.n_used - drop.size + new.size > self.capacity:
            raise BufferFullError(
                f"replacing {drop.size} of {self.n_used} resident neurons by {new.size} would "
                f"exceed the capacity of {self.capacity}"
            )
        if drop.size > new.size:  # more holes than arrivals: the extra ones are filled by moves
            self.delete(drop[new.size :])
            drop = drop[: new.size]
        if new.size == 0:
            return ReadCount()
        self._sync()
        holes = self._neuron_slot[drop]
        rows = np.concatenate([holes, np.arange(self.n_used, self.n_used + new.size - holes.size)])
        try:
            read = self._loader(new, self._rows, rows)
        except BaseException:
            self.delete(drop)
            raise
        self._neuron_slot[drop] = -1
        self._slot_neuron[rows] = new
        self._neuron_slot[new] = rows
        self.n_used += new.size - holes.size
        return read

    def clear(self) -> int:
        """Drop every resident neuron; how many there were."""
        n = self.n_used
        self.delete(self._slot_neuron[:n])
        return n

    def _sync(self) -> None:
        """Wait for every registered computation that may read the rows about to change."""
        if self._pending:
            mx.eval(*self._pending)
            self._pending.clear()
