"""The generate CLI end to end in a subprocess, and stock mlx-lm tools on a flash directory."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

STORIES_START = ", there was a little girl named Lily. She loved to play outside in the park."
STATS_KEYS = {
    "model",
    "prompt_tokens",
    "prompt_tps",
    "generation_tokens",
    "generation_tps",
    "peak_memory_bytes",
    "process_peak_rss_bytes",
    "memory_budget",
    "flash_bytes_per_token",
    "reads_per_token",
    "io_ms_per_token",
    "limit_ms_per_token",
    "compute_ms_per_token",
    "lookahead_recall",
    "buffer_hit_rate",
    "fraction_used",
    "fraction_loaded",
    "fraction_computed",
    "selector",
    "sparsity",
    "measured_quality_loss",
    "selector_reason",
    "window",
    "threads",
    "page_cache",
    "per_token",
}


def run(
    *args: str, stdin: str | None = None, module: str = "mlx_flash.generate"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *module.split(), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


def test_stories_streams_the_reference_story_with_stats(stories_flash, tmp_path):
    stats_file = tmp_path / "stats.json"
    done = run(
        "--model",
        str(stories_flash),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "40",
        "--ffn-cache",
        "0.34",
        "--stats-json",
        str(stats_file),
        "--stats-per-token",
    )
    assert done.returncode == 0, done.stderr
    assert STORIES_START in done.stdout
    assert "Generation: 40 tokens" in done.stdout and "MB/token" in done.stdout
    stats = json.loads(stats_file.read_text())
    assert set(stats) == STATS_KEYS
    assert stats["generation_tokens"] == 40 and stats["prompt_tokens"] >= 5
    plan = stats["memory_budget"]
    assert 0.3 <= plan["ffn_share"] <= 0.4 and plan["used"] <= plan["total"]
    # a third of each FFN is buffered and the dense selector needs all of it: two thirds
    # stream per token
    assert stats["fraction_used"] == 1.0
    assert 0.55 <= stats["fraction_loaded"] <= 0.7
    assert stats["flash_bytes_per_token"] > 0 and stats["reads_per_token"] > 0
    assert len(stats["per_token"]) >= 40 and all(t["bytes_read"] > 0 for t in stats["per_token"])


def test_quiet_output_and_prompt_from_stdin(stories_flash):
    done = run(
        "--model",
        str(stories_flash),
        "--prompt",
        "-",
        "--max-tokens",
        "12",
        "--verbose",
        "False",
        stdin="Once upon a time",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(", there was a little girl") and "Generation:" not in done.stdout


@pytest.mark.parametrize(
    "args, status, message",
    [  # argparse refuses values it can check (usage + one line, status 2); the rest is one line
        (["--selector", "bogus"], 2, "argument --selector: selector must be one of auto"),
        (
            ["--memory-budget", "lots"],
            2,
            "argument --memory-budget: memory_budget cannot read size",
        ),
        (["--ffn-cache", "150%"], 2, "argument --ffn-cache: ffn_cache share '150%' must be in"),
        (["--prompt-cache-file", "c"], 2, "--prompt-cache-file is not supported by mlx_flash yet"),
        (["--kv-bits", "7"], 2, "argument --kv-bits: kv_bits must be one of 2, 3, 4, 5, 6, 8"),
        (["--kv-bits", "4", "--kv-group-size", "32"], 1, "kv_group_size 32 does not divide"),
        (["--draft-model", "nowhere"], 1, "--draft-model nowhere: not an mlx-lm or flash"),
        (["--draft-model", "d", "--max-kv-size", "64"], 2, "--max-kv-size cannot be combined"),
        (["--memory-budget", "1KB"], 1, "error: memory budget 1.00 KB is too small"),
    ],
)
def test_bad_arguments_give_a_clear_line(stories_flash, args, status, message):
    done = run("--model", str(stories_flash), "--max-tokens", "2", *args)
    assert done.returncode == status
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == status - 1


def _text(output: str) -> str:
    return output.split("==========")[1].strip()


def test_speculative_decoding_gives_the_greedy_text(stories_flash, tmp_path):
    """--draft-model: a plain mlx-lm directory (the flash model exported) or another flash
    directory drafts; with the dense selector the text is plain greedy decoding's, and the stats
    say how many draft tokens were accepted and what a generated token read."""
    exported = tmp_path / "plain"
    done = run(str(stories_flash), str(exported), "--dtype", "float32", module="mlx_flash.rebuild")
    assert done.returncode == 0, done.stderr
    prompt = ["--model", str(stories_flash), "--prompt", "Once upon a time", "--max-tokens", "40"]
    prompt += ["--ffn-cache", "0.34", "--selector", "dense"]
    plain = run(*prompt)
    assert plain.returncode == 0, plain.stderr
    for draft in (exported, stories_flash):
        stats_file = tmp_path / "stats.json"
        spec = run(*prompt, "--draft-model", str(draft), "--stats-json", str(stats_file))
        assert spec.returncode == 0, spec.stderr
        assert _text(spec.stdout) == _text(plain.stdout)
        stats = json.loads(stats_file.read_text())
        speculative = stats["speculative"]
        assert speculative["num_draft_tokens"] == 3 and speculative["verify_steps"] >= 10
        assert speculative["accepted_draft_tokens"] >= 20  # the same weights agree on most
        draft = speculative["draft_weight_bytes"]
        assert draft > 0 and stats["peak_memory_bytes"] <= stats["memory_budget"]["used"] + draft


def test_quantized_kv_cache_flags(relu2_flash, tmp_path):
    """--kv-bits/--kv-group-size/--quantized-kv-start mean what they mean to mlx_lm.generate; the
    plan counts the quantized cache (and, at the switch, both copies) and MLX stays within it."""
    prompt = ["--model", str(relu2_flash), "--prompt", "The history of the city", "--max-tokens"]
    prompt += ["48", "--max-context", "4096", "--stats-json"]
    plans = {}
    for bits in (None, "4"):
        quantize = [] if bits is None else ["--kv-bits", bits, "--quantized-kv-start", "16"]
        done = run(*prompt, str(tmp_path / "s.json"), *quantize, "--kv-group-size", "32")
        assert done.returncode == 0, done.stderr
        stats = json.loads((tmp_path / "s.json").read_text())
        assert stats["generation_tokens"] == 48
        assert stats["peak_memory_bytes"] <= stats["memory_budget"]["used"]
        plans[bits] = stats["memory_budget"]["kv_cache"]
    assert plans["4"] < plans[None] / 3


def _with_chat_template(flash: Path, tmp_path: Path) -> Path:
    """A copy of a tiny flash model whose tokenizer has a chat template (with a variable)."""
    flash = Path(shutil.copytree(flash, tmp_path / "chat"))
    config = json.loads((flash / "tokenizer_config.json").read_text())
    template = "{{ greeting | default('') }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    config["chat_template"] = template
    (flash / "tokenizer_config.json").write_text(json.dumps(config))
    return flash


def test_chat_template_config_reaches_the_template(tiny_flash, tmp_path):
    flash = _with_chat_template(tiny_flash("qwen2")[1], tmp_path)
    tokens = []
    for extra in ([], ["--chat-template-config", '{"greeting": "Hi! "}']):
        stats = tmp_path / "stats.json"
        done = run("--model", str(flash), "--max-tokens", "2", "--stats-json", str(stats), *extra)
        assert done.returncode == 0, done.stderr
        tokens.append(json.loads(stats.read_text())["prompt_tokens"])
    assert tokens[1] == tokens[0] + len("Hi! ")  # one byte, one token


def test_chat_honours_mlx_lm_chats_sampling_flags(tiny_flash, tmp_path):
    """chat takes mlx_lm.chat's sampling flags (and generate's --top-k/--min-p): top-k 1 at any
    temperature is greedy, a seed repeats a sampled answer; two turns share one prompt cache."""
    flash = _with_chat_template(tiny_flash("qwen2")[1], tmp_path)

    def chat(*flags: str) -> str:
        done = run(
            "--model", str(flash), "--max-tokens", "16", *flags,
            stdin="hello there\nand again\nq\n", module="mlx_flash.chat",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("\n") >= 2  # one line per turn
        return done.stdout

    greedy = chat("--temp", "0")
    assert chat("--temp", "1.5", "--top-k", "1") == greedy
    sampled = chat("--temp", "1.5", "--top-p", "0.95", "--seed", "7")
    assert chat("--temp", "1.5", "--top-p", "0.95", "--seed", "7") == sampled != greedy


def test_missing_and_non_flash_models_are_refused(tmp_path):
    missing = run("--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "nowhere: no such file" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run("--model", str(tmp_path / "empty"))
    assert (
        empty.returncode == 1
        and "not a flash model directory" in empty.stderr
        and "Traceback" not in empty.stderr
    )
    debug = run("--model", str(tmp_path / "empty"), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def _mlx_lm_text(output: str) -> str:
    return output.split("==========")[1].strip()


def test_mlx_lm_generate_matches_mlx_flash_generate(stories_flash):
    prompt = ["--prompt", "Once upon a time", "--max-tokens", "30", "--ignore-chat-template"]
    ours = run("--model", str(stories_flash), "--verbose", "False", *prompt)
    stock = run(
        "--model", str(stories_flash), "--trust-remote-code", *prompt, module="mlx_lm generate"
    )
    assert ours.returncode == 0 and stock.returncode == 0, stock.stderr
    assert _mlx_lm_text(stock.stdout) == ours.stdout.strip()
    refused = run("--model", str(stories_flash), *prompt, module="mlx_lm generate")
    assert refused.returncode != 0 and "trust_remote_code" in refused.stderr


def test_smollm2_chat_answers_paris(smollm2_flash):
    done = run(
        "--model",
        str(smollm2_flash),
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "12",
        "--ffn-cache",
        "0.5",
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout.split("==========")[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlx_lm_server_serves_two_concurrent_requests(stories_flash):
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(stories_flash),
            "--trust-remote-code",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)

        def complete(prompt: str) -> str:
            body = json.dumps({"prompt": prompt, "max_tokens": 16, "temperature": 0.0}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                body,
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as r:
                return json.loads(r.read())["choices"][0]["text"]

        prompts = ["Once upon a time", "The little dog"]
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(complete, prompts))
        alone = [complete(p) for p in prompts]
        assert together == alone and all(together)
        assert together[0].startswith(", there was a little girl")
    finally:
        server.terminate()
        server.wait(timeout=30)
