"""NeuronBuffer: rows stay consistent with their neurons through any delete/append sequence, in
place."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flash.runtime.buffer import BufferFullError, NeuronBuffer
from mlx_flash.runtime.store import ReadCount

N_NEURONS = 40
CAPACITY = 16
PARTS = {
    "gate": (5, mx.float32),
    "down": (3, mx.bfloat16),
    "gate.scales": (2, mx.uint32),
    "up_bias": (1, mx.float32),
}


def reference(seed: int = 0) -> dict[str, np.ndarray]:
    """Per part, the [N_NEURONS, width] matrix the store would hold (bfloat16 as raw uint16)."""
    rng = np.random.default_rng(seed)
    return {
        "gate": rng.standard_normal((N_NEURONS, 5)).astype(np.float32),
        "down": (
            rng.standard_normal((N_NEURONS, 3)).astype(np.float32).view(np.uint32) >> 16
        ).astype(np.uint16),
        "gate.scales": rng.integers(0, 2**32, (N_NEURONS, 2), dtype=np.uint32),
        "up_bias": rng.standard_normal((N_NEURONS, 1)).astype(np.float32),
    }


class FakeLoader:
    """Stands in for the store reader: copies reference rows, counts calls, can fail half-way."""

    def __init__(self, ref: dict[str, np.ndarray]):
        self.ref = ref
        self.calls = 0
        self.fail = False

    def __call__(self, ids: np.ndarray, dest: dict[str, np.ndarray], rows: np.ndarray) -> ReadCount:
        self.calls += 1
        for name, matrix in self.ref.items():
            dest[name][rows] = matrix[ids]
            if self.fail:
                raise OSError("disk on fire")
        return ReadCount(records=ids.size, bytes=7 * ids.size, reads=1, calls=1)


def as_stored(name: str, a: mx.array) -> np.ndarray:
    """An MLX part as the raw numpy values the loader wrote."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def pointers(buf: NeuronBuffer) -> dict[str, tuple[int, int]]:
    return {n: (id(a), np.array(a, copy=False).ctypes.data) for n, a in buf._storage.items()}


def check(buf: NeuronBuffer, ref: dict[str, np.ndarray], expected: set[int]) -> None:
    neurons = buf.neurons
    assert buf.n_used == len(expected) == neurons.size
    assert set(neurons.tolist()) == expected
    np.testing.assert_array_equal(buf.slots_of(neurons), np.arange(buf.n_used))
    all_ids = np.arange(N_NEURONS)
    np.testing.assert_array_equal(buf.resident(all_ids), [i in expected for i in all_ids])
    for (
        name,
        a,
    ) in buf.arrays().items():  # read back through MLX: proves the numpy views share memory
        assert a.shape == (buf.n_used, PARTS[name][0]) and a.dtype == PARTS[name][1]
        np.testing.assert_array_equal(as_stored(name, a), ref[name][neurons])


def make(capacity: int = CAPACITY) -> tuple[NeuronBuffer, FakeLoader, dict[str, np.ndarray]]:
    ref = reference()
    loader = FakeLoader(ref)
    return NeuronBuffer(capacity, PARTS, loader, n_neurons=N_NEURONS), loader, ref


ids_lists = st.lists(st.integers(0, N_NEURONS - 1), max_size=12)
ops = st.lists(st.tuples(st.sampled_from(["append", "delete", "fail"]), ids_lists), max_size=25)


@settings(derandomize=True, max_examples=150, deadline=None)
@given(ops)
def test_random_delete_append_sequences_stay_consistent(sequence):
    buf, loader, ref = make()
    before = pointers(buf)
    expected: set[int] = set()
    for op, ids in sequence:
        ids = np.array(ids, dtype=np.int64)
        missing = set(ids.tolist()) - expected
        calls = loader.calls
        if op == "delete":
            buf.delete(ids)
            expected -= set(ids.tolist())
        elif len(expected) + len(missing) > CAPACITY:
            with pytest.raises(BufferFullError):
                buf.append(ids)
            assert loader.calls == calls
        elif op == "fail" and missing:
            loader.fail = True
            with pytest.raises(OSError):
                buf.append(ids)
            loader.fail = False
            assert loader.calls == calls + 1
        else:
            read = buf.append(ids)
            assert (read.records, read.bytes) == (len(missing), 7 * len(missing))
            assert loader.calls == calls + (1 if missing else 0)
            expected |= missing
        check(buf, ref, expected)
    assert pointers(buf) == before


replace_ops = st.lists(st.tuples(ids_lists, ids_lists, st.booleans()), max_size=25)


