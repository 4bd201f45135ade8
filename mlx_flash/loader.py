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
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import _get_classes, load_config, load_tokenizer, load_model

from .adapters import ACTIVATIONS, set_ffn, spec_for
from .budget import BudgetPlan, plan_budget
from .buffer import NeuronBuffer
from .costmodel import CostModel, cost_model_for
from .errors import BudgetError, FlashError, FlashFormatError, UnsupportedModelError
from .flash_ffn import FlashFFN, ThreadGuard, _LayerState
from .manifest import MANIFEST_FILE, Manifest, check_store_file, check_trunk_file, read_manifest
from .calibration import read_calibration
from .selectors import GATE_PARTS, Selector, make_selector, resolve
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
    guard: ThreadGuard = field(
        default_factory=ThreadGuard, repr=False
    )  # one thread at a time (see load)
    cost: CostModel = field(
        default_factory=CostModel.defaults
    )  # this disk's probe (mlx_flash.probe) or defaults
    compute_rows: str = "resident"  # FlashOptions.compute_rows

    @property
    def activation(self) -> str:
        return self.manifest.activation

    @property
    def gated(self) -> bool:
        return self.manifest.gated

    @property
    def quantization(self):
        return self.manifest.quantization

    def io_estimate_ms(self, phase: str = "decode") -> float:
        """I/O ms per token the cost model predicts for what was read; compare with the measured io_ms_per_token."""
        s = self.telemetry.summary(phase)
        return 1e3 * self.cost.read_seconds(
            s["flash_bytes_per_token"], s["reads_per_token"], self.reader.threads
        )

    def close(self) -> None:
        self.reader.close()


def _kv_bytes(config: dict, n_layers: int, tokens: int, itemsize: int) -> int:
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size") or config.get("n_embd")
    head_dim = config.get("head_dim") or hidden // heads
    return 2 * n_layers * kv_heads * head_dim * tokens * itemsize


