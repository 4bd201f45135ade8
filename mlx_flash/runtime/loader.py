"""``mlx_flash.load``: an mlx-lm model whose FFN modules stream from a flash model directory.

The trunk loads through mlx-lm's own ``load_model`` (sanitize, quantization, strict checks). When
mlx-lm builds the model, the memory plan is made from it and its FFN modules are swapped for
``FlashFFN`` before any weight is evaluated; no FFN record is read until the first forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_config, load_model, load_tokenizer

from . import selectors
from .adapters import check_supported, model_classes, set_ffn, spec_for
from .budget import (
    BudgetPlan,
    ModelFacts,
    cast_on_load,
    model_facts,
    plan_memory,
)
from .buffer import NeuronBuffer
from .calibration import Calibration, OperatingPoint, read_calibration, selection_frequency
from .costmodel import CostModel, cost_model_for
from .errors import BudgetError, FlashError, FlashFormatError, UnsupportedModelError
from .expected import READS_ONLY, Layout, ReaderCost, dense_cost, sparse_cost
from .flash_ffn import FlashFFN, LayerState, ThreadGuard
from .limit import metered_loader
from .lookahead import LookAhead
from .manifest import (
    MANIFEST_FILE,
    MX_DTYPES,
    Manifest,
    directory_problems,
    part_bytes,
    read_manifest,
    trunk_files,
)
from .options import FlashOptions, read_settings
from .selectors import Selection, Selector
from .store import StoreReader
from .telemetry import Telemetry
from .trace import TraceRecorder
from .window import SlidingWindow


@dataclass
class FlashRuntime:
    """What a loaded flash model carries besides its trunk (``model.flash``).

    ``observe``: if set, called as ``observe(layer, x, selection)`` with every decode selection
    (the FFN input it was made from and the ``Selection``); ``mlx_flash.evaluate`` measures
    recall with it.
    """

    directory: Path
    manifest: Manifest
    options: FlashOptions
    calibration: Calibration | None
    reader: StoreReader
    plan: BudgetPlan
    selector: Selector
    choice: selectors.Choice  # what runs and why (selector, sparsity, rows, measured loss)
    telemetry: Telemetry
    compute_dtype: mx.Dtype
    cost: CostModel
    layers: list[FlashFFN] = field(default_factory=list)
    guard: ThreadGuard = field(default_factory=ThreadGuard, repr=False)
    observe: Callable[[int, mx.array, Selection], None] | None = None
    # the ids each decode token used per layer (experts, or selected neurons), saved to
    # options.record_trace on close
    trace: TraceRecorder | None = None
    lookahead: LookAhead | None = None  # reads of the next layer started early (lookahead.py)

    @property
    def activation(self) -> str:
        return self.manifest.activation

    @property
    def gated(self) -> bool:
        return self.manifest.gated

    @property
    def quantization(self):
        return self.manifest.quantization

    @property
    def window(self) -> int:
        return self.options.window

    @property
    def compute_rows(self) -> str:
        return self.choice.compute_rows

    def close(self) -> None:
        self.reader.close()
        if self.trace is not None:
            self.trace.trace().save(self.options.record_trace)


def check_directory(directory: Path) -> Manifest:
    """The manifest of an intact flash model directory; else the first problem, naming its file."""
    manifest = read_manifest(directory)
    problems = directory_problems(directory, manifest)
    if problems:
        raise FlashFormatError(problems[0])
    try:
        check_supported(manifest.model_type)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{directory / MANIFEST_FILE}: {e}") from e
    return manifest


def prepare_runtime(
    directory: Path, manifest: Manifest, config: dict, options: FlashOptions, model
) -> FlashRuntime:
    """Plan the memory from the freshly built ``model`` and preallocate every layer's buffers (no
    record is read): the calibration is read once, the plan made once."""
    if config.get("model_type") != manifest.model_type:
        raise FlashFormatError(
            f"{directory / 'config.json'}: model_type {config.get('model_type')!r} does not match "
            f"the manifest's {manifest.model_type!r}"
        )
    if manifest.moe is not None:
        return _moe_runtime(directory, manifest, config, options, model)
    dtype = MX_DTYPES[options.compute_dtype or default_compute_dtype(manifest)]
    calibration = read_calibration(directory, manifest)
    facts = model_facts(model, config, manifest, trunk_files(directory), dtype, options)
    cost, threads = disk_model(directory, manifest, options.threads)
    reader = open_store(directory, manifest, options, cost, threads)
    try:
        choice = _choose_selector(options, directory, manifest, calibration, facts, cost, reader)
        selector_bytes = _selector_bytes(options, choice, directory, manifest, facts.itemsize)
        skip = selectors.GATE_PARTS if _exact_gate(options, choice) else ()
        parts = buffer_parts(manifest, dtype, skip)
        row = row_bytes(manifest, dtype.size, skip)
        frequency = _pin_frequency(options, manifest, calibration, choice)
        plan = plan_memory(facts, options, selector_bytes, row, choice.name == "dense", frequency)
    except BaseException:
        reader.close()
        raise
    hot = calibration.frequency if calibration is not None else None
    return open_dense(
        directory, manifest, options, plan, dtype, choice, parts, cost, reader, calibration, hot
    )


def open_dense(
    directory: Path,
    manifest: Manifest,
    options: FlashOptions,
    plan: BudgetPlan,
    dtype: mx.Dtype,
    choice: selectors.Choice,
    parts: dict,
    cost: CostModel,
    reader: StoreReader,
    calibration: Calibration | None = None,
    hot: np.ndarray | None = None,
) -> FlashRuntime:
    """The runtime of a dense store: its reader (opened with ``cost``, the disk's model; closed
    on failure), the selector (``options.selector``: a name built as ``choice`` says, or a Selector
    object) and one FlashFFN per layer with ``plan``'s rows of ``parts`` (allocated on first use).
    ``hot``: per layer and neuron, how often it was active (the most active are pinned); the
    synthetic bench passes its trace's counts."""
    try:
        selector = options.selector
        if isinstance(selector, str):
            selector = selectors.build(choice, directory, manifest, calibration, reader, dtype)
        telemetry = Telemetry(manifest.n_layers, manifest.d_ffn, enabled=options.telemetry)
        runtime = FlashRuntime(
            directory,
            manifest,
            options,
            calibration,
            reader,
            plan,
            selector,
            choice,
            telemetry,
            dtype,
            cost,
        )
        if options.record_trace:
            record_selections(runtime)
        # a selector that reads no input takes every neuron: pinning hot ones saves nothing, and a
        # contiguous pinned block leaves the rest to stream in large reads (the bench's hybrid)
        hot = hot if selector.needs_input else None
        runtime.layers = [
            _make_layer(runtime, i, parts, _pinned_ids(hot, i, plan.pinned_rows))
            for i in range(manifest.n_layers)
        ]
        # measured only where what it advises is dropped again after the read (page cache bypassed)
        if plan.lookahead and selector.needs_input and reader.drops_advised:
            runtime.lookahead = LookAhead(selector, reader, runtime.layers, plan.lookahead)
    except BaseException:
        reader.close()
        raise
    return runtime


