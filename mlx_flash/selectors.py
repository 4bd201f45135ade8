"""Selectors decide, from a layer's FFN input, which neurons this token uses.

A selector is called with the FFN input flattened to [tokens, d_model] and returns sorted unique
neuron ids (numpy int64). For several tokens at once (a batch of sequences decoding together) the
ids are the union over the tokens, so every sequence gets every neuron any of them needs.
"""

from __future__ import annotations

from typing import Callable, Protocol

import mlx.core as mx
import numpy as np


class Selector(Protocol):
    needs_input: bool  # whether the selector reads x (forces evaluation of the layer input)

    def __call__(self, layer: int, x: mx.array) -> np.ndarray: ...


class DenseSelector:
    """Every neuron: the exact FFN. With a buffer smaller than the FFN it streams the whole FFN each
    token, which is the paper's naive baseline."""

    needs_input = False

    def __init__(self, d_ffn: int):
        self._all = np.arange(d_ffn, dtype=np.int64)

    def __call__(self, layer: int, x: mx.array) -> np.ndarray:
        return self._all


class FixedSelector:
    """Ids chosen by a function of (layer, x) — for tests and experiments that inject selections."""

    needs_input = True

    def __init__(self, choose: Callable[[int, mx.array], np.ndarray]):
        self._choose = choose

    def __call__(self, layer: int, x: mx.array) -> np.ndarray:
        return np.unique(np.asarray(self._choose(layer, x), dtype=np.int64))
