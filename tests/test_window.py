"""SlidingWindow against brute-force models of windowing and LRU eviction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flash.runtime.window import SlidingWindow

N = 30

token_sets = st.lists(st.sets(st.integers(0, N - 1), max_size=12), min_size=1, max_size=30)


def follow(window: SlidingWindow, tokens, capacity: int):
    """Drive the window like FlashFFN: drop, then load what fits.

    Yields (active, to_load, to_drop, resident before, what the window keeps, the step)."""
    resident: set[int] = set()
    for active in tokens:
        step = window.step(
            np.array(sorted(active), dtype=np.int64), np.array(sorted(resident), dtype=np.int64)
        )
        to_load, to_drop = step.load.tolist(), step.drop.tolist()
        kept = (resident - set(to_drop)) | set(to_load)
        yield active, to_load, to_drop, set(resident), kept, step
        resident -= set(to_drop)
        resident |= set(to_load[: max(0, capacity - len(resident))])
        assert len(resident) <= capacity


@settings(derandomize=True, max_examples=200, deadline=None)
@given(token_sets, st.integers(1, 6))
def test_without_capacity_pressure_keeps_union_of_last_k_tokens(tokens, k):
    window = SlidingWindow(k, capacity=N, n_neurons=N)
    history: list[set[int]] = []
    for active, to_load, to_drop, resident, kept, step in follow(window, tokens, N):
        history.append(active)
        union = set().union(*history[-k:])
        assert to_load == sorted(active - resident)
        assert to_drop == sorted(resident - union)
        assert kept == union
        assert (step.hits, step.evicted) == (len(active & resident), 0)


def reference_step(
    members: dict[int, int], t: int, k: int, capacity: int, active: set[int], resident: set[int]
):
    """Brute force: keep resident members seen in the last k tokens, add the active ones, evict
    LRU (then id)."""
    members = {i: last for i, last in members.items() if i in resident and last > t - k}
    members.update({i: t for i in active})
    older = sorted((last, i) for i, last in members.items() if last < t)
    for _, i in older[: max(0, len(members) - capacity)]:
        del members[i]
    return members, sorted(active - resident), sorted(resident - members.keys())


@settings(derandomize=True, max_examples=300, deadline=None)
@given(token_sets, st.integers(1, 6), st.integers(0, 20))
def test_matches_reference_under_capacity(tokens, k, capacity):
    window = SlidingWindow(k, capacity, n_neurons=N)
    members: dict[int, int] = {}
    steps = follow(window, tokens, capacity)
    for t, (active, to_load, to_drop, resident, kept, step) in enumerate(steps):
        last_before = dict(members)
        members, want_load, want_drop = reference_step(members, t, k, capacity, active, resident)
        assert (to_load, to_drop) == (want_load, want_drop)
        assert kept == set(members) and active <= kept
        assert len(kept) <= max(capacity, len(active))
        # LRU: nothing evicted (dropped while still in the window) is more recent than a kept member
        evicted = [last_before[i] for i in to_drop if i in last_before and last_before[i] > t - k]
        kept_older = [members[i] for i in kept - active]
        assert len(evicted) == step.evicted
        if evicted and kept_older:
            assert max(evicted) <= min(kept_older)


def test_k1_keeps_only_the_current_token():
    w = SlidingWindow(1, capacity=10, n_neurons=N)
    first = w.step(np.array([1, 2, 3]), np.array([], dtype=np.int64))
    assert first.load.tolist() == [1, 2, 3] and first.drop.tolist() == [] and first.hits == 0
    second = w.step(np.array([3, 4]), np.array([1, 2, 3]))
    assert second.load.tolist() == [4] and second.drop.tolist() == [1, 2] and second.hits == 1


def test_lru_evicts_the_least_recently_active_first():
    w = SlidingWindow(k=5, capacity=3, n_neurons=N)
    w.step(np.array([1]), np.array([], dtype=np.int64))
    w.step(np.array([2]), np.array([1]))
    w.step(np.array([1]), np.array([1, 2]))  # 1 is now more recent than 2
    step = w.step(np.array([7, 8]), np.array([1, 2]))
    assert step.drop.tolist() == [2] and step.load.tolist() == [7, 8] and step.evicted == 1


def test_overflow_keeps_every_active_neuron():
    w = SlidingWindow(k=3, capacity=2, n_neurons=N)
    w.step(np.array([0, 1]), np.array([], dtype=np.int64))
    load, drop, *_ = w.step(np.array([5, 6, 7]), np.array([0, 1]))
    assert load.tolist() == [5, 6, 7] and drop.tolist() == [0, 1]
    # the caller could load only two of them: the third is forgotten, not counted against capacity
    load, drop, *_ = w.step(np.array([9]), np.array([5, 6]))
    assert load.tolist() == [9] and drop.tolist() == [5]


def test_bad_arguments():
    with pytest.raises(ValueError):
        SlidingWindow(0, 4, N)
    w = SlidingWindow(2, 4, N)
    with pytest.raises(IndexError):
        w.step(np.array([N]), np.array([], dtype=np.int64))