def record_selections(runtime: FlashRuntime) -> None:
    """Record every single-token decode step's selected neurons, per layer, into
    ``runtime.trace`` (saved to ``options.record_trace`` on close), through the ``observe``
    hook. Multi-token calls (verify steps, batches) select a union and are left out."""
    m = runtime.manifest
    meta = {
        "model": str(runtime.directory),
        "selector": runtime.selector.name,
        "sparsity": runtime.choice.sparsity,
        "window": runtime.options.window,
    }
    recorder = TraceRecorder("neurons", m.d_ffn, m.n_layers, meta)
    runtime.trace = recorder

    def observe(layer: int, x: mx.array, selection: Selection) -> None:
        if x.shape[0] == 1:
            recorder.add(layer, selection.ids.reshape(1, -1))

    runtime.observe = observe


def disk_model(
    directory: Path, manifest: Manifest, threads: int | None = None
) -> tuple[CostModel, int]:
    """The store's disk model (its probe, else defaults) and the reader's thread count
    (``threads``, else the model's for the store's records)."""
    cost = cost_model_for(directory)
    smallest = min(r.record_size for r in manifest.layers[0].regions)
    return cost, threads or cost.reader_threads(smallest)


def open_store(
    directory: Path, manifest: Manifest, options: FlashOptions, cost: CostModel, threads: int
) -> StoreReader:
    """The store's reader: ``threads`` parallel reads of the cost model's run size (reading
    through gaps cheaper than another read), through the page cache or not and by the read path the
    options say."""
    return StoreReader(
        directory,
        manifest,
        threads=threads,
        page_cache=options.page_cache,
        max_run_bytes=cost.run_bytes(threads),
        gap_bytes=cost.gap_bytes(threads),
        read_path=options.read_path,
    )


