"""A short compute micro-benchmark: what a decode step costs on this machine besides the disk.

Why: ``mlx_flash.forecast`` predicts tokens/s before a model is converted or even downloaded, so it
cannot time the model itself. It times what a decode step is made of, on this machine, in the
compute dtype (and never fits anything to runs of the model it forecasts):

- ``bytes_per_s``: matrix-vector products streaming weights, on distinct matrices of the model's
  FFN shape, 64 MiB in all so the CPU caches do not flatter them;
- ``layer_s`` and ``step_s``: the fixed cost of a transformer layer and of a step besides their
  weights: tiny llamas (``mlx_flash.tiny``) of 2 and 6 layers through plain mlx-lm;
- ``flash_layer_s`` and ``chunk_s``: what the runtime adds per FlashFFN layer (its FFN resident)
  and per chunk streamed through a buffer (delete, append, compute), read time excluded: the
  6-layer tiny llama converted and run by the runtime.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .runtime.adapters import build_model
from .tiny import FFN, TINY_LLAMA, randomize, save_model_dir

GEMV_BYTES = 64 << 20
LAYERS = (2, 6)
STREAM_ROWS = 16  # the tiny FFN's 128 rows streamed in 8 chunks per layer


@dataclass(frozen=True)
class ComputeCosts:
    dtype: str
    bytes_per_s: float  # weight bytes per second through matrix-vector products
    step_s: float  # per decode step, besides layers and weights
    layer_s: float  # per transformer layer, besides its weights
    flash_layer_s: float  # per FlashFFN layer, added to layer_s
    chunk_s: float  # per buffer chunk streamed in a layer (read time excluded)

    def as_dict(self) -> dict:
        return asdict(self)


def measure_compute(d_model: int, d_ffn: int, dtype: mx.Dtype, repeats: int = 9) -> ComputeCosts:
    """Time the pieces (see the module docstring); each is the median of ``repeats`` timings."""
    rate = gemv_rate(d_ffn, d_model, dtype, repeats)
    plain = {n: _step_seconds(_plain_model(n), repeats) for n in LAYERS}
    layer_s = (plain[LAYERS[1]] - plain[LAYERS[0]]) / (LAYERS[1] - LAYERS[0])
    step_s = max(0.0, plain[LAYERS[0]] - LAYERS[0] * layer_s)
    resident, streamed, reads = _flash_steps(LAYERS[1], dtype, repeats)
    chunks = LAYERS[1] * FFN // STREAM_ROWS
    return ComputeCosts(
        dtype=str(dtype).split(".")[-1],
        bytes_per_s=rate,
        step_s=step_s,
        layer_s=max(0.0, layer_s),
        flash_layer_s=max(0.0, (resident - plain[LAYERS[1]]) / LAYERS[1]),
        chunk_s=max(0.0, (streamed - reads - resident) / chunks),
    )


def gemv_rate(rows: int, cols: int, dtype: mx.Dtype, repeats: int) -> float:
    """Weight bytes per second of ``x @ W.T`` over distinct ``rows x cols`` matrices."""
    one = rows * cols * dtype.size
    mats = [mx.random.normal((rows, cols)).astype(dtype) for _ in range(max(1, GEMV_BYTES // one))]
    x = mx.random.normal((1, cols)).astype(dtype)
    mx.eval(mats, x)
    seconds = _median(lambda: mx.eval([x @ m.T for m in mats]), repeats)
    return len(mats) * one / seconds


def _plain_model(layers: int):
    return randomize(build_model(dict(TINY_LLAMA, num_hidden_layers=layers)))


def _step_seconds(model, repeats: int, prompt: int = 8) -> float:
    """Median seconds of one decode step (after a prompt), through a KV cache."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((1, prompt), dtype=mx.int32), cache=cache))
    token = mx.array([[1]])
    return _median(lambda: mx.eval(model(token, cache=cache)), repeats)


def _flash_steps(layers: int, dtype: mx.Dtype, repeats: int) -> tuple[float, float, float, float]:
    """Seconds per decode step of the tiny flash model with its FFN resident, then streamed
    densely in chunks of ``STREAM_ROWS``; the read seconds of a streamed step, and per read
    (one per reader call)."""
    from . import load
    from .convert.converter import convert

    config = dict(TINY_LLAMA, num_hidden_layers=layers)
    with tempfile.TemporaryDirectory(prefix="mlx_flash-compute-") as tmp:
        src = Path(tmp) / "src"
        save_model_dir(_plain_model(layers), config, src)
        flash = convert(
            src, Path(tmp) / "flash", calibration=None, progress=False, log=print_nothing
        )
        dtype_name = str(dtype).split(".")[-1]
        model, _ = load(flash, "1GB", ffn_cache=1.0, compute_dtype=dtype_name)
        resident = _step_seconds(model, repeats)
        model.flash.close()
        share = STREAM_ROWS / FFN
        model, _ = load(
            flash, "1GB", ffn_cache=share, pin_share=0.0, selector="dense", window=1,
            compute_dtype=dtype_name,
        )  # fmt: skip
        streamed = _step_seconds(model, repeats)
        decode = [p for p in model.flash.telemetry.passes if p.phase == "decode"]
        reads = statistics.median(p.total.read.seconds for p in decode)
        model.flash.close()
    return resident, streamed, reads


def print_nothing(_: str) -> None:
    """A quiet ``log`` for the converter."""


def _median(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up: compile, allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
