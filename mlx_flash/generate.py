"""``python -m mlx_flash.generate``: mlx_lm.generate for models bigger than memory, with flash telemetry."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from .cli import add_flash_args, load_options, resolve_model, run_cli
from .loader import load
from .sizes import format_size

DEFAULT_PROMPT = "Tell me a short story about a lighthouse keeper."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.generate",
        description="Generate text with a model whose FFN streams from flash (mlx_lm.generate flags, plus flash flags).",
    )
    p.add_argument(
        "--model",
        help="flash model directory, or a model directory / hub repo / .gguf file to convert "
        "first (default: SmolLM2-135M-Instruct, fetched and converted on first use)",
    )
    p.add_argument(
        "--prompt", "-p", default=DEFAULT_PROMPT, help="message to the model ('-' reads stdin)"
    )
    p.add_argument(
        "--max-tokens", "-m", type=int, default=100, help="maximum number of tokens to generate"
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling top-p")
    p.add_argument("--min-p", type=float, default=0.0, help="sampling min-p")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k")
    p.add_argument("--seed", type=int, default=None, help="PRNG seed")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    p.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="use the raw prompt without the chat template",
    )
    p.add_argument(
        "--verbose",
        type=lambda s: s.lower() not in ("false", "f", "0", "no"),
        default=True,
        help="print the streamed text and the summary (False: print only the generated text)",
    )
    p.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="tokens of KV cache the memory budget reserves (default: prompt + max tokens)",
    )
    p.add_argument(
        "--prefill-step-size", type=int, default=512, help="prompt tokens per prefill step"
    )
    p.add_argument(
        "--stats-json",
        metavar="FILE",
        help="write the summary as JSON (keys documented in the README)",
    )
    p.add_argument(
        "--stats-per-token",
        action="store_true",
        help="also report every generated token's flash stats",
    )
    add_flash_args(p)
    return p


def build_prompt(
    tokenizer, prompt: str, system_prompt: str | None, ignore_chat_template: bool
) -> list[int]:
    """Token ids of the prompt, through the chat template when the model has one (as mlx_lm.generate does)."""
    prompt = sys.stdin.read() if prompt == "-" else prompt.replace("\\n", "\n").replace("\\t", "\t")
    use_template = not ignore_chat_template and tokenizer.has_chat_template
    if not use_template:
        return tokenizer.encode(prompt)
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def collect_stats(model, response, model_path: Path, per_token: bool) -> dict:
    """The summary with stable keys (see the README's --stats-json table)."""
    rt = model.flash
    summary = rt.telemetry.summary("decode")
    stats = {
        "model": str(model_path),
        "prompt_tokens": response.prompt_tokens,
        "prompt_tps": response.prompt_tps,
        "generation_tokens": response.generation_tokens,
        "generation_tps": response.generation_tps,
        "peak_memory_bytes": mx.get_peak_memory(),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_budget": rt.plan.as_dict(),
        "flash_bytes_per_token": summary["flash_bytes_per_token"],
        "reads_per_token": summary["reads_per_token"],
        "io_ms_per_token": summary["io_ms_per_token"],
        "compute_ms_per_token": summary["compute_ms_per_token"],
        "buffer_hit_rate": summary["buffer_hit_rate"],
        "fraction_used": summary["fraction_used"],
        "fraction_loaded": summary["fraction_loaded"],
        "fraction_computed": summary["fraction_computed"],
        "selector": type(rt.selector).__name__,
        "window": rt.window,
        "threads": rt.reader.threads,
        "page_cache": rt.reader.cache_mode,
    }
    if per_token:
        neurons = rt.manifest.n_layers * rt.manifest.d_ffn
        stats["per_token"] = [
            {
                "bytes_read": p.bytes_read,
                "reads": p.reads,
                "io_ms": 1e3 * p.io_s,
                "compute_ms": 1e3 * p.compute_s,
                "fraction_used": p.requested / neurons / p.tokens,
                "fraction_loaded": p.loaded / neurons / p.tokens,
            }
            for p in rt.telemetry.passes
            if p.phase == "decode"
        ]
    return stats


def print_summary(stats: dict) -> None:
    plan = stats["memory_budget"]
    print("=" * 10)
    print(f"Prompt: {stats['prompt_tokens']} tokens, {stats['prompt_tps']:.3f} tokens-per-sec")
    print(
        f"Generation: {stats['generation_tokens']} tokens, {stats['generation_tps']:.3f} tokens-per-sec"
    )
    print(
        f"Peak memory: {format_size(stats['peak_memory_bytes'])} (MLX); process peak {format_size(stats['process_peak_rss_bytes'])}"
    )
    print(
        f"Memory budget {format_size(plan['total'])}, planned {format_size(plan['used'])}: trunk {format_size(plan['trunk'])}, buffers "
        f"{format_size(plan['buffers'])} ({100 * plan['ffn_share']:.0f}% of each FFN), KV cache {format_size(plan['kv_cache'])}"
    )
    print(
        f"Flash: {stats['flash_bytes_per_token'] / 1e6:.3f} MB/token in {stats['reads_per_token']:.1f} reads, "
        f"I/O {stats['io_ms_per_token']:.2f} ms/token, compute {stats['compute_ms_per_token']:.2f} ms/token"
    )
    print(
        f"Buffer hit rate {100 * stats['buffer_hit_rate']:.1f}%; FFN neurons per token: used "
        f"{100 * stats['fraction_used']:.1f}%, loaded {100 * stats['fraction_loaded']:.1f}%"
    )
    for i, t in enumerate(stats.get("per_token", [])):
        print(
            f"  token {i:4d}: {t['bytes_read'] / 1e6:8.3f} MB in {t['reads']:5d} reads, I/O {t['io_ms']:7.2f} ms, "
            f"compute {t['compute_ms']:7.2f} ms, used {100 * t['fraction_used']:5.1f}%, loaded {100 * t['fraction_loaded']:5.1f}%"
        )


def run(args: argparse.Namespace) -> int:
    log = print if args.verbose else (lambda *_: None)
    if args.seed is not None:
        mx.random.seed(args.seed)
    model_path = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    from mlx_lm.utils import load_tokenizer

    prompt = build_prompt(
        load_tokenizer(model_path), args.prompt, args.system_prompt, args.ignore_chat_template
    )
    options = load_options(args, is_default_model=args.model is None)
    max_context = args.max_kv_size or len(prompt) + args.max_tokens
    model, tokenizer = load(
        model_path,
        args.memory_budget,
        max_context=max_context,
        prefill_step_size=args.prefill_step_size,
        **options,
    )
    sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    log("=" * 10)
    response, text = None, []
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        sampler=sampler,
        prefill_step_size=args.prefill_step_size,
    ):
        text.append(response.text)
        if args.verbose:
            print(response.text, end="", flush=True)
    if not args.verbose:
        print("".join(text))
        return 0
    print()
    stats = collect_stats(model, response, model_path, args.stats_per_token)
    print_summary(stats)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats, indent=1))
    model.flash.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