def _moe_runtime(
    directory: Path, manifest: Manifest, config: dict, options: FlashOptions, model
) -> FlashRuntime:
    """A mixture-of-experts store's runtime (``moe_runtime``, which builds on this module)."""
    from .moe_runtime import prepare_moe_runtime

    return prepare_moe_runtime(directory, manifest, config, options, model)


def _choose_selector(
    options: FlashOptions,
    directory: Path,
    manifest: Manifest,
    calibration: Calibration | None,
    facts: ModelFacts,
    disk: CostModel,
    reader: StoreReader,
) -> selectors.Choice:
    """The operating point to run. A Selector object is used as given; a name is resolved by
    ``selectors.choose``, which passes over a selector the budget cannot hold."""
    if not isinstance(options.selector, str):
        rows = options.compute_rows or "resident"
        return selectors.Choice(options.selector.name, options.sparsity, rows, None, "given")
    cost = _expected_reads(options, directory, manifest, calibration, facts, disk, reader)
    return selectors.choose(options, manifest, calibration, cost)


def _expected_reads(
    options: FlashOptions,
    directory: Path,
    manifest: Manifest,
    calibration: Calibration | None,
    facts: ModelFacts,
    disk: CostModel,
    reader: StoreReader,
) -> selectors.Cost:
    """``selectors.Cost`` under the options' budget: the seconds per token the disk's cost model
    expects a point's reads to take (``expected``: pinned rows and the window as the runtime keeps
    them, runs planned with ``reader``'s gap rule); None when the budget cannot hold the
    selector or, for a point measured with the window's rows resident, those rows."""
    uncached = reader.cache_mode != "cached"  # as the probe timed the reader
    reader_cost = ReaderCost.of_disk(disk, reader.threads, reader.gap_bytes, uncached)

    @functools.cache
    def planned(
        name: str, sparsity: float | None
    ) -> tuple[BudgetPlan, Layout, int, np.ndarray | None] | None:
        """The point's memory plan, store layout, the selector's held bytes and selection
        frequencies (None: dense streaming); None when the budget cannot hold it."""
        held = selectors.holds_bytes(name, directory, manifest, facts.itemsize)
        skip = selectors.GATE_PARTS if name in ("gate", "oracle") else ()
        row = row_bytes(manifest, facts.itemsize, skip)
        dense = name == "dense"
        frequency = None if dense else selection_frequency(manifest, calibration, name, sparsity)[0]
        try:
            plan = plan_memory(facts, options, held, row, dense, frequency)
        except BudgetError:
            return None
        return plan, Layout.of_store(manifest, skip, row, 0, reader_cost), held, frequency

    def cost(point: OperatingPoint) -> float | None:
        name = point.selector
        if (found := planned(name, point.sparsity)) is None:
            return None
        plan, layout, held, frequency = found
        if frequency is None:
            return dense_cost(plan, facts, layout, disk, READS_ONLY).io_s
        union = (point.rows_share or 1.0) * manifest.d_ffn
        if point.compute_rows == "resident" and plan.pinned_rows + plan.window_rows < union:
            return None
        rows, window = point.compute_rows, options.window
        expected = sparse_cost(plan, facts, layout, disk, READS_ONLY, frequency, window, rows, held)
        return expected.io_s

    return cost


