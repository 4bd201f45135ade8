"""The memory plan: split a budget between the trunk, the KV cache, temporaries, the selector and
the neuron buffers.

The budget bounds the bytes MLX holds for the model (not the Python process), and the page cache
the look-ahead fills when the store is read uncached. Everything the model needs besides the FFN is
fixed; what is left becomes per-layer neuron rows, split into pinned rows
(resident for the whole run) and the sliding-window buffer. The model's facts are asked of the
built mlx-lm model (its KV caches) and of the trunk files (their tensors), not guessed from config
keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from .errors import BudgetError, OptionError
from .manifest import FLOAT_TENSORS, SAFETENSORS_DTYPES, Manifest, check_trunk_file
from .options import FlashOptions
from .sizes import format_size, parse_size, physical_memory

MIN_WINDOW_ROWS = 16  # below this, streaming chunks get too small to read efficiently
DEFAULT_BUDGET_SHARE = 0.5  # of physical RAM, when the user names no budget
_SAFETENSORS_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16"}
QUANTIZATION_PARTS = (".scales", ".biases")  # of a quantized module's packed weight
SAMPLING_BYTES_PER_LOGIT = 44  # logits, log-probabilities and sorts (sampling_temporaries)
LOOKAHEAD_MAX_BYTES = 8 << 20


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know of a model; bytes are as held in memory in the compute dtype."""

    n_layers: int
    d_model: int
    d_ffn: int
    vocab: int
    heads: int
    itemsize: int  # of the compute dtype
    trunk: int  # trunk weights
    load_transient: int  # the largest stored tensor the loader casts (alive next to its cast)
    # per layer: bytes per token, tokens kept (None: all)
    kv_layers: tuple[tuple[int, int | None], ...]
    # with kv_bits: per layer bytes per token once quantized, and the cached tokens from which
    # mlx-lm quantizes (quantized_kv_start) and by which it has (that plus one prefill step)
    kv_quantized: tuple[int, ...] = ()
    kv_switch: tuple[int, int] | None = None

    def kv_bytes(self, tokens: int) -> int:
        """KV cache bytes once ``tokens`` tokens are cached (mlx-lm grows caches in steps). With a
        quantized cache, the most held on the way: when mlx-lm quantizes the cache, the full and
        the quantized copies live together."""
        if self.kv_switch is None or tokens < self.kv_switch[0]:
            return self._kv(tokens, [per for per, _ in self.kv_layers])
        switch = min(tokens, self.kv_switch[1])
        both = self._kv(switch, [per for per, _ in self.kv_layers])
        both += self._kv(switch, self.kv_quantized)
        return max(both, self._kv(tokens, self.kv_quantized))

    def _kv(self, tokens: int, per_token: Iterable[int]) -> int:
        held = -(-tokens // KVCache.step) * KVCache.step
        caps = (cap for _, cap in self.kv_layers)
        return sum(
            per * (held if cap is None else min(held, cap))
            for per, cap in zip(per_token, caps, strict=True)
        )


def model_facts(
    model,
    config: dict,
    manifest: Manifest,
    trunk_files: Iterable[Path],
    dtype: mx.Dtype,
    options: FlashOptions,
) -> ModelFacts:
    """The facts of a freshly built (lazy, unevaluated) mlx-lm model computing in ``dtype``."""
    trunk = [trunk_facts(path, dtype) for path in trunk_files]
    held = sum(h for h, _ in trunk)
    transient = max((t for _, t in trunk), default=0)
    return shape_facts(model, config, manifest, held, transient, dtype, options)


def shape_facts(
    model,
    config: dict,
    manifest: Manifest,
    trunk: int,
    load_transient: int,
    dtype: mx.Dtype,
    options: FlashOptions,
) -> ModelFacts:
    """``model_facts`` with the trunk's bytes given (held, and the loader's cast transient): a
    forecast has shapes, not trunk files."""
    return ModelFacts(
        n_layers=len(model.layers),
        d_model=manifest.d_model,
        d_ffn=manifest.d_ffn,
        vocab=config.get("vocab_size", 0),
        heads=config.get("num_attention_heads") or config.get("n_head") or 1,
        itemsize=dtype.size,
        trunk=trunk,
        load_transient=load_transient,
        kv_layers=kv_layers(model, dtype.size, options),
        **quantized_kv(model, dtype.size, options),
    )


def cast_on_load(name: str, floating: bool) -> bool:
    """Whether the loader casts this trunk tensor to the compute dtype: floats, except the scales
    and biases of quantized modules (kept as stored, with their packed words)."""
    return floating and not name.endswith(QUANTIZATION_PARTS)


def trunk_facts(path: Path, dtype: mx.Dtype) -> tuple[int, int]:
    """(bytes the tensors of one trunk file take in memory, stored bytes of its largest tensor
    the loader casts): cast floats in the compute dtype, the rest as stored."""
    held = transient = 0
    for name, t in check_trunk_file(path).items():
        stored = t["data_offsets"][1] - t["data_offsets"][0]
        if not cast_on_load(name, t["dtype"] in FLOAT_TENSORS):
            held += stored
            continue
        held += stored // SAFETENSORS_DTYPES[t["dtype"]] * dtype.size
        if t["dtype"] != _SAFETENSORS_NAMES.get(dtype):
            transient = max(transient, stored)
    return held, transient


def kv_layers(model, itemsize: int, options: FlashOptions) -> tuple[tuple[int, int | None], ...]:
    """Per layer, KV bytes per token and the tokens its cache keeps, asked of the model's own
    caches.

    One token is run through the model lazily: nothing is evaluated, only the caches' shapes
    are read. A rotating cache (sliding-window layers, ``max_kv_size``) keeps its size plus
    one prefill step.
    """
    caches = _lazy_caches(model, options)
    out = []
    for c in caches:
        keys = getattr(c, "keys", None)
        if keys is None:  # a fixed-size state (e.g. recurrent layers): counted whole
            out.append((sum(a.size for a in c.state if isinstance(a, mx.array)) * itemsize, 1))
            continue
        per_token = (keys.size + c.values.size) * itemsize // keys.shape[-2]
        rotating = isinstance(c, RotatingKVCache)
        out.append((per_token, c.max_size + options.prefill_step_size if rotating else None))
    return tuple(out)


def _lazy_caches(model, options: FlashOptions) -> list:
    """The model's own KV caches after one token run through it lazily (shapes, no memory)."""
    caches = make_prompt_cache(model, options.max_kv_size)
    model(mx.zeros((1, 1), dtype=mx.int32), cache=caches)
    return caches


def quantized_kv(model, itemsize: int, options: FlashOptions) -> dict:
    """With ``kv_bits``: per layer KV bytes per token once mlx-lm's ``to_quantized`` has
    quantized the cache (asked of it, lazily), and when that happens. mlx-lm cannot quantize a
    rotating cache (``max_kv_size``, sliding-window layers): refused here, before it fails."""
    if options.kv_bits is None:
        return {}
    per_token = []
    for c in _lazy_caches(model, options):
        if isinstance(c, RotatingKVCache) or not hasattr(c, "to_quantized"):
            raise OptionError(
                f"kv_bits: mlx-lm cannot quantize this model's {type(c).__name__} "
                "(a rotating cache: max_kv_size, or sliding-window layers)"
            )
        if c.keys.shape[-1] % options.kv_group_size:
            raise OptionError(
                f"kv_group_size {options.kv_group_size} does not divide the KV head size "
                f"{c.keys.shape[-1]}"
            )
        q = c.to_quantized(group_size=options.kv_group_size, bits=options.kv_bits)
        arrays = [*q.keys, *q.values]
        words = sum(a.nbytes for a in arrays if a.dtype == mx.uint32)
        floats = sum(a.size for a in arrays if a.dtype != mx.uint32) * itemsize
        per_token.append((words + floats) // c.keys.shape[-2])
    start = options.quantized_kv_start
    return {
        "kv_quantized": tuple(per_token),
        "kv_switch": (start, start + options.prefill_step_size),
    }


def prefill_temporaries(facts: ModelFacts, options: FlashOptions) -> int:
    """Peak bytes of activations during a prefill step (hidden states, FFN rows, attention scores)
    and of sampling a token.

    A prefill chunk late in the context attends to every earlier token: its scores (and the boolean
    causal mask) span the whole context, not just the chunk. A growing KV cache copies one layer's
    cache while it grows (layers are evaluated one after another).
    """
    step, itemsize = options.prefill_step_size, facts.itemsize
    keys = max(context_tokens(options), step)
    hidden = 12 * step * facts.d_model
    ffn = 3 * step * facts.d_ffn
    scores = facts.heads * step * keys
    mask = -(-step * keys // itemsize)
    growth = facts.kv_bytes(context_tokens(options)) // facts.n_layers
    sampling = sampling_temporaries(facts, 1 + options.num_draft_tokens)
    return (hidden + ffn + scores + mask) * itemsize + growth + sampling


def sampling_temporaries(facts: ModelFacts, rows: int) -> int:
    """Peak bytes of sampling ``rows`` tokens at once (speculative decoding samples the last token
    and every draft token of a verify step): logits, log-probabilities and the sampler's sorts.

    Measured on a 262144-token vocabulary, per row: greedy 2, min-p 4, top-p with top-k 10.25
    float32 arrays of the vocabulary's size, 6 to 9 when verifying 2 to 8 draft tokens
    (``SAMPLING_BYTES_PER_LOGIT`` allows 11).
    """
    return SAMPLING_BYTES_PER_LOGIT * facts.vocab * rows


def context_tokens(options: FlashOptions) -> int:
    """Tokens the KV cache is planned for: the context, or less with a rotating cache."""
    if options.max_kv_size is None:
        return options.max_context
    return min(options.max_context, options.max_kv_size + options.prefill_step_size)


def budget_bytes(options: FlashOptions) -> int:
    """The budget in bytes: as asked, else a share of physical RAM."""
    if options.memory_budget is None:
        return int(DEFAULT_BUDGET_SHARE * physical_memory())
    return parse_size(options.memory_budget)


@dataclass(frozen=True)
class BudgetPlan:
    total: int
    trunk: int
    kv_cache: int
    temporaries: int
    selector: int  # predictors / gate matrices kept in DRAM
    neuron_bytes: int  # one neuron's rows in the buffers (compute dtype), per layer
    n_layers: int
    d_ffn: int
    pinned_rows: int  # per layer
    window_rows: int  # per layer
    # loading: one stored tensor beside its cast, before the buffers, KV cache and temporaries exist
    load_transient: int = 0
    lookahead: int = 0  # page cache the look-ahead may fill

    @property
    def buffers(self) -> int:
        return (self.pinned_rows + self.window_rows) * self.neuron_bytes * self.n_layers

    @property
    def loading(self) -> int:
        """What MLX holds at most while the trunk loads (the selector is read first)."""
        return self.trunk + self.selector + self.load_transient

    @property
    def used(self) -> int:
        """What MLX holds at most: while loading, or while running."""
        running = self.trunk + self.kv_cache + self.temporaries + self.selector + self.buffers
        return max(running + self.lookahead, self.loading)

    @property
    def ffn_share(self) -> float:
        """Share of each layer's FFN rows that the buffers hold."""
        return (self.pinned_rows + self.window_rows) / self.d_ffn

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "buffers": self.buffers,
            "used": self.used,
            "ffn_share": self.ffn_share,
        }

    def describe(self) -> str:
        f = format_size
        return (
            f"budget {f(self.total)}: trunk {f(self.trunk)}, KV cache {f(self.kv_cache)}, buffers "
            f"{f(self.buffers)} ({self.pinned_rows} pinned + {self.window_rows} window rows of "
            f"{self.d_ffn} per layer, {100 * self.ffn_share:.0f}% of the FFN), selector "
            f"{f(self.selector)}, temporaries {f(self.temporaries)}"
            + (f", look-ahead {f(self.lookahead)}" if self.lookahead else "")
        )


def minimum_bytes(facts: ModelFacts, options: FlashOptions, selector: int, row_bytes: int) -> int:
    """The smallest budget that loads and runs the model with this selector and buffer row
    size."""
    fixed = _fixed(facts, options, selector)
    running = sum(fixed.values()) + min(facts.d_ffn, MIN_WINDOW_ROWS) * row_bytes * facts.n_layers
    return max(running, facts.trunk + selector + facts.load_transient)


def lookahead_bytes(facts: ModelFacts, options: FlashOptions) -> int:
    """Page cache the look-ahead may fill (``lookahead.py``): the next layer's expected records,
    up to half a layer's FFN and at most ``LOOKAHEAD_MAX_BYTES``; 0 when it does not run."""
    if not options.lookahead or options.page_cache:
        return 0
    return min(LOOKAHEAD_MAX_BYTES, facts.d_ffn * 3 * facts.d_model * facts.itemsize // 2)


def _fixed(facts: ModelFacts, options: FlashOptions, selector: int) -> dict[str, int]:
    return {
        "trunk": facts.trunk,
        "kv_cache": facts.kv_bytes(context_tokens(options)),
        "temporaries": prefill_temporaries(facts, options),
        "selector": selector,
        "lookahead": lookahead_bytes(facts, options),
    }


def buffer_rows(facts: ModelFacts, options: FlashOptions, selector: int, row_bytes: int) -> int:
    """Neuron rows per layer the budget leaves for the buffers (pinned + window), at most the
    FFN's (``options.ffn_cache`` fixes their share instead of filling the budget)."""
    spare = budget_bytes(options) - sum(_fixed(facts, options, selector).values())
    rows = max(0, spare) // (row_bytes * facts.n_layers)
    if options.ffn_cache is not None:
        rows = min(
            rows, max(min(facts.d_ffn, MIN_WINDOW_ROWS), round(options.ffn_cache * facts.d_ffn))
        )
    return min(rows, facts.d_ffn)


def _pinned_rows(
    rows: int, d_ffn: int, options: FlashOptions, streams_all: bool, frequency: np.ndarray | None
) -> int:
    """Of a layer's ``rows`` buffer rows (fewer than ``d_ffn``), those pinned: ``pin_share`` of
    them if asked; else for dense streaming ``2 rows - d_ffn``, for a selector with calibration
    frequencies what the window leaves (``window_fit``), for any other half.

    Streaming every neuron, the rest goes through the window buffer in chunks of its size and the
    last chunk stays for the next token (``FlashFFN._stream``). Pinning ``2 rows - d_ffn`` leaves
    exactly two chunks, so a token reads the ``d_ffn - rows`` neurons memory cannot hold, once, in
    one call per layer: the least any split reads. Half pinned would leave three chunks whose kept
    one alternates between full and short: more bytes, in two calls.
    """
    if options.pin_share is not None:
        return int(rows * options.pin_share)
    if streams_all:
        return max(0, 2 * rows - d_ffn)
    if frequency is not None:
        return window_fit(frequency, rows)
    return rows // 2


def window_fit(frequency: np.ndarray, rows: int) -> int:
    """The most of a layer's hottest neurons to pin (``frequency``: [layers, d_ffn], the chance a
    token selects each) while the other rows still hold the expected union of two tokens'
    selections among the unpinned (mean over layers): this token's and room for as much again;
    0 when no split leaves that.

    Why: a selection that outgrows the window's rows is streamed through them in chunks, and what
    the window kept is read again; a window barely too small (half pinned, for the gate on SmolLM2)
    read more than no pinning. Beyond that room, pinned rows (never read) beat a longer history.
    Tokens are taken as independent, which overstates the union of correlated tokens.
    """
    f = np.sort(np.clip(frequency, 0.0, 1.0), axis=1)[:, ::-1]
    union = (1.0 - (1.0 - f) ** 2).mean(axis=0)  # two tokens, by rank of heat
    after = np.cumsum(union[::-1])[::-1]  # after[p]: the union of the neurons from rank p on
    pinned = np.arange(rows + 1)
    fits = np.flatnonzero(after[pinned] <= rows - pinned)
    return int(fits[-1]) if fits.size else 0


def plan_memory(
    facts: ModelFacts,
    options: FlashOptions,
    selector: int,
    row_bytes: int,
    streams_all: bool = False,
    frequency: np.ndarray | None = None,
) -> BudgetPlan:
    """Rows per layer the budget allows; a budget below the minimum is refused with what is needed.

    ``selector``: bytes the selector holds; ``row_bytes``: one neuron's rows in a layer's
    buffers; ``streams_all``: every neuron is computed every token (dense streaming);
    ``frequency``: the selector's chance of selecting each neuron (``_pinned_rows``).
    ``options.ffn_cache`` fixes the buffers' share of each layer's FFN instead of filling the
    budget.
    """
    total = budget_bytes(options)
    fixed = _fixed(facts, options, selector)
    min_rows = min(facts.d_ffn, MIN_WINDOW_ROWS)
    needed = minimum_bytes(facts, options, selector, row_bytes)
    if total < needed:
        labels = {
            "trunk": "trunk",
            "kv_cache": "KV cache",
            "temporaries": "temporaries",
            "selector": "selector",
            "lookahead": "look-ahead",
        }
        parts = ", ".join(f"{labels[k]} {format_size(v)}" for k, v in fixed.items())
        buffers = format_size(min_rows * row_bytes * facts.n_layers)
        raise BudgetError(
            f"memory budget {format_size(total)} is too small: this model needs at least "
            f"{format_size(needed)} ({parts}, minimal neuron buffers {buffers}; loading casts a "
            f"stored tensor of {format_size(facts.load_transient)})"
        )
    rows = buffer_rows(facts, options, selector, row_bytes)
    pinned, window = facts.d_ffn, 0
    if rows < facts.d_ffn:
        pinned = _pinned_rows(rows, facts.d_ffn, options, streams_all, frequency)
        window = rows - pinned
        if window < min_rows:
            window, pinned = min_rows, max(0, rows - min_rows)
    return BudgetPlan(
        total,
        fixed["trunk"],
        fixed["kv_cache"],
        fixed["temporaries"],
        selector,
        row_bytes,
        facts.n_layers,
        facts.d_ffn,
        pinned,
        window,
        facts.load_transient,
        fixed["lookahead"],
    )
