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


def test_advises_the_next_layers_misses_and_counts_recall():
    reader = _Reader()
    layers = [_Layer([]), _Layer([2, 5]), _Layer([])]
    ahead = LookAhead(_selector({1: [1, 2, 3, 5, 8]}), reader, layers, max_bytes=1000)
    assert ahead.recalled(0, np.array([4])) is None  # nothing was advised for layer 0
    ahead.advise_next(0, mx.zeros((1, 4)), read_s=1.0, advised=False)
    assert reader.advised == [(1, [1, 3, 8])]  # resident neurons are not advised
    assert ahead.recalled(1, np.array([1, 3, 4, 9])) == 2
    assert ahead.recalled(1, np.array([1])) is None  # counted once
    ahead.advise_next(2, mx.zeros((1, 4)), read_s=1.0, advised=False)  # the last layer: no next
    assert len(reader.advised) == 1


def test_the_cap_limits_what_is_advised():
    reader = _Reader()
    ahead = LookAhead(_selector({1: list(range(50))}), reader, [_Layer([])] * 2, max_bytes=1000)
    ahead.advise_next(0, mx.zeros((1, 4)), read_s=1.0, advised=False)
    assert len(reader.advised[0][1]) == 10  # 1000 bytes of 100-byte records


def test_pauses_while_the_selector_costs_more_than_the_reads_it_hides(monkeypatch):
    monkeypatch.setattr(lookahead, "RETRY_CALLS", 3)
    reader = _Reader()
    picks = {1: [1, 2]}
    ahead = LookAhead(_selector(picks, cost_s=0.01), reader, [_Layer([])] * 2, max_bytes=1000)
    ahead.advise_next(0, mx.zeros((1, 4)), read_s=0.001, advised=False)  # selector 10x dearer
    assert len(reader.advised) == 1
    for _ in range(3):  # paused
        ahead.advise_next(0, mx.zeros((1, 4)), read_s=0.001, advised=False)
    assert len(reader.advised) == 1
    ahead.advise_next(0, mx.zeros((1, 4)), read_s=0.001, advised=False)  # tries again
    assert len(reader.advised) == 2
    # a selector far cheaper than the reads pauses all the same when what it advises is not read
    blind = LookAhead(_selector(picks, cost_s=0.002), _Reader(), [_Layer([])] * 2, max_bytes=1000)
    blind.advise_next(0, mx.zeros((1, 4)), read_s=0.01, advised=False)
    assert blind.recalled(1, np.array([7, 8, 9, 10])) == 0
    blind.advise_next(0, mx.zeros((1, 4)), read_s=0.01, advised=False)
    blind.advise_next(0, mx.zeros((1, 4)), read_s=0.01, advised=False)  # paused: nothing advised
    assert len(blind._reader.advised) == 2
    cheap = LookAhead(_selector(picks), reader, [_Layer([])] * 2, max_bytes=1000)
    for _ in range(5):  # a selector far cheaper than the reads never pauses
        cheap.advise_next(0, mx.zeros((1, 4)), read_s=1.0, advised=False)
    assert len(reader.advised) == 7


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
        model, tokenizer = mlx_flash.load(
            relu2_calibrated, ffn_cache=0.3, page_cache=False, lookahead=on
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
