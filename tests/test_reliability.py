"""Reliability: damaged directories, faults and Ctrl-C while generating, converter safety, memory
safety.

Thread and descriptor counts are taken after a warm-up: MLX and tokenizers start native threads
lazily, so only the package's own threads (named ``mlx_flash*``) and ``/proc/self/fd`` are compared.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

import mlx_flash
from conftest import MEMBUDGET, convert_quietly
from mlx_flash.convert.__main__ import main as convert_main
from mlx_flash.convert.converter import FAIL_AT_ENV
from mlx_flash.convert.verify import verify
from mlx_flash.rebuild import dense_ffn_weights
from mlx_flash.runtime.adapters import spec_for
from mlx_flash.runtime.errors import (
    BudgetError,
    FlashError,
    FlashFormatError,
    StoreReadError,
    UnsupportedModelError,
)
from mlx_flash.runtime.manifest import MANIFEST_FILE, STORE_FILE, read_manifest
from mlx_flash.runtime.selectors import FixedSelector
from mlx_flash.runtime.store import StoreReader
from tiny_models import CONFIGS, save_tiny_model

HAS_PROC = os.path.isdir("/proc/self/fd")
TESTS = Path(__file__).resolve().parent


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _our_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("mlx_flash"))


def _settle_threads(expected: int, timeout: float = 5.0) -> list[str]:
    """Our threads once at most ``expected`` are left (pool threads of a dropped reader exit
    asynchronously)."""
    deadline = time.monotonic() + timeout
    while len(_our_threads()) > expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return _our_threads()


def _subprocess_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.fixture(scope="module")
def tiny(tiny_flash) -> tuple[Path, Path]:
    """(source dir, flash dir) of a tiny random llama: 2 layers, d_model 64, d_ffn 128."""
    return tiny_flash("llama")


@pytest.fixture(scope="module")
def warm(tiny) -> None:
    """Load and run a model once: MLX, mlx-lm and tokenizers open files and start threads on
    first use."""
    model, tokenizer = mlx_flash.load(tiny[1], "1GB", ffn_cache=0.5, threads=4)
    stream_generate_text = "".join(
        r.text for r in stream_generate(model, tokenizer, "warm", max_tokens=2)
    )
    assert isinstance(stream_generate_text, str)
    model.flash.close()


@pytest.fixture(scope="module")
def stories(stories_flash) -> Path:
    return stories_flash


@pytest.fixture(scope="module")
def relu2(relu2_flash) -> Path:
    return relu2_flash


def _every_third(d_ffn: int) -> FixedSelector:
    """A scattered third of the neurons (many one-record runs, so reads go through the thread pool),
    shifted by the input: with window=1 every decode step loads, and what a step computes depends on
    its input only."""

    def choose(layer: int, x: mx.array) -> np.ndarray:
        return np.arange(int(mx.argmax(x[-1]).item()) % 3, d_ffn, 3)

    return FixedSelector(choose)


def _greedy(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """``n`` greedy tokens after ``prompt`` (no EOS stop) and their log-probabilities."""
    tokens, logprobs = [], []
    for (token, lp), _ in zip(
        generate_step(mx.array(prompt), model, max_tokens=n), range(n), strict=False
    ):
        tokens.append(int(token))
        logprobs.append(np.array(lp))
    return tokens, np.stack(logprobs)


def assert_buffers_hold_their_neurons(model, dense: dict[str, mx.array]) -> None:
    """Every buffer's maps agree with each other and each resident row holds exactly its
    neuron's weights."""
    rt = model.flash
    spec = spec_for(rt.manifest.model_type)
    d_ffn = rt.manifest.d_ffn
    for index, ffn in enumerate(rt.layers):
        prefix = rt.manifest.layers[index].prefix
        truth = {
            "up": np.array(dense[f"{prefix}.{spec.up}.weight"]),
            "down": np.array(dense[f"{prefix}.{spec.down}.weight"]).T,
        }
        if spec.gate:
            truth["gate"] = np.array(dense[f"{prefix}.{spec.gate}.weight"])
        for buf in (ffn.pinned, ffn.buffer):
            if buf is None:
                continue
            ids = buf.neurons
            assert 0 <= buf.n_used <= buf.capacity
            assert np.unique(ids).size == ids.size and ((ids >= 0) & (ids < d_ffn)).all()
            assert (buf.slots_of(ids) == np.arange(ids.size)).all()
            assert int((buf.slots_of(np.arange(d_ffn)) >= 0).sum()) == buf.n_used
            rows = buf.arrays()
            for name, weights in truth.items():
                if name in rows:
                    np.testing.assert_array_equal(
                        np.array(rows[name]), weights[ids], err_msg=f"layer {index} {name}"
                    )