def _temporaries(
    config: dict,
    manifest: Manifest,
    prefill_tokens: int,
    window_rows: int,
    itemsize: int,
    context: int = 0,
) -> int:
    """Peak bytes of activations during a prefill step: hidden states, FFN hidden rows, attention scores.

    A prefill chunk late in the context attends to every earlier token: its scores (and the boolean
    causal mask) span ``context`` keys, not just the chunk (measured: 28 MB at 1536 + 512 tokens of
    relu2-8m, where chunk-only scores predicted 17 MB).
    """
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    vocab = config.get("vocab_size", 0)
    hidden = 12 * prefill_tokens * manifest.d_model
    ffn = 3 * prefill_tokens * max(window_rows, 1)
    keys = max(context, prefill_tokens)
    scores = heads * prefill_tokens * keys
    mask = -(-prefill_tokens * keys // itemsize)
    return (hidden + ffn + scores + mask + 2 * vocab) * itemsize


def _kv_capacity(max_context: int) -> int:
    """Tokens mlx-lm's KVCache holds for ``max_context`` (it grows in steps of ``KVCache.step``)."""
    return -(-max_context // KVCache.step) * KVCache.step


def _buffer_parts(
    manifest: Manifest, dtype: mx.Dtype, skip: tuple[str, ...] = ()
) -> dict[str, tuple[int, mx.Dtype]]:
    parts = {}
    for region in manifest.layers[0].regions:
        for p in region.parts:
            if p.name not in skip:
                parts[p.name] = (p.length, mx.uint32 if p.dtype == "uint32" else dtype)
    return parts


def _default_compute_dtype(manifest: Manifest) -> str:
    """float32 on the CPU (float16 matmul is slow there); on a GPU the model's own dtype, except that
    Gemma loses perplexity in float16 (its activations overflow) and computes in float32 instead."""
    if mx.default_device() == mx.cpu:
        return "float32"
    if manifest.dtype == "float16" and manifest.model_type.startswith("gemma"):
        return "float32"
    return manifest.dtype


def _check_directory(directory: Path) -> Manifest:
    manifest = read_manifest(directory)
    check_store_file(directory, manifest)
    if not (directory / "config.json").is_file():
        raise FlashFormatError(f"{directory / 'config.json'}: missing")
    trunk = sorted(directory.glob("model*.safetensors"))
    if not trunk:
        raise FlashFormatError(f"{directory}: no trunk weights (model*.safetensors)")
    for path in trunk:
        check_trunk_file(path)
    if (
        not (directory / "tokenizer.json").is_file()
        and not (directory / "tokenizer.model").is_file()
    ):
        raise FlashFormatError(f"{directory}: no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        spec_for(manifest.model_type)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{directory / MANIFEST_FILE}: {e}") from None
    if manifest.activation not in ACTIVATIONS:
        raise FlashFormatError(
            f"{directory / MANIFEST_FILE}: unknown activation {manifest.activation!r}"
        )
    return manifest


def _load_config(directory: Path) -> dict:
    try:
        config = load_config(directory)
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise FlashFormatError(f"{directory / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise FlashFormatError(f"{directory / 'config.json'}: not a JSON object")
    return config


@dataclass
class FlashOptions:
    """Run-time settings of a flash model (``load`` keywords; ``flash_settings.json`` stores defaults).

    ``memory_budget``: bytes MLX may hold for the model ("1.5GB", "40%" of RAM; default 50% of RAM):
    trunk + KV cache for ``max_context`` tokens + prefill temporaries + selector + neuron buffers.
    ``window``: tokens of history kept resident (the paper's k; 0 empties the window buffer after every
    forward pass, so nothing but the pinned rows survives between tokens). ``pin_share``: share of the buffer
    rows pinned for the whole run (the paper's hybrid setting); the rest is the sliding-window buffer.
    ``ffn_share`` fixes the buffers' share of each layer's FFN rows instead of filling the budget.
    ``threads``: parallel reads; None takes the disk's probe (``mlx_flash.probe``: the thread count that read
    batches of small records fastest), else 32. The probe also sets the size long runs are split into.
    ``selector``: "auto", "dense", "gate", "predictor" or a Selector (see ``mlx_flash.selectors``).
    ``sparsity``: target share of FFN neurons skipped per token (None: the conversion's; for ReLU-family
    FFNs that is exact zeros). ``compute_rows``: "resident" computes every resident row (pinned + the
    window's), "selected" only this token's selection (see ``mlx_flash.flash_ffn``).
    """

    memory_budget: str | int | None = None
    window: int = 4
    selector: str | Selector = "auto"
    threads: int | None = None
    page_cache: bool = True
    max_context: int = 2048
    prefill_step_size: int = 512
    pin_share: float = 0.5
    ffn_share: float | None = None
    compute_dtype: str | None = None
    telemetry: bool = True
    sparsity: float | None = None
    compute_rows: str = "resident"


def prepare_runtime(directory: Path, config: dict, options: FlashOptions) -> FlashRuntime:
    """Check the directory, plan the budget and preallocate every layer's buffers (no record is read)."""
    manifest = _check_directory(directory)
    if config.get("model_type") != manifest.model_type:
        raise FlashFormatError(
            f"{directory / 'config.json'}: model_type {config.get('model_type')!r} does not match the manifest's "
            f"{manifest.model_type!r}"
        )
    compute_dtype = options.compute_dtype or _default_compute_dtype(manifest)
    dtype = MX_DTYPES[compute_dtype]
    itemsize = dtype.size
    if options.compute_rows not in ("resident", "selected"):
        raise FlashError(
            f"compute_rows must be 'resident' or 'selected', not {options.compute_rows!r}"
        )
    trunk_stored = sum(f.stat().st_size for f in directory.glob("model*.safetensors"))
    trunk = int(trunk_stored * max(1.0, itemsize / MX_DTYPES[manifest.dtype].size))
    kv = _kv_bytes(config, manifest.n_layers, _kv_capacity(options.max_context), itemsize)
    budget = options.memory_budget
    budget = budget if budget is not None else int(DEFAULT_BUDGET_SHARE * physical_memory())
    temporaries = _temporaries(
        config,
        manifest,
        options.prefill_step_size,
        manifest.d_ffn,
        itemsize,
        _kv_capacity(options.max_context),
    )
    temporaries += (
        kv // manifest.n_layers
    )  # a growing KVCache copies one layer's cache (evaluated layer by layer)

    def check_budget(selector_bytes: int) -> None:
        plan_budget(
            budget,
            trunk=trunk,
            kv_cache=kv,
            temporaries=temporaries,
            selector=selector_bytes,
            neuron_bytes=sum(
                w * d.size for w, d in _buffer_parts(manifest, dtype, GATE_PARTS).values()
            ),
            n_layers=manifest.n_layers,
            d_ffn=manifest.d_ffn,
            pin_share=options.pin_share,
            ffn_share=options.ffn_share,
        )

    # refuse a budget too small before the selector reads anything (the gate selector holds a third of the FFN)
    selector = options.selector
    if isinstance(selector, str):
        gate_fits = True
        if (
            selector == "auto"
        ):  # a model bigger than memory: auto streams the gate rows rather than refuse
            try:
                check_budget(_gate_bytes(manifest, itemsize))
            except BudgetError:
                gate_fits = False
        selector = _resolve_selector(directory, manifest, selector, options.sparsity, gate_fits)
    check_budget(_gate_bytes(manifest, itemsize) if selector == "gate" else 0)
    cost = cost_model_for(directory)
    threads = options.threads or cost.reader_threads(
        min(r.record_size for r in manifest.layers[0].regions)
    )
    reader = StoreReader(
        directory,
        manifest,
        threads=threads,
        page_cache=options.page_cache,
        max_run_bytes=cost.run_bytes(threads),
    )
    try:
        if isinstance(selector, str):
            selector = make_selector(selector, directory, manifest, reader, dtype, options.sparsity)
        # the gate selector computes act(gate) from its own copy: buffers hold only up and down
        parts = _buffer_parts(
            manifest, dtype, GATE_PARTS if getattr(selector, "supplies_gate", False) else ()
        )
        plan = plan_budget(
            budget,
            trunk=trunk,
            kv_cache=kv,
            temporaries=temporaries,
            selector=getattr(selector, "nbytes", 0),
            neuron_bytes=sum(w * d.size for w, d in parts.values()),
            n_layers=manifest.n_layers,
            d_ffn=manifest.d_ffn,
            pin_share=options.pin_share,
            ffn_share=options.ffn_share,
        )
        calibration = read_calibration(directory, manifest)
        runtime = FlashRuntime(
            directory,
            manifest,
            reader,
            plan,
            selector,
            Telemetry(manifest.n_layers, manifest.d_ffn, enabled=options.telemetry),
            dtype,
            options.window,
            cost=cost,
            compute_rows=options.compute_rows,
        )
        # a selector that reads no input takes every neuron: pinning hot ones saves nothing, and a contiguous
        # pinned block leaves the rest to stream in large reads (the bench's hybrid configuration)
        hot = calibration if selector.needs_input else None
        runtime.layers = [
            _make_layer(runtime, i, parts, _pinned_ids(hot, i, plan.pinned_rows))
            for i in range(manifest.n_layers)
        ]
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
        _check_ffn_shape(model, spec, i, runtime)
        set_ffn(model, spec, i, module)
    model.flash = runtime
    return model


def load(path: str | Path, memory_budget: str | int | None = None, **options):
    """Load a flash model directory; returns ``(model, tokenizer)`` usable with mlx_lm.generate.

    Keywords are those of ``FlashOptions``. ``model.flash`` is the ``FlashRuntime`` (telemetry, plan,
    store reader). A damaged or mismatched directory raises a ``FlashError`` naming the file, before
    anything large is allocated; a budget too small raises ``BudgetError`` with what the model needs.

    Memory: ``model.flash.plan`` is what MLX may hold for the model. MLX's buffer cache is capped at the
    plan's slack (``mx.set_cache_limit`` is process-wide and only ever lowered). Prefill in chunks of at
    most ``prefill_step_size`` tokens (pass the same value to ``mlx_lm.generate``, whose default is 2048)
    and stay within ``max_context`` tokens, or the KV cache and attention scores outgrow the plan. The
    Python process itself (interpreter, imports, tokenizer: about 150 MB) comes on top.

    Threads:
    - any number of flash models may live in one process; different models may run at the same time
      from different threads;
    - one model is used by one thread at a time: threads may take turns (put a lock around generation);
      a forward pass that overlaps another thread's pass of the same model raises ``FlashError``
      (buffers and windows are per model) and leaves the model usable;
    - MLX streams are per thread (mlx-lm's generation stream is thread-local): each thread evaluates
      its own work; pass arrays between threads only once evaluated;
    - let worker threads that ran MLX end well before the interpreter exits: MLX 0.32 on Linux aborts
      ("terminate called without an active exception") when a finished thread's compile cache is torn
      down during interpreter shutdown;
    - the store reader's own threads (``mlx_flash-store_N``) and its file are released by
      ``model.flash.close()``, or when the model is garbage-collected. Ctrl-C (KeyboardInterrupt) during
      generation stops within a read's time; the model stays consistent and usable (start a new prompt
      cache: the interrupted one is partly updated).
    """
    directory = Path(path)
    opts = FlashOptions(memory_budget=memory_budget, **options)
    if not (directory / "config.json").is_file():
        _check_directory(directory)  # says what is missing, manifest first
    config = _load_config(directory)
    runtime = prepare_runtime(directory, config, opts)
    try:

        def build(config: dict):
            model_class, args_class = _get_classes(config)
            return (lambda args: install(model_class(args), runtime)), args_class

        try:
            model, _ = load_model(
                directory,
                lazy=True,
                strict=True,
                get_model_classes=build,
                model_config={"model_file": None},
            )
        except ValueError as e:
            raise FlashFormatError(
                f"{directory}: trunk weights do not match config.json ({e})"
            ) from None
        except RuntimeError as e:  # MLX could not read a trunk file (the header check passed)
            raise FlashFormatError(f"{directory}: cannot read the trunk weights ({e})") from None
        model.update(
            tree_map(
                lambda p: (
                    p.astype(runtime.compute_dtype) if mx.issubdtype(p.dtype, mx.floating) else p
                ),
                model.parameters(),
            )
        )
        mx.eval(model.parameters())
        try:
            tokenizer = load_tokenizer(directory, eos_token_ids=config.get("eos_token_id"))
        except Exception as e:  # tokenizers/transformers raise many types for a damaged file
            names = ", ".join(sorted(p.name for p in directory.glob("tokenizer*")))
            raise FlashFormatError(
                f"{directory}: cannot load the tokenizer ({names}): {type(e).__name__}: {e}"
            ) from None
        _bound_mlx_cache(runtime.plan)
    except BaseException:
        runtime.close()
        raise
    return model, tokenizer


def _resolve_selector(
    directory: Path, manifest: Manifest, name: str, sparsity: float | None, gate_fits: bool = True
) -> str:
    """The concrete selector a selector name stands for in this flash model directory."""
    meta = manifest.extra.get("predictor") or {}
    return resolve(
        name,
        manifest,
        read_calibration(directory, manifest),
        meta.get("sparsity"),
        bool(meta),
        sparsity,
        gate_fits,
    )


def _gate_bytes(manifest: Manifest, itemsize: int) -> int:
    """Bytes the gate selector holds: every layer's gate rows."""
    row = sum(
        p.length * (4 if p.dtype == "uint32" else itemsize)
        for r in manifest.layers[0].regions
        for p in r.parts
        if p.name in GATE_PARTS
    )
    return manifest.n_layers * manifest.d_ffn * row


def _check_ffn_shape(model, spec, layer: int, runtime: FlashRuntime) -> None:
    """config.json must describe the FFN the store holds (the trunk weights cannot tell: the FFN is not in them)."""
    ffn = getattr(model.layers[layer], spec.ffn_attr, None)
    up = getattr(ffn, spec.fused_gate_up or spec.up, None)
    weight = getattr(up, "weight", None)
    if weight is None or weight.ndim != 2:
        return
    d_ffn = weight.shape[0] // (2 if spec.fused_gate_up else 1)
    m = runtime.manifest
    if (d_ffn, weight.shape[1]) != (m.d_ffn, m.d_model):
        raise FlashFormatError(
            f"{runtime.directory / 'config.json'}: layer {layer}'s FFN is {weight.shape[1]} -> {d_ffn} but the store "
            f"({m.store_file}) holds {m.d_model} -> {m.d_ffn}"
        )


def _bound_mlx_cache(plan: BudgetPlan) -> None:
    """Cap MLX's buffer cache at the budget's slack, so freed buffers MLX keeps for reuse stay inside the budget.

    The cache limit is process-wide: it is only ever lowered (a second model, or the user, may have set less).
    """
    slack = max(0, plan.total - plan.used)
    previous = mx.set_cache_limit(slack)
    if previous < slack:
        mx.set_cache_limit(previous)


def _pinned_ids(calibration, layer: int, rows: int) -> np.ndarray:
    """The neurons to pin: the most frequently active at calibration (sorted), else the first ``rows``."""
    if calibration is None:
        return np.arange(rows, dtype=np.int64)
    return np.sort(np.argsort(-calibration.frequency[layer], kind="stable")[:rows]).astype(np.int64)


def _make_layer(
    runtime: FlashRuntime,
    index: int,
    parts: dict[str, tuple[int, mx.Dtype]],
    pinned_ids: np.ndarray,
) -> FlashFFN:
    """One layer's FlashFFN with its preallocated buffers (rows stay empty until the first token)."""
    plan, manifest, reader = runtime.plan, runtime.manifest, runtime.reader
    state = _LayerState(
        index=index,
        d_ffn=manifest.d_ffn,
        pinned=None,
        pinned_ids=pinned_ids,
        buffer=None,
        window=None,
        down_bias=None,
    )

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
        state.window = SlidingWindow(max(1, runtime.window), plan.window_rows, manifest.d_ffn)
    if "down_bias" in manifest.layers[index].blobs:
        state.down_bias = mx.array(reader.read_blob(index, "down_bias", np.float32)).astype(
            runtime.compute_dtype
        )
    return FlashFFN(runtime, state)
