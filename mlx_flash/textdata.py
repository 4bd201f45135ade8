"""Token windows from a text file: calibration (``convert``) and evaluation read text alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .runtime.errors import FlashError


def encode_text(tokenizer, text: str, max_tokens: int, piece_chars: int = 4000) -> np.ndarray:
    """The first ``max_tokens`` token ids of ``text``, encoded some lines at a time (tokenizers
    warn about, and slow down on, megabyte inputs)."""
    ids: list[int] = []
    lines = text.splitlines(keepends=True)
    start = 0
    while start < len(lines) and len(ids) < max_tokens:
        stop, size = start, 0
        while stop < len(lines) and size < piece_chars:
            size += len(lines[stop])
            stop += 1
        ids += tokenizer.encode("".join(lines[start:stop]), add_special_tokens=False)
        start = stop
    return np.array(ids[:max_tokens], dtype=np.int64)


def text_windows(
    tokenizer, path: str | Path, seq_len: int, max_windows: int | None, min_windows: int = 1
) -> np.ndarray:
    """[windows, seq_len] consecutive token windows from the start of the file ``path``."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    limit = seq_len * max_windows if max_windows else 1 << 62
    ids = encode_text(tokenizer, text, limit)
    n = ids.size // seq_len
    if n < min_windows:
        raise FlashError(
            f"{path}: {ids.size} tokens, fewer than {min_windows} window(s) of {seq_len} tokens"
        )
    return ids[: n * seq_len].reshape(n, seq_len)