# -- damaged flash directories ---------------------------------------------------------------------


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _store_size(d: Path) -> int:
    return (d / STORE_FILE).stat().st_size


# name -> (damage, file the message must name, words it must contain, error class, whether
# --verify sees it)
DAMAGE = {
    "missing manifest": (
        lambda d: (d / MANIFEST_FILE).unlink(),
        MANIFEST_FILE,
        "missing",
        FlashFormatError,
        True,
    ),
    "unknown format version": (
        lambda d: _edit_json(d / MANIFEST_FILE, format_version=99),
        MANIFEST_FILE,
        "format version 99",
        FlashFormatError,
        True,
    ),
    "manifest does not match the store size": (
        lambda d: _edit_json(d / MANIFEST_FILE, store_size=_store_size(d) + 4096),
        STORE_FILE,
        "manifest says",
        FlashFormatError,
        True,
    ),
    "truncated store": (
        lambda d: _truncate(d / STORE_FILE, 1000),
        STORE_FILE,
        "truncated",
        FlashFormatError,
        True,
    ),
    "missing store": (
        lambda d: (d / STORE_FILE).unlink(),
        STORE_FILE,
        "missing",
        FlashFormatError,
        True,
    ),
    "flipped byte in the manifest": (
        lambda d: _flip(d / MANIFEST_FILE, 10),
        MANIFEST_FILE,
        "not valid JSON",
        FlashFormatError,
        True,
    ),
    "flipped byte in the trunk header length": (
        lambda d: _flip(d / "model.safetensors", 3),
        "model.safetensors",
        "not a safetensors file",
        FlashFormatError,
        True,
    ),
    "flipped byte in the trunk header": (
        lambda d: _flip(d / "model.safetensors", 8),
        "model.safetensors",
        "damaged safetensors header",
        FlashFormatError,
        True,
    ),
    "truncated trunk": (
        lambda d: _truncate(d / "model.safetensors", 5000),
        "model.safetensors",
        "truncated",
        FlashFormatError,
        True,
    ),
    "missing trunk": (
        lambda d: (d / "model.safetensors").unlink(),
        "",
        "no trunk weights",
        FlashFormatError,
        True,
    ),
    "missing tokenizer": (
        lambda d: (d / "tokenizer.json").unlink(),
        "",
        "no tokenizer (tokenizer.json",
        FlashFormatError,
        True,
    ),
    "damaged tokenizer": (
        lambda d: (d / "tokenizer.json").write_text('{"model": '),
        "",
        "cannot load the tokenizer",
        FlashFormatError,
        False,
    ),
    "missing config": (
        lambda d: (d / "config.json").unlink(),
        "config.json",
        "missing",
        FlashFormatError,
        True,
    ),
    "damaged config": (
        lambda d: (d / "config.json").write_text("{llama"),
        "config.json",
        "not valid JSON",
        FlashFormatError,
        False,
    ),
    "unsupported architecture": (
        lambda d: (
            _edit_json(d / MANIFEST_FILE, model_type="mamba"),
            _edit_json(d / "config.json", model_type="mamba"),
        ),
        MANIFEST_FILE,
        "'mamba' is not supported (no FFN: state-space layers only); supported: ",
        UnsupportedModelError,
        False,
    ),
    "config names another architecture": (
        lambda d: _edit_json(d / "config.json", model_type="qwen2"),
        "config.json",
        "does not match the manifest",
        FlashFormatError,
        False,
    ),
    "trunk does not match config (vocabulary)": (
        lambda d: _edit_json(d / "config.json", vocab_size=300),
        "",
        "trunk weights do not match config.json",
        FlashFormatError,
        False,
    ),
    "config FFN width is not the store's": (
        lambda d: _edit_json(d / "config.json", intermediate_size=256),
        "config.json",
        "but the store",
        FlashFormatError,
        False,
    ),
    "config layer count is not the store's": (
        lambda d: _edit_json(d / "config.json", num_hidden_layers=3),
        "config.json",
        "layers but the store has 2",
        FlashFormatError,
        False,
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_directory_is_refused_with_the_file_and_the_problem(
    damage, tiny, warm, tmp_path, capsys
):
    mutate, file, words, error, verify_sees_it = DAMAGE[damage]
    directory = tmp_path / "flash"
    shutil.copytree(tiny[1], directory)
    mutate(directory)
    named = directory / file if file else directory
    gc.collect()  # earlier tests' readers close when collected
    fds, threads = _fds(), _our_threads()

    with pytest.raises(FlashError) as info:
        mlx_flash.load(directory, "1GB")
    assert type(info.value) is error, repr(info.value)
    message = str(info.value)
    assert str(named) in message and words in message, message
    del info  # its traceback holds mlx-lm's lazily opened trunk files
    gc.collect()
    # a refused load keeps nothing open
    assert _fds() == fds and len(_our_threads()) <= len(threads)

    if verify_sees_it:  # the --verify CLI reports it too, as one line, without a traceback
        assert convert_main(["--verify", str(directory)]) == 1
        err = capsys.readouterr().err
        assert f"error: {named}" in err and "Traceback" not in err, err


def test_flipped_byte_in_the_store_is_found_by_verify_not_at_load(tiny, tmp_path, capsys):
    """Load checks only what is cheap (sizes, headers); one flipped FFN byte needs --verify's
    checksums."""
    directory = tmp_path / "flash"
    shutil.copytree(tiny[1], directory)
    manifest = read_manifest(directory)
    _flip(directory / STORE_FILE, manifest.layers[1].offset + 100)
    model, _ = mlx_flash.load(directory, "1GB")
    assert model.flash.reader.totals.bytes == 0  # loading read no FFN record
    model.flash.close()
    assert convert_main(["--verify", str(directory)]) == 1
    err = capsys.readouterr().err
    assert f"error: {directory / STORE_FILE}: layer 1 is damaged" in err and "Traceback" not in err


# -- faults while generating -----------------------------------------------------------------------


class _Faults:
    """Makes a reader's preadv fail: after ``after`` good calls, ``times`` calls fail (EIO, a short
    read, or a KeyboardInterrupt as Ctrl-C inside a read would raise)."""

    def __init__(self, reader: StoreReader, kind: str, after: int, times: int = 1):
        self.reader, self.kind, self.after, self.times = reader, kind, after, times
        self.original = reader._preadv
        self.calls = self.failed = 0
        self.lock = threading.Lock()
        reader._preadv = self

    def __call__(self, fd, bufs, offset, flags):
        with self.lock:
            self.calls += 1
            fail = self.calls > self.after and self.failed < self.times
            self.failed += fail
        if not fail:
            return self.original(fd, bufs, offset, flags)
        if self.kind == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if self.kind == "interrupt":
            raise KeyboardInterrupt
        return self.original(fd, bufs, offset, flags) - 1

    def remove(self) -> None:
        self.reader._preadv = self.original


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("kind", ["eio", "short", "interrupt"])
def test_read_fault_while_generating(kind, threads, tiny):
    """The error reaches the caller of generate naming file, layer and offset; the buffers stay
    consistent (every resident row is its neuron's); the next generation matches a model that never
    failed; no thread or descriptor is left behind."""
    flash = tiny[1]
    options = dict(
        ffn_cache=0.5, pin_share=0.25, window=1, threads=threads, selector=_every_third(128)
    )
    prompt = [3, 17, 42, 99, 7, 120]
    clean, _ = mlx_flash.load(flash, "1GB", **options)
    expected_tokens, expected_logprobs = _greedy(clean, prompt, 8)
    clean.flash.close()
    dense = dense_ffn_weights(flash)

    gc.collect()  # readers of earlier tests' models close when collected
    base_fds, base_threads = _fds(), _settle_threads(0)
    model, _ = mlx_flash.load(flash, "1GB", **options)
    _greedy(model, prompt, 2)  # warm-up: pool threads, MLX's own threads
    gc.collect()
    fds = _fds()
    # fails inside the decode of the first tokens
    faults = _Faults(model.flash.reader, kind, after=5)
    expected_error = KeyboardInterrupt if kind == "interrupt" else StoreReadError
    with pytest.raises(expected_error) as info:
        _greedy(model, prompt, 8)
    if kind != "interrupt":
        message = str(info.value)
        assert str(flash / STORE_FILE) in message and re.search(
            r"layer \d+ at offset \d+", message
        ), message
        assert ("Input/output error" if kind == "eio" else "short read") in message
    assert_buffers_hold_their_neurons(model, dense)

    faults.remove()
    tokens, logprobs = _greedy(model, prompt, 8)
    assert tokens == expected_tokens
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=1e-4)
    assert_buffers_hold_their_neurons(model, dense)
    gc.collect()
    assert _fds() == fds and len(_our_threads()) <= len(base_threads) + (
        threads if threads > 1 else 0
    )
    model.flash.close()
    assert _fds() == base_fds and _settle_threads(len(base_threads)) == base_threads


def test_persistent_read_fault_fails_every_call_cleanly(tiny):
    """A disk that keeps failing gives StoreReadError on every call (never a confused buffer error)
    and no call corrupts the buffers; once it recovers, so does the model."""
    flash = tiny[1]
    model, _ = mlx_flash.load(
        flash, "1GB", ffn_cache=0.5, pin_share=0.25, threads=4, selector=_every_third(128)
    )
    faults = _Faults(model.flash.reader, "eio", after=3, times=10**9)
    for _ in range(3):
        with pytest.raises(StoreReadError):
            _greedy(model, [5, 6, 7], 4)
    faults.remove()
    tokens, _ = _greedy(model, [5, 6, 7], 4)
    assert len(tokens) == 4
    assert_buffers_hold_their_neurons(model, dense_ffn_weights(flash))


def test_ctrl_c_during_parallel_reads_waits_for_reads_in_flight(tiny):
    """A KeyboardInterrupt arriving while workers read must not leave a worker writing into the
    buffer after read_neurons has raised (the next append would race with it): the reader stops
    handing out runs and waits for those in progress."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        flash = tiny[1]
        manifest = read_manifest(flash)
        main = threading.main_thread().ident
        assert threading.get_ident() == main
        with StoreReader(flash, manifest, threads=4) as reader:
            original = reader._preadv
            lock, in_flight, started, sent = threading.Lock(), [0], [0], threading.Event()

            def slow(fd, bufs, offset, flags):
                with lock:
                    in_flight[0] += 1
                    started[0] += 1
                try:
                    if not sent.is_set():
                        sent.set()
                        signal.pthread_kill(main, signal.SIGINT)
                    time.sleep(0.2)
                    return original(fd, bufs, offset, flags)
                finally:
                    with lock:
                        in_flight[0] -= 1

            reader._preadv = slow
            ids = np.arange(0, 128, 4)  # 32 one-record runs
            dest = {
                p.name: np.zeros((ids.size, p.length), np.float32)
                for p in manifest.layers[0].regions[0].parts
            }
            with pytest.raises(KeyboardInterrupt):
                reader.read_neurons(0, ids, dest, np.arange(ids.size))
            assert in_flight[0] == 0  # nobody writes into dest any more
            assert started[0] < ids.size  # and the remaining runs were not started
            reader._preadv = original
            reader.read_neurons(0, ids, dest, np.arange(ids.size))
            dense = dense_ffn_weights(flash)
            np.testing.assert_array_equal(
                dest["up"], np.array(dense["model.layers.0.mlp.up_proj.weight"])[ids]
            )
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_dropped_models_release_their_files_and_threads(tiny):
    """Loading, using and dropping models (without close) must not accumulate descriptors or
    threads."""
    flash = tiny[1]

    def far_apart(layer: int, x: mx.array) -> np.ndarray:  # two runs, copied on the pool
        shift = int(mx.argmax(x[-1]).item()) % 3
        return np.array([32 + shift, 127 - shift])  # past the 32 pinned rows

    def use_once() -> int:
        # mapped runs are copied on the pool (advised short runs by the calling thread)
        model, _ = mlx_flash.load(
            flash,
            "1GB",
            ffn_cache=0.5,
            threads=4,
            read_path="mmap",
            selector=FixedSelector(far_apart),
        )
        _greedy(model, [5, 6, 7], 3)
        return len(_our_threads())

    use_once()
    gc.collect()
    fds, ours = _fds(), _settle_threads(0)
    for _ in range(3):
        assert use_once() > len(ours)  # the pool ran
        gc.collect()
    assert _settle_threads(len(ours)) == ours
    assert _fds() == fds
    model, _ = mlx_flash.load(flash, "1GB", threads=4)  # close() releases at once
    model.flash.close()
    assert _fds() == fds


CTRL_C_DRIVER = textwrap.dedent(
    """
    import json, os, sys, threading
    import numpy as np
    import mlx.core as mx
    import mlx_flash
    from mlx_lm.generate import generate_step
    from mlx_flash.rebuild import dense_ffn_weights
    from mlx_flash.runtime.selectors import FixedSelector
    from test_reliability import assert_buffers_hold_their_neurons

    flash, catch = sys.argv[1], sys.argv[2] == "catch"
    def every_third(layer, x):
        return np.arange(int(mx.argmax(x[-1]).item()) % 3, 1024, 3)

    options = dict(ffn_cache=0.5, pin_share=0.25, window=1, threads=8,
                   selector=FixedSelector(every_third))
    prompt = mx.array([1, 300, 301, 302, 303])

    def greedy(model, n):
        return [int(t) for (t, _), _ in zip(generate_step(prompt, model, max_tokens=n), range(n))]

    model, _ = mlx_flash.load(flash, "1GB", **options)
    print("loaded", flush=True)
    try:
        for i, _ in enumerate(generate_step(prompt, model, max_tokens=-1)):
            print("token", i, flush=True)
    except KeyboardInterrupt:
        if not catch:
            raise
        print("interrupted", flush=True)
        assert_buffers_hold_their_neurons(model, dense_ffn_weights(flash))
        again = greedy(model, 6)
        fresh, _ = mlx_flash.load(flash, "1GB", **options)
        names = sorted(t.name for t in threading.enumerate() if t.name.startswith("mlx_flash"))
        same = again == greedy(fresh, 6)
        print(json.dumps({"same_as_fresh": same, "threads": names}), flush=True)
    """
)


@pytest.mark.parametrize("catch", [True, False], ids=["caught", "uncaught"])
def test_ctrl_c_during_generation_stops_promptly_and_cleanly(catch, relu2, tmp_path):
    """SIGINT in the middle of streaming generation: the process stops within 5 s, prints at most
    Python's one KeyboardInterrupt traceback (no worker-thread exceptions, no abort); a program that
    catches it can keep using the model, which then computes what a fresh one does."""
    script = tmp_path / "driver.py"
    script.write_text(CTRL_C_DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(relu2), "catch" if catch else "raise"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
    )
    try:
        tokens = 0
        for line in proc.stdout:
            tokens += line.startswith("token")
            if tokens == 4:
                break
        assert tokens == 4, proc.stderr.read()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        if catch:
            for line in proc.stdout:
                if line.startswith("interrupted"):
                    break
        stopped = time.monotonic() - sent
        out, err = proc.communicate(timeout=120)
        if not catch:
            stopped = time.monotonic() - sent
    finally:
        proc.kill()
    assert err.count("Traceback") <= (0 if catch else 1), err
    for flood in (
        "Exception in thread",
        "Exception ignored",
        "terminate called",
        "Fatal Python error",
    ):
        assert flood not in err, err
    if catch:
        assert proc.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert report["same_as_fresh"], report
        assert all(name.startswith("mlx_flash-store") for name in report["threads"]), report
    else:
        assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT), (proc.returncode, err)
        assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert stopped < 5.0, stopped


# -- converter safety ------------------------------------------------------------------------------


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _convert_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_flash.convert", *args],
        capture_output=True,
        text=True,
        env={**_subprocess_env(), **(env or {})},
        timeout=300,
    )


def test_cli_conversion_stopped_mid_way_leaves_the_previous_output_untouched(tiny, tmp_path):
    """The real command with --force over an existing OUT, stopped after its first layer as Ctrl-C
    would stop it (every step, and a fresh OUT, in-process: test_convert.py): exit 130, one line and
    no traceback, OUT byte for byte as before, no staging directory left."""
    src = tiny[0]
    out = convert_quietly(src, tmp_path / "flash")
    before = _tree(out)
    done = _convert_cli(str(src), str(out), "--force", env={FAIL_AT_ENV: "layer:0"})
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["flash"]


KILL_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from mlx_flash.convert import converter

    # a conversion killed outright (SIGKILL: no cleanup can run) after its first layer
    def stop(step):
        if step == "layer:0":
            os.kill(os.getpid(), signal.SIGKILL)

    converter._maybe_stop = stop
    converter.convert(sys.argv[1], sys.argv[2], force="--force" in sys.argv, progress=False)
    """
)


