"""Routing traces: per token and per layer, the ids a model used (experts, or FFN neurons).

Why: cache policies and benchmarks should run on what real models do; one file format serves
traces recorded from a run (``--record-trace FILE``) and traces drawn from a routing model
(``mlx_flash.bench --synthetic``), for experts now and for neurons later.

File: a numpy ``.npz`` holding ``format`` ("mlx_flash-trace"), ``version`` (1), ``kind`` ("experts"
or "neurons"), ``n_ids`` (experts or neurons per layer), ``n_layers``, and the ids in CSR form: row
``token * n_layers + layer`` holds ``ids[indptr[row]:indptr[row + 1]]`` (int32, sorted, distinct);
``meta`` is a JSON string saying where the trace came from.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FlashFormatError
from .files import atomic_path

TRACE_FORMAT = "mlx_flash-trace"
TRACE_VERSION = 1
KINDS = ("experts", "neurons")


@dataclass(frozen=True)
class Trace:
    """A routing trace (see the module docstring for the layout)."""

    kind: str
    n_ids: int
    n_layers: int
    indptr: np.ndarray
    ids: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return (self.indptr.size - 1) // self.n_layers

    def at(self, token: int, layer: int) -> np.ndarray:
        """The ids ``token`` used in ``layer``."""
        row = token * self.n_layers + layer
        return self.ids[self.indptr[row] : self.indptr[row + 1]]

    @classmethod
    def from_rows(
        cls, kind: str, n_ids: int, n_layers: int, rows: list[np.ndarray], meta: dict | None = None
    ) -> Trace:
        """A trace from one array of ids per (token, layer), token-major."""
        rows = [np.unique(np.asarray(r, dtype=np.int64)) for r in rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([r.size for r in rows], out=indptr[1:])
        ids = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
        return cls(kind, n_ids, n_layers, indptr, ids, dict(meta or {}))

    def save(self, path: str | Path) -> None:
        """Write the trace atomically as ``.npz``."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                format=np.array(TRACE_FORMAT),
                version=np.array(TRACE_VERSION),
                kind=np.array(self.kind),
                n_ids=np.array(self.n_ids),
                n_layers=np.array(self.n_layers),
                indptr=self.indptr,
                ids=self.ids,
                meta=np.array(json.dumps(self.meta)),
            )


def load_trace(path: str | Path) -> Trace:
    """Read a trace; anything that is not a valid one is a FlashFormatError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            fields = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FlashFormatError(f"{path}: not a readable trace file ({e})") from e
    if str(fields.get("format", "")) != TRACE_FORMAT or "version" not in fields:
        raise FlashFormatError(f"{path}: not an {TRACE_FORMAT} file")
    if int(fields["version"]) != TRACE_VERSION:
        raise FlashFormatError(
            f"{path}: trace version {int(fields['version'])} (this mlx_flash reads {TRACE_VERSION})"
        )
    try:
        trace = Trace(
            kind=str(fields["kind"]),
            n_ids=int(fields["n_ids"]),
            n_layers=int(fields["n_layers"]),
            indptr=fields["indptr"].astype(np.int64),
            ids=fields["ids"].astype(np.int32),
            meta=json.loads(str(fields.get("meta", "{}"))),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise FlashFormatError(f"{path}: damaged trace ({e})") from e
    _check(trace, path)
    return trace


def _check(t: Trace, path: Path) -> None:
    rows = t.indptr.size - 1
    ok = t.kind in KINDS and t.n_layers > 0 and t.n_ids > 0 and rows % t.n_layers == 0
    ok = ok and t.indptr[0] == 0 and t.indptr[-1] == t.ids.size and np.all(np.diff(t.indptr) >= 0)
    if not ok or (t.ids.size and (t.ids.min() < 0 or t.ids.max() >= t.n_ids)):
        raise FlashFormatError(
            f"{path}: damaged trace ({t.kind}, {t.n_layers} layers, {t.n_ids} ids, {rows} rows, "
            f"{t.ids.size} ids stored)"
        )


class TraceRecorder:
    """Collects a running model's routing into a ``Trace``: layer 0 of a forward pass opens a new
    block of tokens, every layer adds each token's ids."""

    def __init__(self, kind: str, n_ids: int, n_layers: int, meta: dict | None = None) -> None:
        self.kind, self.n_ids, self.n_layers, self.meta = kind, n_ids, n_layers, meta or {}
        self._passes: list[list[np.ndarray | None]] = []

    def add(self, layer: int, per_token: np.ndarray) -> None:
        """``per_token``: [tokens, k] ids of this call (one row per token)."""
        if layer == 0 or not self._passes:
            self._passes.append([None] * self.n_layers)
        self._passes[-1][layer] = np.asarray(per_token).reshape(per_token.shape[0], -1)

    def trace(self) -> Trace:
        """What was recorded; passes a layer never reported (an interrupted pass) are left out."""
        rows = []
        for layers in self._passes:
            if any(a is None for a in layers):
                continue
            for t in range(layers[0].shape[0]):
                rows += [a[t] for a in layers]
        return Trace.from_rows(self.kind, self.n_ids, self.n_layers, rows, self.meta)