def _pin_frequency(
    options: FlashOptions, manifest: Manifest, calibration: Calibration | None, choice
) -> np.ndarray | None:
    """The chosen selector's chance of selecting each neuron, which sizes the pinned rows
    (``budget._pinned_rows``); None for dense streaming, a Selector object or no calibration."""
    if calibration is None or choice.name == "dense" or not isinstance(options.selector, str):
        return None
    return selection_frequency(manifest, calibration, choice.name, choice.sparsity)[0]


def _selector_bytes(
    options: FlashOptions, choice, directory: Path, manifest: Manifest, itemsize: int
) -> int:
    if not isinstance(options.selector, str):
        return options.selector.nbytes
    return selectors.holds_bytes(choice.name, directory, manifest, itemsize)


def _exact_gate(options: FlashOptions, choice) -> bool:
    if not isinstance(options.selector, str):
        return options.selector.exact_gate
    return choice.name in ("gate", "oracle")


def install(model, runtime: FlashRuntime):
    """Swap every FFN module of a freshly built mlx-lm model for the runtime's FlashFFN modules."""
    manifest = runtime.manifest
    if manifest.moe is not None:
        from .moe_runtime import install_experts

        return install_experts(model, runtime)
    if len(model.layers) != manifest.n_layers:
        raise FlashFormatError(
            f"{runtime.directory / 'config.json'}: {len(model.layers)} layers but the store has "
            f"{manifest.n_layers}"
        )
    spec = spec_for(manifest.model_type)
    for i, module in enumerate(runtime.layers):
        _check_ffn_shape(model, spec, i, runtime)
        set_ffn(model, spec, i, module)
    model.flash = runtime
    return model


def flash_model_classes(directory: Path, options: FlashOptions, built: list | None = None):
    """``get_model_classes`` for mlx-lm's ``load_model``: builds the model, plans its memory from it
    and installs the flash FFN modules, before any weight is loaded. The directory is checked now.
    The runtime is also appended to ``built``, so a caller can close it if loading fails later."""
    manifest = check_directory(directory)

    def get_model_classes(config: dict):
        model_class, args_class = model_classes(config)

        def build(args):
            model = model_class(args)
            runtime = prepare_runtime(directory, manifest, config, options, model)
            if built is not None:
                built.append(runtime)
            return install(model, runtime)

        return build, args_class

    return get_model_classes