def test_conversion_killed_outright_leaves_out_untouched_and_is_cleaned_up_next_time(
    tiny, tmp_path
):
    """SIGKILL (no cleanup can run) mid-way through a --force conversion: the previous OUT is
    intact; the staging directory the dead process left is removed by the next conversion."""
    src = tiny[0]
    script = tmp_path / "kill.py"
    script.write_text(KILL_DRIVER)
    work = tmp_path / "work"
    work.mkdir()
    out = convert_quietly(src, work / "flash")
    before = _tree(out)
    done = subprocess.run(
        [sys.executable, str(script), str(src), str(out), "--force"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _tree(out) == before and verify(out, progress=False) == []
    # what a kill leaves
    assert sorted(p.name.split("-")[0] for p in work.iterdir()) == [
        ".flash.partial",
        "flash",
    ]
    convert_quietly(src, out, force=True)
    assert sorted(p.name for p in work.iterdir()) == ["flash"]


# -- memory safety ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["relu2-8m, dense selector", "stories260K, gate selector"])
def test_budget_too_small_is_refused_before_anything_large_is_allocated(model, request):
    """One byte below the minimum: BudgetError saying what is needed, and MLX allocated next to
    nothing (not the 14.7 MB trunk, not the gate selector's rows, which it reads before the final
    plan); the minimum loads."""
    relu2 = model.startswith("relu2")
    directory = request.getfixturevalue("relu2" if relu2 else "stories_calibrated")
    options = (
        {"max_context": 256}
        if relu2
        else {"max_context": 256, "prefill_step_size": 64, "selector": "gate"}
    )
    probe, _ = mlx_flash.load(directory, "1GB", **options)
    p = probe.flash.plan
    assert relu2 or p.selector > 128 << 10
    minimum = p.trunk + p.kv_cache + p.temporaries + p.selector + 16 * p.neuron_bytes * p.n_layers
    probe.flash.close()
    del probe
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    with pytest.raises(BudgetError, match="needs at least") as info:
        mlx_flash.load(directory, minimum - 1, **options)
    assert "trunk" in str(info.value) and "KV cache" in str(info.value)
    assert mx.get_peak_memory() - before < 64 << 10
    model, _ = mlx_flash.load(directory, minimum, **options)
    assert model.flash.plan.window_rows == 16 and model.flash.plan.pinned_rows == 0


def _kv_bytes(cache) -> int:
    return sum(a.nbytes for c in cache for a in (c.keys, c.values) if a is not None)


def _generate_measuring(
    model, prompt: list[int], n: int, prefill_step_size: int, sampler=None
) -> dict:
    """Tokens from ``prompt`` (greedy unless a sampler is given; no EOS stop), sampling MLX's
    counters after every token."""
    cache = make_prompt_cache(model)
    held, cached, beyond_kv = [], [], []
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=n,
        sampler=sampler,
        prompt_cache=cache,
        prefill_step_size=prefill_step_size,
    )
    for _ in steps:
        held.append(mx.get_active_memory() + mx.get_cache_memory())
        cached.append(mx.get_cache_memory())
        beyond_kv.append(mx.get_active_memory() - _kv_bytes(cache))
    return {"tokens": len(held), "held": max(held), "cached": max(cached), "beyond_kv": beyond_kv}


def test_mlx_memory_stays_within_the_plan_over_500_tokens(stories):
    """MLX's own counters, from before the load to the 500th token, stay inside what the plan
    computed: peak active memory within ``plan.used``, active + MLX's buffer cache within the
    budget, and nothing but the KV cache grows while decoding (a fence list once kept every pinned
    output alive: +d_model floats per layer per token)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model, _ = mlx_flash.load(stories, "6MB", max_context=768, prefill_step_size=128, pin_share=0.5)
    plan = model.flash.plan
    assert plan.pinned_rows and plan.window_rows and plan.ffn_share < 1  # both buffers in play
    prompt = [1] + [(7 * i) % 500 + 3 for i in range(199)]
    run = _generate_measuring(model, prompt, 500, prefill_step_size=128)
    assert run["tokens"] == 500
    peak = mx.get_peak_memory() - base
    assert peak <= plan.used, (peak, plan.describe())
    assert run["held"] - base <= plan.total, (run["held"], plan.describe())
    # MLX's buffer cache only gets the budget's slack
    assert run["cached"] <= plan.total - plan.used
    growth = run["beyond_kv"][-1] - run["beyond_kv"][1]
    assert growth <= 16 << 10, growth


def test_long_prompt_prefill_stays_within_the_plan(stories):
    """A prompt filling the context, prefilled in chunks: the last chunks attend to the whole
    context, and their scores must be in the plan's temporaries (they were sized for one
    chunk only)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model, _ = mlx_flash.load(stories, "6MB", max_context=768, prefill_step_size=128, pin_share=0.5)
    plan = model.flash.plan
    prompt = [1] + [(7 * i) % 500 + 3 for i in range(740)]
    run = _generate_measuring(model, prompt, 8, prefill_step_size=128)
    peak = mx.get_peak_memory() - base
    assert peak <= plan.used, (peak, plan.describe())
    assert run["held"] - base <= plan.total


