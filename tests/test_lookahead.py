"""The look-ahead: what it advises, how it counts recall, and when it pauses."""

import time
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from mlx_flash.runtime import lookahead
from mlx_flash.runtime.lookahead import LookAhead


class _Reader:
    def __init__(self):
        self.manifest = SimpleNamespace(neuron_bytes=lambda: 100)
        self.advised = []

    def advise(self, layer, ids):
        self.advised.append((layer, np.asarray(ids).tolist()))
        return 100 * len(ids)


class _Layer:
    def __init__(self, resident):
        self.resident = set(resident)

    def to_read(self, ids):
        return np.array([i for i in ids if i not in self.resident], dtype=np.int64)


def _selector(picks, cost_s=0.0):
    def select(layer, x):
        if cost_s:
            time.sleep(cost_s)
        return SimpleNamespace(ids=np.array(picks[layer], dtype=np.int64))

    return select


def _started(selector, reader, layers, max_bytes=1000):
    """A look-ahead past its first cold stretch (it advises from the first call)."""
    ahead = LookAhead(selector, reader, layers, max_bytes)
    ahead._paused = 0
    return ahead


def test_advises_the_next_layers_misses_and_counts_recall():
    reader = _Reader()
    layers = [_Layer([]), _Layer([2, 5]), _Layer([])]
    ahead = _started(_selector({1: [1, 2, 3, 5, 8]}), reader, layers)
    assert ahead.recalled(0, np.array([4])) is None  # nothing was advised for layer 0
    ahead.advise_next(0, mx.zeros((1, 4)), read_s=1.0, records=4, advised=False)
    assert reader.advised == [(1, [1, 3, 8])]  # resident neurons are not advised
    assert ahead.recalled(1, np.array([1, 3, 4, 9])) == 2
    assert ahead.recalled(1, np.array([1])) is None  # counted once
    ahead.advise_next(2, mx.zeros((1, 4)), read_s=1.0, records=4, advised=False)  # no next layer
    assert len(reader.advised) == 1


def test_the_cap_limits_what_is_advised():
    reader = _Reader()
    ahead = _started(_selector({1: list(range(50))}), reader, [_Layer([])] * 2)
    ahead.advise_next(0, mx.zeros((1, 4)), read_s=1.0, records=50, advised=False)
    assert len(reader.advised[0][1]) == 10  # 1000 bytes of 100-byte records


def test_reads_cold_first_then_advises(monkeypatch):
    monkeypatch.setattr(lookahead, "RETRY_CALLS", 3)
    reader = _Reader()
    ahead = LookAhead(_selector({1: [1, 2]}), reader, [_Layer([])] * 2, max_bytes=1000)
    for _ in range(3):
        ahead.advise_next(0, mx.zeros((1, 4)), read_s=0.01, records=10, advised=False)
    assert reader.advised == []
    ahead.advise_next(0, mx.zeros((1, 4)), read_s=0.01, records=10, advised=False)
    assert len(reader.advised) == 1


def _advise(ahead, cold_s, warm_s, calls):
    """``calls`` rounds of a two-layer model: layer 0 read cold, layer 1 read advised (when it
    was), 10 records each."""
    for _ in range(calls):
        ahead.advise_next(0, mx.zeros((1, 4)), read_s=cold_s, records=10, advised=False)
        was = ahead.recalled(1, np.array([1, 2])) is not None
        ahead.advise_next(1, mx.zeros((1, 4)), read_s=warm_s if was else cold_s, records=10,
                          advised=was)  # fmt: skip


def test_pauses_while_its_work_costs_more_than_the_read_time_it_saves(monkeypatch):
    """Measured, not modelled: cold and advised reads per record, and its own time per call."""
    monkeypatch.setattr(lookahead, "RETRY_CALLS", 3)
    picks = {1: [1, 2]}
    dear = _started(_selector(picks, cost_s=0.005), _Reader(), [_Layer([])] * 2)
    _advise(dear, cold_s=0.010, warm_s=0.009, calls=2)  # saves 1 ms, costs 5 ms
    assert len(dear._reader.advised) == 2 and dear._paused == 3
    _advise(dear, cold_s=0.010, warm_s=0.009, calls=3)  # paused
    assert len(dear._reader.advised) == 2
    _advise(dear, cold_s=0.010, warm_s=0.009, calls=1)  # tries again
    assert len(dear._reader.advised) == 3

    paying = _started(_selector(picks, cost_s=0.001), _Reader(), [_Layer([])] * 2)
    _advise(paying, cold_s=0.010, warm_s=0.002, calls=6)  # saves 8 ms, costs 1 ms
    assert len(paying._reader.advised) == 6 and paying.saving_s() > 0.005

    useless = _started(_selector(picks), _Reader(), [_Layer([])] * 2)
    _advise(useless, cold_s=0.010, warm_s=0.011, calls=3)  # advised reads are no faster
    assert len(useless._reader.advised) == 2  # advised twice (the second learns), then paused


def test_relu2_decodes_the_same_text_with_and_without_the_look_ahead(relu2_calibrated, monkeypatch):
    """End to end on relu2-8m's predictor, store uncached: the look-ahead changes what the kernel
    reads early, never the text, and the neurons it advised are among those read. (Never paused
    here: this tiny model's reads are cheaper than its predictor call.)"""
    monkeypatch.setattr(lookahead, "RETRY_CALLS", 0)
    import pytest
    from mlx_lm import generate

    import mlx_flash

    texts, stats = {}, {}
    for on in (True, False):
        model, tokenizer = mlx_flash.load(  # half pinned: misses enough to foresee
            relu2_calibrated, ffn_cache=0.3, pin_share=0.5, page_cache=False, lookahead=on
        )
        if on and model.flash.lookahead is None:
            pytest.skip(f"no kernel read-ahead here (reads: {model.flash.reader.cache_mode})")
        texts[on] = generate(model, tokenizer, "The history of", max_tokens=24)
        stats[on] = model.flash.telemetry.summary()
        if on:
            per_layer = model.flash.telemetry.lookahead_recall_per_layer()
        model.flash.close()
    assert texts[True] == texts[False]
    assert 0.2 < stats[True]["lookahead_recall"] <= 1.0
    assert stats[False]["lookahead_recall"] == 0.0
    assert per_layer[0] == 0.0 and max(per_layer[1:]) > 0.2  # nothing is advised for layer 0