@settings(derandomize=True, max_examples=150, deadline=None)
@given(replace_ops)
def test_random_replace_sequences_stay_consistent(sequence):
    buf, loader, ref = make()
    before = pointers(buf)
    expected: set[int] = set()
    for drop, load, fail in sequence:
        after = (expected - set(drop)) | set(load)
        calls = loader.calls
        if len(after) > CAPACITY:
            with pytest.raises(BufferFullError):
                buf.replace(np.array(drop, dtype=np.int64), np.array(load, dtype=np.int64))
            assert loader.calls == calls
        elif fail and after - expected:
            loader.fail = True
            with pytest.raises(OSError):
                buf.replace(np.array(drop, dtype=np.int64), np.array(load, dtype=np.int64))
            loader.fail = False
            expected -= set(drop)  # the drop happened, nothing was loaded
        else:
            new = {i for i in load if i not in expected or i in drop}
            read = buf.replace(np.array(drop, dtype=np.int64), np.array(load, dtype=np.int64))
            assert read.records == len(new) and loader.calls == calls + bool(new)
            expected = after
        check(buf, ref, expected)
    assert pointers(buf) == before


def test_replace_loads_into_the_dropped_rows_and_moves_nothing():
    buf, _, ref = make()
    buf.append(np.arange(CAPACITY))
    survivors = np.arange(3, CAPACITY)
    slots = buf.slots_of(survivors)
    buf.replace(np.array([0, 1, 2]), np.array([30, 31, 32]))
    np.testing.assert_array_equal(buf.slots_of(survivors), slots)  # nobody moved
    assert sorted(buf.slots_of(np.array([30, 31, 32])).tolist()) == [0, 1, 2]
    check(buf, ref, set(survivors.tolist()) | {30, 31, 32})


def test_arrays_are_views_of_preallocated_storage():
    buf, _, ref = make()
    buf.append([3, 7])
    assert buf.nbytes == CAPACITY * (5 * 4 + 3 * 2 + 2 * 4 + 1 * 4)
    assert buf.arrays(0)["gate"].shape == (0, 5)
    assert buf.arrays(CAPACITY)["gate"].shape == (CAPACITY, 5)
    with pytest.raises(ValueError):
        buf.arrays(CAPACITY + 1)
    view = np.array(buf._storage["gate"], copy=False)
    view[0] = 42.0  # a write through the numpy view is what MLX reads
    assert np.all(np.array(buf.arrays()["gate"])[0] == 42.0)


def test_bad_ids_are_rejected():
    buf, _, _ = make()
    with pytest.raises(IndexError):
        buf.append([N_NEURONS])
    with pytest.raises(IndexError):
        buf.delete([-1])
    with pytest.raises(TypeError):
        buf.append([1.5])
    buf.delete([1, 2])  # not resident: ignored
    assert buf.n_used == 0


def lazy_sum(buf: NeuronBuffer) -> mx.array:
    """A computation over the used rows that MLX has not run yet."""
    return (buf.arrays()["gate"] * 2).sum(axis=0)


def test_fence_evaluates_pending_outputs_before_rows_change():
    buf, _, ref = make()
    buf.append(np.arange(10))
    want = (ref["gate"][np.arange(10)] * 2).sum(axis=0)
    out = lazy_sum(buf)
    buf.fence(out)
    buf.delete([0, 1, 2])  # moves rows 7..9 into slots 0..2
    buf.append([20, 21, 22, 23])
    np.testing.assert_allclose(np.array(out), want, rtol=1e-6)
    out = lazy_sum(buf)
    buf.fence(out)
    buf.append([30])  # appends also wait: a pending computation may have used a longer slice
    np.testing.assert_allclose(
        np.array(out), (ref["gate"][buf.neurons[:-1]] * 2).sum(axis=0), rtol=1e-6
    )


def test_without_fence_a_lazy_output_sees_the_new_rows():
    """Control for the fence test: the hazard is real, so the fence test has teeth."""
    buf, _, ref = make()
    buf.append(np.arange(10))
    want = (ref["gate"][np.arange(10)] * 2).sum(axis=0)
    out = lazy_sum(buf)
    buf.delete([0, 1, 2])
    buf.append([20, 21, 22])
    assert not np.allclose(np.array(out), want)


def test_zero_capacity_buffer():
    buf, loader, _ = make(capacity=0)
    assert buf.nbytes == 0 and buf.append([]) == ReadCount() and loader.calls == 0
    with pytest.raises(BufferFullError):
        buf.append([1])