LARGE_VOCABULARY = dict(CONFIGS["qwen2"], vocab_size=65536, hidden_size=128, intermediate_size=256)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32], ids=str)
def test_large_vocabulary_half_precision_store_stays_within_the_plan(dtype, tmp_path, monkeypatch):
    """A store in float16/bfloat16 computed in float32 (the CPU's dtype) whose largest tensor is
    its embedding (65536 x 128): the loader casts one tensor at a time beside its stored copy,
    before the neuron buffers exist, and the plan counts that transient; a long prompt's last
    chunks attend to the whole context; sampling with top-p and top-k sorts the vocabulary. Peak
    active memory stays within ``plan.used``."""
    monkeypatch.setitem(CONFIGS, "qwen2", LARGE_VOCABULARY)
    src = save_tiny_model("qwen2", tmp_path / "src", dtype=dtype)[0]
    flash = convert_quietly(src, tmp_path / "flash")
    gc.collect()  # what the conversion left (reference cycles) must not count as the baseline
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model, _ = mlx_flash.load(flash, "1GB", max_context=640, prefill_step_size=128, ffn_cache=0.5)
    plan = model.flash.plan
    assert model.flash.compute_dtype == mx.float32
    embedding = 65536 * 128 * dtype.size
    assert plan.load_transient == (0 if dtype == mx.float32 else embedding)
    prompt = [1] + [(7 * i) % 250 + 3 for i in range(600)]
    sampler = make_sampler(0.8, 0.9, top_k=50)
    run = _generate_measuring(model, prompt, 8, prefill_step_size=128, sampler=sampler)
    assert run["tokens"] == 8
    peak = mx.get_peak_memory() - base
    assert peak <= plan.used, (peak, plan.describe())


