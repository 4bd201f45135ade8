"""``mlx_flash.load``: an mlx-lm model whose FFN modules stream from a flash model directory.

The trunk loads through mlx-lm's own ``load_model`` (sanitize, quantization, strict checks); the FFN
modules are swapped for ``FlashFFN`` before any weight is evaluated, and no FFN record is read until
the first forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm.utils import _get_classes, load_config, load_tokenizer, load_model

from .adapters import set_ffn, spec_for
from .budget import BudgetPlan, plan_budget
from .buffer import NeuronBuffer
from .errors import FlashError, FlashFormatError
from .flash_ffn import FlashFFN, _LayerState
from .manifest import Manifest, check_store_file, read_manifest
from .selectors import DenseSelector, Selector
from .sizes import physical_memory
from .store import StoreReader
from .telemetry import Telemetry
from .window import SlidingWindow

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
DEFAULT_BUDGET_SHARE = 0.5  # of physical RAM, when the user names no budget


@dataclass
class FlashRuntime:
    """What a loaded flash model carries besides its trunk: store, buffers, selector, telemetry."""

    directory: Path
    manifest: Manifest
    reader: StoreReader
    plan: BudgetPlan
    selector: Selector
    telemetry: Telemetry
    compute_dtype: mx.Dtype
    window: int
    layers: list = field(default_factory=list)  # the FlashFFN module of every layer

    @property
    def activation(self) -> str:
        return self.manifest.activation

    @property
    def gated(self) -> bool:
        return self.manifest.gated

    @property
    def quantization(self):
        return self.manifest.quantization

    def close(self) -> None:
        self.reader.close()


def _kv_bytes(config: dict, n_layers: int, tokens: int, itemsize: int) -> int:
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size") or config.get("n_embd")
    head_dim = config.get("head_dim") or hidden // heads
    return 2 * n_layers * kv_heads * head_dim * tokens * itemsize


def _temporaries(config: dict, manifest: Manifest, prefill_tokens: int, window_rows: int, itemsize: int) -> int:
    """Peak bytes of activations during a prefill step: hidden states, FFN hidden rows, attention scores."""
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    vocab = config.get("vocab_size", 0)
    hidden = 12 * prefill_tokens * manifest.d_model
    ffn = 3 * prefill_tokens * max(window_rows, 1)
    scores = heads * prefill_tokens * prefill_tokens
    return (hidden + ffn + scores + 2 * vocab) * itemsize


def _buffer_parts(manifest: Manifest, dtype: mx.Dtype) -> dict[str, tuple[int, mx.Dtype]]:
    parts = {}
    for region in manifest.layers[0].regions:
        for p in region.parts:
            parts[p.name] = (p.length, mx.uint32 if p.dtype == "uint32" else dtype)
    return parts


def _check_directory(directory: Path) -> Manifest:
    manifest = read_manifest(directory)
    check_store_file(directory, manifest)
    if not (directory / "config.json").is_file():
        raise FlashFormatError(f"{directory / 'config.json'}: missing")
    if not list(directory.glob("model*.safetensors")):
        raise FlashFormatError(f"{directory}: no trunk weights (model*.safetensors)")
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer.model").is_file():
        raise FlashFormatError(f"{directory}: no tokenizer (tokenizer.json or tokenizer.model)")
    return manifest


@dataclass
class FlashOptions:
    """Run-time settings of a flash model (``load`` keywords; ``flash_settings.json`` stores defaults).

    ``memory_budget``: bytes MLX may hold for the model ("1.5GB", "40%" of RAM; default 50% of RAM):
    trunk + KV cache for ``max_context`` tokens + prefill temporaries + selector + neuron buffers.
    ``window``: tokens of history kept resident (the paper's k). ``pin_share``: share of the buffer
    rows pinned for the whole run (the paper's hybrid setting); the rest is the sliding-window buffer.
    ``ffn_share`` fixes the buffers' share of each layer's FFN rows instead of filling the budget.
    """

    memory_budget: str | int | None = None
    window: int = 4
    selector: str | Selector = "dense"
    threads: int = 32
    page_cache: bool = True
    max_context: int = 2048
    prefill_step_size: int = 512
    pin_share: float = 0.5
    ffn_share: float | None = None
    compute_dtype: str | None = None
    telemetry: bool = True


def prepare_runtime(directory: Path, config: dict, options: FlashOptions) -> FlashRuntime:
    """Check the directory, plan the budget and preallocate every layer's buffers (no record is read)."""
    manifest = _check_directory(directory)
    if config.get("model_type") != manifest.model_type:
        raise FlashFormatError(
            f"{directory / 'config.json'}: model_type {config.get('model_type')!r} does not match the manifest's "
            f"{manifest.model_type!r}"
        )
    compute_dtype = options.compute_dtype or ("float32" if mx.default_device() == mx.cpu else manifest.dtype)
    dtype = MX_DTYPES[compute_dtype]
    itemsize = dtype.size
    parts = _buffer_parts(manifest, dtype)
    neuron_bytes = sum(w * d.size for w, d in parts.values())
    trunk_stored = sum(f.stat().st_size for f in directory.glob("model*.safetensors"))
    trunk = int(trunk_stored * max(1.0, itemsize / MX_DTYPES[manifest.dtype].size))
    kv = _kv_bytes(config, manifest.n_layers, options.max_context, itemsize)
    budget = options.memory_budget
    budget = budget if budget is not None else int(DEFAULT_BUDGET_SHARE * physical_memory())
    temporaries = _temporaries(config, manifest, options.prefill_step_size, manifest.d_ffn, itemsize)
    plan = plan_budget(budget, trunk=trunk, kv_cache=kv, temporaries=temporaries, selector=0,
                       neuron_bytes=neuron_bytes, n_layers=manifest.n_layers, d_ffn=manifest.d_ffn,
                       pin_share=options.pin_share, ffn_share=options.ffn_share)
    selector = options.selector
    if isinstance(selector, str):
        if selector != "dense":
            raise FlashError(f"unknown selector {selector!r} (available: dense)")
        selector = DenseSelector(manifest.d_ffn)
    reader = StoreReader(directory, manifest, threads=options.threads, page_cache=options.page_cache)
    try:
        runtime = FlashRuntime(directory, manifest, reader, plan, selector,
                               Telemetry(manifest.n_layers, manifest.d_ffn, enabled=options.telemetry), dtype,
                               options.window)
        runtime.layers = [_make_layer(runtime, i, parts) for i in range(manifest.n_layers)]
    except BaseException:
        reader.close()
        raise
    return runtime


def install(model, runtime: FlashRuntime):
    """Swap every FFN module of a freshly built mlx-lm model for the runtime's FlashFFN modules."""
    manifest = runtime.manifest
    if len(model.layers) != manifest.n_layers:
        raise FlashFormatError(
            f"{runtime.directory / 'config.json'}: {len(model.layers)} layers but the store has {manifest.n_layers}"
        )
    spec = spec_for(manifest.model_type)
    for i, module in enumerate(runtime.layers):
        set_ffn(model, spec, i, module)
    model.flash = runtime
    return model


def load(path: str | Path, memory_budget: str | int | None = None, **options):
    """Load a flash model directory; returns ``(model, tokenizer)`` usable with mlx_lm.generate.

    Keywords are those of ``FlashOptions``. ``model.flash`` is the ``FlashRuntime`` (telemetry, plan,
    store reader).
    """
    directory = Path(path)
    opts = FlashOptions(memory_budget=memory_budget, **options)
    if not (directory / "config.json").is_file():
        _check_directory(directory)  # says what is missing, manifest first
    config = load_config(directory)
    runtime = prepare_runtime(directory, config, opts)
    try:
        def build(config: dict):
            model_class, args_class = _get_classes(config)
            return (lambda args: install(model_class(args), runtime)), args_class

        try:
            model, _ = load_model(directory, lazy=True, strict=True, get_model_classes=build,
                                  model_config={"model_file": None})
        except ValueError as e:
            raise FlashFormatError(f"{directory}: trunk weights do not match config.json ({e})") from None
        model.update(tree_map(lambda p: p.astype(runtime.compute_dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
        mx.eval(model.parameters())
        tokenizer = load_tokenizer(directory, eos_token_ids=config.get("eos_token_id"))
    except BaseException:
        runtime.close()
        raise
    return model, tokenizer


def _make_layer(runtime: FlashRuntime, index: int, parts: dict[str, tuple[int, mx.Dtype]]) -> FlashFFN:
    """One layer's FlashFFN with its preallocated buffers (rows stay empty until the first token)."""
    plan, manifest, reader = runtime.plan, runtime.manifest, runtime.reader
    state = _LayerState(index=index, d_ffn=manifest.d_ffn, pinned=None,
                        pinned_ids=np.arange(plan.pinned_rows, dtype=np.int64), buffer=None, window=None,
                        down_bias=None)

    def load_rows(ids: np.ndarray, dest: dict[str, np.ndarray], rows: np.ndarray) -> None:
        t0 = time.perf_counter()
        count = reader.read_neurons(index, ids, dest, rows)
        state.io[0] += count.bytes
        state.io[1] += count.reads
        state.io[2] += time.perf_counter() - t0

    if plan.pinned_rows:
        state.pinned = NeuronBuffer(plan.pinned_rows, parts, load_rows, manifest.d_ffn)
    if plan.window_rows:
        state.buffer = NeuronBuffer(plan.window_rows, parts, load_rows, manifest.d_ffn)
        state.window = SlidingWindow(runtime.window, plan.window_rows, manifest.d_ffn)
    if "down_bias" in manifest.layers[index].blobs:
        state.down_bias = mx.array(reader.read_blob(index, "down_bias", np.float32)).astype(runtime.compute_dtype)
    return FlashFFN(runtime, state)