def load(
    path: str | Path,
    memory_budget: str | int | None = None,
    *,
    tokenizer_config: dict | None = None,
    **options,
):
    """Load a flash model directory; returns ``(model, tokenizer)`` usable with mlx_lm.generate.

    Keywords are ``FlashOptions``' fields; the directory's ``flash_settings.json`` supplies what
    they leave out. ``tokenizer_config`` goes to mlx-lm's tokenizer loader, as in ``mlx_lm.load``.
    ``model.flash`` is the ``FlashRuntime`` (telemetry, plan, store reader). A damaged or mismatched
    directory raises a ``FlashError`` naming the file, before anything large is allocated; a budget
    too small raises ``BudgetError`` with what the model needs.

    Memory: ``model.flash.plan`` is what MLX may hold for the model. MLX's buffer cache is capped at
    the plan's slack (``mx.set_cache_limit`` is process-wide and only ever lowered). Prefill in
    chunks of at most ``prefill_step_size`` tokens (pass the same value to ``mlx_lm.generate``,
    whose default is 2048) and stay within ``max_context`` tokens, or the KV cache and attention
    scores outgrow the plan. The Python process itself (interpreter, imports, tokenizer: about
    150 MB) comes on top.

    Threads:
    - any number of flash models may live in one process; different models may run at the same
      time from different threads;
    - one model is used by one thread at a time: threads may take turns (put a lock around
      generation); a forward pass that overlaps another thread's pass of the same model raises
      ``FlashError`` (buffers and windows are per model) and leaves the model usable;
    - MLX streams are per thread (mlx-lm's generation stream is thread-local): each thread evaluates
      its own work; pass arrays between threads only once evaluated;
    - let worker threads that ran MLX end well before the interpreter exits: MLX 0.32 on Linux
      aborts ("terminate called without an active exception") when a finished thread's compile
      cache is torn down during interpreter shutdown;
    - the store reader's own threads (``mlx_flash-store_N``) and its file are released by
      ``model.flash.close()``, or when the model is garbage-collected. Ctrl-C (KeyboardInterrupt)
      during generation stops within a read's time; the model stays consistent and usable (start a
      new prompt cache: the interrupted one is partly updated).
    """
    directory = Path(path)
    given = dict(options, **({} if memory_budget is None else {"memory_budget": memory_budget}))
    opts = FlashOptions.build({**read_settings(directory), **given})
    built: list[FlashRuntime] = []
    try:
        model, config = _load_trunk(directory, opts, built)
        _materialise(model)
        try:
            tokenizer = load_tokenizer(
                directory, tokenizer_config, eos_token_ids=config.get("eos_token_id")
            )
        except Exception as e:  # tokenizers/transformers raise many types for a damaged file
            names = ", ".join(sorted(p.name for p in directory.glob("tokenizer*")))
            raise FlashFormatError(
                f"{directory}: cannot load the tokenizer ({names}): {type(e).__name__}: {e}"
            ) from e
        _bound_mlx_cache(model.flash.plan)
    except BaseException:
        for runtime in built:
            runtime.close()
        raise
    return model, tokenizer


def _load_trunk(directory: Path, options: FlashOptions, built: list) -> tuple[Any, dict]:
    """mlx-lm's ``load_model`` with the flash FFN modules installed, and the config; the directory
    is checked first, and errors name it."""
    get_model_classes = flash_model_classes(directory, options, built)
    config = _load_config(directory)
    try:
        model, _ = load_model(
            directory,
            lazy=True,
            strict=True,
            model_config={"model_file": None},
            get_model_classes=get_model_classes,
        )
    except FlashError:
        raise
    except ValueError as e:  # mlx-lm's strict load: names or shapes do not match
        raise FlashFormatError(f"{directory}: trunk weights do not match config.json ({e})") from e
    except RuntimeError as e:  # MLX could not read a trunk file (its header was fine)
        raise FlashFormatError(f"{directory}: cannot read the trunk weights ({e})") from e
    return model, config


def _materialise(model) -> None:
    """Load and cast the trunk, then allocate the neuron buffers: the cast's transient (one stored
    tensor) uses the room they take after."""
    cast_parameters(model, model.flash.compute_dtype)
    for layer in model.flash.layers:
        layer.allocate()


def cast_parameters(model, dtype: mx.Dtype) -> None:
    """Load the parameters one tensor at a time, largest first, casting floats to ``dtype``.

    Why: evaluated together, MLX kept the stored copy of the largest tensor (the embedding) next to
    the whole cast trunk (+289 MB for a 151936 x 896 float16 embedding). One at a time, the
    transient is one stored tensor (``budget.trunk_facts`` counts it). Quantized modules' scales
    and biases keep their stored dtype: a packed trunk stays as small as mlx-lm's.
    """
    items = tree_flatten(model.parameters())
    items.sort(key=lambda item: -item[1].nbytes)
    while items:
        name, p = items.pop(0)
        if cast_on_load(name, mx.issubdtype(p.dtype, mx.floating)) and p.dtype != dtype:
            p = p.astype(dtype)
            mx.eval(p)
            model.update(tree_unflatten([(name, p)]))
        else:
            mx.eval(p)
        del p
    mx.clear_cache()


def default_compute_dtype(manifest: Manifest) -> str:
    """float32 on the CPU (float16 matmul is slow there); on a GPU the model's own dtype, except
    that Gemma loses perplexity in float16 (its activations overflow) and computes in float32."""
    if mx.default_device() == mx.cpu:
        return "float32"
    if manifest.dtype == "float16" and manifest.model_type.startswith("gemma"):
        return "float32"
    return manifest.dtype