def test_verify_steps_with_a_large_vocabulary_stay_within_the_plan(tmp_path, monkeypatch):
    """Speculative decoding samples every position of a verify step (the last token and 4 draft
    tokens): five rows of logits and sampler sorts over a 65536-token vocabulary, which the plan
    counts when told ``num_draft_tokens`` (float32 store: no load transient hides it)."""
    monkeypatch.setitem(CONFIGS, "qwen2", LARGE_VOCABULARY)
    src = save_tiny_model("qwen2", tmp_path / "src")[0]
    flash = convert_quietly(src, tmp_path / "flash")
    gc.collect()  # what the conversion left (reference cycles) must not count as the baseline
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model, _ = mlx_flash.load(
        flash, "1GB", max_context=256, prefill_step_size=64, ffn_cache=0.5, num_draft_tokens=4
    )
    plan, sampler = model.flash.plan, make_sampler(0.8, 0.9, top_k=50)
    assert plan.load_transient == 0
    cache = make_prompt_cache(model)
    model(mx.array([[3, 5, 7, 9]]), cache=cache)
    for step in range(8):  # what mlx-lm's speculative_generate_step asks of the main model
        logits = model(mx.array([[11 + step] * 5]), cache=cache)[:, -5:, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(sampler(logprobs.squeeze(0)), logprobs)
        trim_prompt_cache(cache, 2)
    peak = mx.get_peak_memory() - base
    assert peak <= plan.used, (peak, plan.describe())
    assert [p.phase for p in model.flash.telemetry.passes[1:]] == ["verify"] * 8


def test_quantized_kv_cache_stays_within_the_plan(tmp_path, monkeypatch):
    """kv_bits: mlx-lm quantizes the cache once it holds ``quantized_kv_start`` tokens (after
    the prefill step that gets there); the plan counts the full and the quantized copies at
    that moment and the quantized cache after, far below the full one's."""
    monkeypatch.setitem(CONFIGS, "llama", dict(CONFIGS["llama"], head_dim=32))
    src = save_tiny_model("llama", tmp_path / "src")[0]
    flash = convert_quietly(src, tmp_path / "flash")
    options = dict(max_context=1024, prefill_step_size=64, ffn_cache=0.5)
    full = mlx_flash.load(flash, "1GB", **options)[0].flash.plan.kv_cache
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    kv = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=128)
    model, _ = mlx_flash.load(flash, "1GB", **options, **kv)
    plan = model.flash.plan
    assert plan.kv_cache < full / 3
    cache = make_prompt_cache(model)
    prompt = mx.array([1] + [(7 * i) % 250 + 3 for i in range(900)])
    steps = generate_step(
        prompt, model, max_tokens=64, prompt_cache=cache, prefill_step_size=64, **kv
    )
    assert sum(1 for _ in steps) == 64
    assert all(isinstance(c, QuantizedKVCache) for c in cache)
    peak = mx.get_peak_memory() - base
    assert peak <= plan.used, (peak, plan.describe())


