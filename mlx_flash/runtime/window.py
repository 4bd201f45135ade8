"""Sliding-window neuron caching (the paper's windowing), with LRU eviction under a capacity.

Per layer, keep resident the union of the neurons active over the last ``k`` tokens: each token
loads only the active neurons that are missing and drops those that left the window. When the union
would exceed ``capacity`` (the buffer's rows), the least recently active neurons are evicted first;
the current token's neurons are never evicted. The window only decides what to keep: it never
changes which neurons the FFN computes, so results do not depend on ``k`` or ``capacity``.

The window's members are the neurons it asked to keep that are actually resident: each step forgets
members the caller reports as not resident, so the window follows the buffer even if a load was
skipped. Pinned neurons live in their own buffer: leave them out of ``active_ids`` and ``resident``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .buffer import check_ids, unique_ids


class WindowStep(NamedTuple):
    """One token's decision: ``load`` and ``drop`` (sorted, disjoint; drop first), how many of the
    active neurons were already resident (``hits``), and how many members the capacity ``evicted``
    before they left the window."""

    load: np.ndarray
    drop: np.ndarray
    hits: int
    evicted: int


class SlidingWindow:
    """Which neurons of one layer to load and drop per token.

    ``k`` >= 1 tokens of history (k=1 keeps only the current token's neurons), ``capacity`` rows in
    the layer's buffer, ``n_neurons`` the layer's FFN size. Cost per step is O(active + resident)
    scatters into n_neurons-sized masks, plus a sort of the older members when the capacity binds.
    """

    def __init__(self, k: int, capacity: int, n_neurons: int) -> None:
        if k < 1:
            raise ValueError(f"window size k must be >= 1, got {k}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.k = k
        self.capacity = capacity
        self.n_neurons = n_neurons
        self.t = -1  # index of the current token
        self._last = np.zeros(n_neurons, dtype=np.int64)  # token a member was last active
        self._members = np.zeros(0, dtype=np.int64)
        self._res = np.zeros(n_neurons, dtype=bool)  # scratch masks, all False between calls
        self._keep = np.zeros(n_neurons, dtype=bool)

    def restart(self) -> None:
        """Forget the history: the next step's neurons are the only members (a call of several
        tokens brings its own history; a new prompt owes nothing to an earlier one)."""
        self._members = np.zeros(0, dtype=np.int64)

    def step(self, active_ids: np.ndarray, resident: np.ndarray) -> WindowStep:
        """Record this token's active neurons and say what to load and drop.

        ``resident``: the ids resident in the buffer now (``NeuronBuffer.neurons``). ``load`` is
        every active neuron not resident; ``drop`` every resident neuron that is no longer a member
        (left the window or evicted). Drop before loading. If the active set alone exceeds the
        capacity, ``load`` does not fit after the drops: the caller must compute that token in
        chunks instead; the window keeps (and next step forgets) whatever the caller left unloaded.
        """
        active = unique_ids(active_ids, self._keep)
        resident = check_ids(resident, self.n_neurons)
        self.t += 1
        res, keep = self._res, self._keep

        res[resident] = True
        hit = res[active]
        to_load = active[~hit]
        members = self._members
        members = members[res[members] & (self._last[members] > self.t - self.k)]

        self._last[active] = self.t
        older = members[self._last[members] < self.t]
        keep[older] = True
        keep[active] = True
        evicted = max(0, min(older.size, older.size + active.size - self.capacity))
        if evicted:
            keep[older[np.lexsort((older, self._last[older]))[:evicted]]] = False
        self._members = np.flatnonzero(keep)
        keep[self._members] = False

        res[self._members] = False
        to_drop = np.flatnonzero(res)
        res[to_drop] = False

        return WindowStep(to_load, to_drop, int(hit.sum()), evicted)