def _load_config(directory: Path) -> dict:
    try:
        config = load_config(directory)
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise FlashFormatError(f"{directory / 'config.json'}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise FlashFormatError(f"{directory / 'config.json'}: not a JSON object")
    return config


def buffer_parts(manifest: Manifest, dtype: mx.Dtype, skip: tuple[str, ...]):
    """Each buffered part's (row width, MLX dtype): floats in the compute dtype, packed words as
    is."""
    return {
        p.name: (p.length, mx.uint32 if p.dtype == "uint32" else dtype)
        for p in manifest.layers[0].parts()
        if p.name not in skip
    }


def row_bytes(manifest: Manifest, itemsize: int, skip: tuple[str, ...]) -> int:
    """One neuron's bytes in a layer's buffers."""
    return sum(part_bytes(p, itemsize) for p in manifest.layers[0].parts() if p.name not in skip)


def _check_ffn_shape(model, spec, layer: int, runtime: FlashRuntime) -> None:
    """config.json must describe the FFN the store holds (the trunk weights cannot tell: the FFN is
    not in them)."""
    ffn = getattr(model.layers[layer], spec.ffn_attr, None)
    up = getattr(ffn, spec.fused_gate_up or spec.up, None)
    weight = getattr(up, "weight", None)
    if weight is None or weight.ndim != 2:
        return
    d_ffn = weight.shape[0] // (2 if spec.fused_gate_up else 1)
    m = runtime.manifest
    if (d_ffn, weight.shape[1]) != (m.d_ffn, m.d_model):
        raise FlashFormatError(
            f"{runtime.directory / 'config.json'}: layer {layer}'s FFN is {weight.shape[1]} -> "
            f"{d_ffn} but the store ({m.store_file}) holds {m.d_model} -> {m.d_ffn}"
        )


def _bound_mlx_cache(plan: BudgetPlan) -> None:
    """Cap MLX's buffer cache at the budget's slack, so freed buffers MLX keeps for reuse stay
    inside the budget. The limit is process-wide: it is only ever lowered."""
    slack = max(0, plan.total - plan.used)
    previous = mx.set_cache_limit(slack)
    if previous < slack:
        mx.set_cache_limit(previous)


def _pinned_ids(hot: np.ndarray | None, layer: int, rows: int) -> np.ndarray:
    """The neurons to pin: the most frequently active (``hot``: calibration's frequencies,
    sorted), else the first."""
    if hot is None:
        return np.arange(rows, dtype=np.int64)
    hottest = np.argsort(-hot[layer], kind="stable")[:rows]
    return np.sort(hottest).astype(np.int64)


def _make_layer(runtime: FlashRuntime, index: int, parts: dict, pinned_ids: np.ndarray) -> FlashFFN:
    """A layer's FlashFFN; its buffers are allocated by ``FlashFFN.allocate`` (rows stay empty
    until the first token)."""
    plan, manifest, reader = runtime.plan, runtime.manifest, runtime.reader
    load_rows = metered_loader(runtime, index)

    def allocate(state: LayerState) -> None:
        if plan.pinned_rows:
            state.pinned = NeuronBuffer(plan.pinned_rows, parts, load_rows, manifest.d_ffn)
        if plan.window_rows:
            state.buffer = NeuronBuffer(plan.window_rows, parts, load_rows, manifest.d_ffn)

    state = LayerState(index, manifest.d_ffn, None, pinned_ids, None, None, None, allocate)
    if plan.window_rows:
        state.window = SlidingWindow(max(1, runtime.window), plan.window_rows, manifest.d_ffn)
    if "down_bias" in manifest.layers[index].blobs:
        bias = reader.read_blob(index, "down_bias", np.float32)
        state.down_bias = mx.array(bias).astype(runtime.compute_dtype)
    return FlashFFN(runtime, state)