@pytest.mark.slow
def test_mlx_memory_stays_within_the_plan_over_500_tokens_relu2(relu2):
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model, _ = mlx_flash.load(relu2, "40MB", max_context=768, prefill_step_size=256, pin_share=0.5)
    plan = model.flash.plan
    assert plan.pinned_rows and plan.window_rows
    prompt = [1] + [(7 * i) % 8000 + 3 for i in range(259)]
    run = _generate_measuring(model, prompt, 500, prefill_step_size=256)
    peak = mx.get_peak_memory() - base
    print(
        f"relu2-8m, 500 tokens: MLX peak {peak / 2**20:.1f} MiB, plan used "
        f"{plan.used / 2**20:.1f} MiB, active+cache max {(run['held'] - base) / 2**20:.1f} MiB, "
        f"budget {plan.total / 2**20:.1f} MiB"
    )
    assert peak <= plan.used and run["held"] - base <= plan.total
    assert run["beyond_kv"][-1] - run["beyond_kv"][1] <= 64 << 10


MEMBUDGET_FLASH = textwrap.dedent(
    """
    import json, resource, sys
    import mlx.core as mx, mlx_lm, mlx_flash
    model, tok = mlx_flash.load(
        sys.argv[1], sys.argv[2], page_cache=False, max_context=512, prefill_step_size=128
    )
    text = mlx_lm.generate(model, tok, "The capital of France is", max_tokens=32)
    print(json.dumps({"text": text, "mlx_peak": mx.get_peak_memory(),
                      "plan_used": model.flash.plan.used,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """
)
MEMBUDGET_DENSE = textwrap.dedent(
    """
    import json, resource, sys
    import mlx.core as mx, mlx_lm
    from mlx_flash.rebuild import load_dense
    model, tok = load_dense(sys.argv[1])
    text = mlx_lm.generate(model, tok, "The capital of France is", max_tokens=32)
    print(json.dumps({"text": text, "mlx_peak": mx.get_peak_memory(),
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """
)


