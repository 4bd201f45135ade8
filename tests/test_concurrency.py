"""Concurrency: several models in one process, one model from several threads.

The rules these tests pin down (written out in ``mlx_flash.load``'s docstring):
- any number of flash models may live in one process, and different models may run at the same time
  from different threads;
- one model is used by one thread at a time: taking turns works from any thread, overlapping forward
  passes of the same model are refused with a FlashError (they would corrupt its neuron buffers);
- MLX streams are per thread (mlx-lm's generation stream is thread-local), so each thread evaluates
  its own work; a thread that ran MLX must have finished before the interpreter exits (MLX 0.32 on
  Linux aborts with "terminate called without an active exception" when a thread's compile cache is
  destroyed during interpreter shutdown), hence ``_join`` below waits for the OS thread itself.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import mlx_flash
from mlx_flash.runtime.errors import FlashError
from mlx_flash.runtime.selectors import FixedSelector

PROMPT = [3, 17, 42, 99, 7, 120, 5]
STEPS = 10


@pytest.fixture(scope="module")
def flash(tiny_flash) -> dict[str, Path]:
    return {arch: tiny_flash(arch)[1] for arch in ("llama", "qwen2")}


def _options(**extra) -> dict:
    """Partial buffers (pinned + window), a multi-threaded store reader: the state threads could
    trip on."""
    return {"ffn_cache": 0.5, "pin_share": 0.25, "threads": 4, **extra}


def _steps(model, prompt=PROMPT, n=STEPS):
    return zip(generate_step(mx.array(prompt), model, max_tokens=n), range(n), strict=False)


def _greedy(model, prompt=PROMPT, n=STEPS) -> tuple[list[int], np.ndarray]:
    tokens, logprobs = [], []
    for (token, lp), _ in _steps(model, prompt, n):
        tokens.append(int(token))
        logprobs.append(np.array(lp))
    return tokens, np.stack(logprobs)


def _alone(directory: Path, **options) -> tuple[list[int], np.ndarray]:
    model, _ = mlx_flash.load(directory, "1GB", **_options(**options))
    try:
        return _greedy(model)
    finally:
        model.flash.close()


def _same(a, b) -> None:
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], atol=1e-4)


def _join(thread: threading.Thread, timeout: float = 120) -> None:
    """Join, then wait until the OS thread is gone (its MLX thread-local state destroyed)."""
    thread.join(timeout)
    assert not thread.is_alive()
    task = f"/proc/self/task/{thread.native_id}"
    deadline = time.monotonic() + 5
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(0.001)


def _in_thread(fn, *args):
    """Run fn(*args) in a new thread; its result, or the exception it raised."""
    box = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, name="test-worker")
    thread.start()
    _join(thread)
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_two_models_in_one_process_interleaved_token_by_token(flash):
    """Two architectures, plus the same directory loaded twice with other budgets, stepped in
    lockstep."""
    alone = {
        "llama": _alone(flash["llama"]),
        "qwen2": _alone(flash["qwen2"]),
        "llama-full": _alone(flash["llama"], ffn_cache=1.0),
    }
    models = {
        "llama": mlx_flash.load(flash["llama"], "1GB", **_options())[0],
        "qwen2": mlx_flash.load(flash["qwen2"], "1GB", **_options())[0],
        "llama-full": mlx_flash.load(flash["llama"], "1GB", **_options(ffn_cache=1.0))[0],
    }
    got = {name: ([], []) for name in models}
    for steps in zip(*(_steps(m) for m in models.values()), strict=False):
        for name, ((token, lp), _) in zip(models, steps, strict=True):
            got[name][0].append(int(token))
            got[name][1].append(np.array(lp))
    for name in models:
        _same((got[name][0], np.stack(got[name][1])), alone[name])
    _same(alone["llama"], alone["llama-full"])  # and the buffer size does not change the result


def test_one_model_used_from_two_threads_in_turn(flash):
    model, _ = mlx_flash.load(flash["llama"], "1GB", **_options())
    expected = _alone(flash["llama"])
    _same(_in_thread(_greedy, model), expected)
    _same(_in_thread(_greedy, model), expected)
    _same(_greedy(model), expected)  # and back in the main thread


def test_two_models_from_two_threads_at_once(flash):
    expected = {arch: _alone(flash[arch]) for arch in flash}
    models = {arch: mlx_flash.load(flash[arch], "1GB", **_options())[0] for arch in flash}
    results, errors = {arch: [] for arch in flash}, []
    start = threading.Barrier(len(models))

    def work(arch):
        try:
            start.wait()
            for _ in range(3):
                results[arch].append(_greedy(models[arch]))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(arch,), name=f"test-{arch}") for arch in models]
    for t in threads:
        t.start()
    for t in threads:
        _join(t)
    assert not errors, errors
    for arch, runs in results.items():
        assert len(runs) == 3
        for run in runs:
            _same(run, expected[arch])


def test_overlapping_use_of_one_model_is_refused_clearly(flash):
    """Thread A is held inside layer 1's FFN (by its selector); thread B starts a forward pass
    of the same model: B gets a FlashError saying so, nothing else; A then finishes with the
    right result."""
    d_ffn = 128
    inside, release = threading.Event(), threading.Event()
    holder = {}

    def choose(layer, x):
        if layer == 1 and threading.get_ident() == holder.get("a"):
            inside.set()
            assert release.wait(30)
        return np.arange(0, d_ffn, 2)

    options = _options(selector=FixedSelector(choose), window=1)
    expected = _alone(
        flash["llama"], selector=FixedSelector(lambda layer, x: np.arange(0, d_ffn, 2)), window=1
    )
    model, _ = mlx_flash.load(flash["llama"], "1GB", **options)
    box = {}

    def thread_a():
        holder["a"] = threading.get_ident()
        try:
            box["a"] = _greedy(model)
        except BaseException as e:  # noqa: BLE001
            box["a"] = e

    a = threading.Thread(target=thread_a, name="test-a")
    a.start()
    assert inside.wait(30)
    with pytest.raises(FlashError, match="in use by another thread"):
        _in_thread(_greedy, model)
    release.set()
    _join(a)
    holder.clear()
    _same(box["a"], expected)
    _same(_greedy(model), expected)  # the model is fine afterwards


def test_two_threads_hammering_one_model_get_right_results_or_clear_errors(flash):
    """No lock, both threads generating at once: every generation either matches the model used
    alone or fails with the FlashError above; never a wrong result or another exception."""
    expected = _alone(flash["llama"])
    model, _ = mlx_flash.load(flash["llama"], "1GB", **_options())
    outcomes, start = [], threading.Barrier(2)

    def work():
        start.wait()
        for _ in range(4):
            try:
                outcomes.append(_greedy(model))
            except FlashError as e:
                assert "in use by another thread" in str(e)
                outcomes.append("refused")
            except BaseException as e:  # noqa: BLE001
                outcomes.append(e)

    threads = [threading.Thread(target=work, name=f"test-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        _join(t)
    assert len(outcomes) == 8
    for outcome in outcomes:
        if outcome != "refused":
            assert isinstance(outcome, tuple), repr(outcome)
            _same(outcome, expected)
    _same(_greedy(model), expected)
