"""Scale a recorded neuron trace to a larger FFN: more neurons per layer, more layers.

Why: the 7B-shaped bench (``mlx_flash.bench --synthetic llama-2-7b``) should select neurons as a
real model does, and the models we can run here are small. What decides the I/O of a selection is
each layer's density (the share of neurons a token selects), the token-to-token overlap (what the
window keeps) and the runs of adjacent ids (what one read can fetch); the scaled trace keeps all
three.

Method. A source layer of ``n`` neurons becomes ``ceil(N / n)`` copies of itself, each a block of
``n`` consecutive target ids (the last block cut at ``N``):
- copy c of target layer j replays source layer ``j * L_src // L`` (layers stretched: each source
  layer serves consecutive target layers) from its own starting token ``o[j, c]``, drawn at random
  so that copies are not in lockstep; no copy wraps around the end of the source trace, so the
  source's overlap between consecutive tokens is kept exactly;
- within a block, source id ``i`` becomes ``(i + r[j, c]) mod n`` (a random rotation): adjacent
  source ids stay adjacent, so the run lengths are the source's (a run crossing the rotation's seam
  is split in two);
- the blocks are placed in the target id space in a random permutation.
Density is kept per copy (the last, cut block keeps it in expectation), so per layer; nothing is
made more contiguous than the source was.
"""

from __future__ import annotations

import numpy as np

from .runtime.errors import FlashFormatError
from .runtime.limit import run_lengths
from .runtime.trace import Trace


def scale_trace(trace: Trace, n_ids: int, n_layers: int, tokens: int, seed: int = 0) -> Trace:
    """``tokens`` tokens of ``trace`` (kind "neurons") scaled to ``n_ids`` neurons per layer and
    ``n_layers`` layers (see the module docstring)."""
    if trace.kind != "neurons":
        raise FlashFormatError(f"a trace of {trace.kind} cannot be scaled to neurons")
    if trace.tokens < tokens:
        raise FlashFormatError(
            f"the trace has {trace.tokens} tokens; {tokens} are needed (record a longer one)"
        )
    rng = np.random.default_rng(seed)
    n = trace.n_ids
    copies = -(-n_ids // n)
    plans = []
    for j in range(n_layers):
        source = j * trace.n_layers // n_layers
        starts = rng.integers(0, trace.tokens - tokens + 1, copies)
        shifts = rng.integers(0, n, copies)
        slots = rng.permutation(copies)
        plans.append((source, starts, shifts, slots))
    rows = []
    for t in range(tokens):
        for source, starts, shifts, slots in plans:
            parts = []
            for c in range(copies):
                ids = (trace.at(int(starts[c]) + t, source).astype(np.int64) + shifts[c]) % n
                ids += slots[c] * n
                parts.append(ids[ids < n_ids])
            rows.append(np.concatenate(parts))
    meta = {
        "scaled_from": trace.meta,
        "source_ids": n,
        "source_layers": trace.n_layers,
        "method": "copies of each source layer: own start token, rotated, blocks permuted; "
        "layers stretched",
        "seed": seed,
    }
    return Trace.from_rows("neurons", n_ids, n_layers, rows, meta)


def density(trace: Trace, layer: int) -> float:
    """Mean share of the layer's neurons a token selects."""
    return float(np.mean([trace.at(t, layer).size for t in range(trace.tokens)]) / trace.n_ids)


def overlap(trace: Trace, layer: int) -> float:
    """Share of a token's selected neurons that the token before also selected (the window's
    reuse at k = 1)."""
    kept = total = 0
    for t in range(1, trace.tokens):
        now = trace.at(t, layer)
        kept += np.isin(now, trace.at(t - 1, layer)).sum()
        total += now.size
    return kept / max(1, total)


def layer_run_lengths(trace: Trace, layer: int) -> np.ndarray:
    """Lengths of the runs of adjacent ids in each token's selection of the layer, all tokens."""
    return np.concatenate([run_lengths(trace.at(t, layer)) for t in range(trace.tokens)])