def membudget_scripts(tmp_path: Path, flash: Path) -> dict:
    """Write the flash and dense scripts beside ``tmp_path``; the dense one's report on
    ``flash``, run without a memory limit."""
    (tmp_path / "flash.py").write_text(MEMBUDGET_FLASH)
    (tmp_path / "dense.py").write_text(MEMBUDGET_DENSE)
    dense = subprocess.run(
        [sys.executable, str(tmp_path / "dense.py"), str(flash)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=900,
    )
    assert dense.returncode == 0, dense.stderr
    return json.loads(dense.stdout.splitlines()[-1])


def _membudget(limit: str, script: Path, *args: str) -> tuple[int, dict | None, int]:
    """(exit status, the script's JSON report or None, the cgroup's peak bytes) of a run under
    ``limit``."""
    done = subprocess.run(
        [str(MEMBUDGET), limit, "--", sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=900,
    )
    peak = re.search(r"membudget: limit \d+ MiB, peak (\d+) MiB", done.stderr)
    assert peak, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, json.loads(lines[-1]) if lines else None, int(peak.group(1)) << 20


@pytest.mark.slow
@pytest.mark.skipif(
    not (MEMBUDGET.exists() and hasattr(os, "geteuid") and os.geteuid() == 0),
    reason="needs ../shared/tools/membudget and root (memory cgroups)",
)
def test_smollm2_runs_in_457_mib_where_plain_mlx_lm_is_killed(smollm2_gguf, tmp_path):
    """SmolLM2-135M in float32 (513 MiB of weights) inside a 457 MiB memory cgroup that also
    counts the page cache: the flash model (MLX budget 300 MiB) generates 32 tokens, the text
    plain mlx-lm generates on the same weights; plain mlx-lm on those weights, rebuilt dense, is
    killed for memory."""
    flash = convert_quietly(smollm2_gguf, tmp_path / "smollm2-f32", dtype="float32")
    expected = membudget_scripts(tmp_path, flash)
    rc, flash_run, flash_peak = _membudget("457M", tmp_path / "flash.py", str(flash), "300MiB")
    assert rc == 0 and flash_run is not None, rc
    rc_dense, dense_run, dense_peak = _membudget("457M", tmp_path / "dense.py", str(flash))
    print(
        f"membudget 457 MiB: flash exit 0, cgroup peak {flash_peak / 2**20:.0f} MiB, MLX peak "
        f"{flash_run['mlx_peak'] / 2**20:.1f} MiB (plan {flash_run['plan_used'] / 2**20:.1f} MiB), "
        f"max RSS {flash_run['maxrss'] / 2**20:.0f} MiB; dense: exit {rc_dense}, cgroup peak "
        f"{dense_peak / 2**20:.0f} MiB; dense unconstrained: MLX peak "
        f"{expected['mlx_peak'] / 2**20:.1f} MiB, max RSS {expected['maxrss'] / 2**20:.0f} MiB"
    )
    assert flash_run["text"] == expected["text"]
    assert flash_run["mlx_peak"] <= flash_run["plan_used"]
    assert rc_dense == 128 + signal.SIGKILL and dense_run is None
