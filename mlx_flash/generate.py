"""``python -m mlx_flash.generate``: mlx_lm.generate for models bigger than memory, with flash
telemetry. Its flags are mlx_lm.generate's own (from mlx-lm's parser) plus the flash options."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import setup_arg_parser
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import load_tokenizer

from .cli import (
    add_debug_arg,
    add_flash_args,
    load_options,
    make_args_sampler,
    prepare_generation,
    run_cli,
    stream,
)
from .runtime.errors import FlashError
from .runtime.files import write_json
from .runtime.loader import load
from .runtime.manifest import MANIFEST_FILE
from .runtime.sizes import format_size

TOOL = "generate"
DEFAULT_PROMPT = "Tell me a short story about a lighthouse keeper."
# mlx_lm.generate flags this tool does not honour yet: refused when given, never ignored
UNSUPPORTED = (
    "adapter_path",
    "image",
    "prompt_cache_file",
    "quantize_activations",
    "use_default_chat_template",
)


def build_parser() -> argparse.ArgumentParser:
    p = setup_arg_parser()
    p.prog, p.usage = "python -m mlx_flash.generate", "%(prog)s [-h] [options]"
    p.description = "Generate text with a model whose FFN streams from flash."
    p.set_defaults(model=None, prompt=DEFAULT_PROMPT, max_tokens=100)
    for action in p._actions:
        if action.dest == "model":
            action.help = (
                "flash model directory, or a model directory / hub repo / .gguf file to convert "
                "first (default: SmolLM2-135M-Instruct, fetched and converted on first use)"
            )
    p.add_argument("--stats-json", metavar="FILE", help="write the summary as JSON (README keys)")
    p.add_argument("--stats-per-token", action="store_true", help="also report every token's stats")
    add_flash_args(p, TOOL)
    add_debug_arg(p)
    return p


def build_prompt(tokenizer, args: argparse.Namespace) -> list[int]:
    """Token ids of the prompt, through the chat template when the model has one (as
    mlx_lm.generate does)."""
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt)
    messages = (
        [] if args.system_prompt is None else [{"role": "system", "content": args.system_prompt}]
    )
    messages.append({"role": "user", "content": prompt})
    prefill = args.prefill_response is not None
    if prefill:
        messages.append({"role": "assistant", "content": args.prefill_response})
    template_kwargs = json.loads(args.chat_template_config) if args.chat_template_config else {}
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        continue_final_message=prefill,
        add_generation_prompt=not prefill,
        **template_kwargs,
    )
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
        **{k: v for k, v in summary.items() if k != "tokens"},
        "selector": rt.selector.name,
        "sparsity": rt.choice.sparsity,
        "measured_quality_loss": rt.choice.loss,
        "selector_reason": rt.choice.reason,
        "window": rt.window,
        "threads": rt.reader.threads,
        "page_cache": rt.reader.cache_mode,
    }
    if per_token:
        neurons = rt.telemetry.n_layers * rt.telemetry.d_ffn  # or experts, in MoE layers
        stats["per_token"] = [
            {
                "bytes_read": t.read.bytes,
                "reads": t.read.reads,
                "io_ms": 1e3 * t.read.seconds,
                "compute_ms": 1e3 * t.compute_s,
                "fraction_used": t.requested / neurons / p.tokens,
                "fraction_loaded": t.loaded / neurons / p.tokens,
            }
            for p in rt.telemetry.passes
            if p.phase == "decode"
            for t in (p.total,)
        ]
    return stats


def describe_choice(stats: dict) -> str:
    """One line: the selector, its sparsity, its measured quality loss and why it was chosen."""
    parts = [stats["selector"]]
    if stats["sparsity"] is not None:
        parts.append(f"sparsity {stats['sparsity']:g}")
    loss = stats["measured_quality_loss"]
    parts.append("loss not measured" if loss is None else f"measured loss {100 * loss:+.1f}%")
    return ", ".join(parts) + f" ({stats['selector_reason']})"


def print_summary(stats: dict) -> None:
    plan, size = stats["memory_budget"], format_size
    print("=" * 10)
    print(f"Prompt: {stats['prompt_tokens']} tokens, {stats['prompt_tps']:.3f} tokens-per-sec")
    print(
        f"Generation: {stats['generation_tokens']} tokens, "
        f"{stats['generation_tps']:.3f} tokens-per-sec"
    )
    print(
        f"Peak memory: {size(stats['peak_memory_bytes'])} (MLX); "
        f"process peak {size(stats['process_peak_rss_bytes'])}"
    )
    print(
        f"Memory budget {size(plan['total'])}, planned {size(plan['used'])}: trunk "
        f"{size(plan['trunk'])}, buffers {size(plan['buffers'])} ({100 * plan['ffn_share']:.0f}% "
        f"of each FFN), KV cache {size(plan['kv_cache'])}"
    )
    print(
        f"Flash: {stats['flash_bytes_per_token'] / 1e6:.3f} MB/token in "
        f"{stats['reads_per_token']:.1f} reads, I/O {stats['io_ms_per_token']:.2f} ms/token, "
        f"compute {stats['compute_ms_per_token']:.2f} ms/token"
    )
    print(f"Selector: {describe_choice(stats)}")
    unit = "experts" if "experts_used_per_token" in stats else "FFN neurons"
    print(
        f"Buffer hit rate {100 * stats['buffer_hit_rate']:.1f}%; {unit} per token: used "
        f"{100 * stats['fraction_used']:.1f}%, loaded {100 * stats['fraction_loaded']:.1f}%"
    )
    if unit == "experts":
        print(
            f"Experts per token, all MoE layers: used {stats['experts_used_per_token']:.1f}, "
            f"loaded {stats['experts_loaded_per_token']:.1f}; expert-cache hit rate "
            f"{100 * stats['expert_hit_rate']:.1f}%"
        )
    if "speculative" in stats:
        spec = stats["speculative"]
        print(
            f"Speculative: {spec['accepted_draft_tokens']} draft tokens accepted "
            f"({100 * spec['acceptance_rate']:.0f}% of the text) in {spec['verify_steps']} verify "
            f"steps; flash {spec['flash_bytes_per_generated_token'] / 1e6:.3f} MB per generated "
            f"token; draft weights {format_size(spec['draft_weight_bytes'])} (not in the plan)"
        )
    for i, t in enumerate(stats.get("per_token", [])):
        print(
            f"  token {i:4d}: {t['bytes_read'] / 1e6:8.3f} MB in {t['reads']:5d} reads, I/O "
            f"{t['io_ms']:7.2f} ms, compute {t['compute_ms']:7.2f} ms, used "
            f"{100 * t['fraction_used']:5.1f}%, loaded {100 * t['fraction_loaded']:5.1f}%"
        )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.draft_model is not None and args.max_kv_size is not None:
        parser.error(
            "--max-kv-size cannot be combined with --draft-model: speculative decoding needs a "
            "KV cache it can trim (mlx-lm ignores --max-kv-size there)"
        )
    model_path, tokenizer_config = prepare_generation(parser, args, UNSUPPORTED)
    prompt = build_prompt(load_tokenizer(model_path, tokenizer_config), args)
    # plan the KV cache for this prompt and answer (and the verify steps' logits with a draft)
    options = {"max_context": len(prompt) + args.max_tokens, **load_options(args, TOOL)}
    if args.draft_model is not None:
        options["num_draft_tokens"] = args.num_draft_tokens
    model, tokenizer = load(model_path, tokenizer_config=tokenizer_config, **options)
    for token in args.extra_eos_token:
        tokenizer.add_eos_token(token)
    draft = load_draft(args.draft_model, tokenizer) if args.draft_model else None
    response, text, drafted = None, [], 0
    if args.verbose:
        print("=" * 10)
    for response in generate_tokens(model, tokenizer, prompt, args, draft):
        text.append(response.text)
        drafted += response.from_draft
        if args.verbose:
            print(response.text, end="", flush=True)
    if not args.verbose:
        print("".join(text))
    else:
        print()
        stats = collect_stats(model, response, model_path, args.stats_per_token)
        if draft is not None:
            stats["speculative"] = speculative_stats(model, draft, args, response, drafted)
        print_summary(stats)
        if args.stats_json:
            write_json(args.stats_json, stats)
    model.flash.close()
    return 0


def generate_tokens(model, tokenizer, prompt: list[int], args: argparse.Namespace, draft):
    """mlx-lm's stream_generate with the command's sampler, KV cache and draft model."""
    sampler = make_args_sampler(args, tokenizer)
    if draft is None:
        max_kv_size = model.flash.options.max_kv_size
        return stream(model, tokenizer, prompt, args, sampler, max_kv_size=max_kv_size)
    return stream(
        model,
        tokenizer,
        prompt,
        args,
        sampler,
        draft_model=draft,
        num_draft_tokens=args.num_draft_tokens,
    )


def load_draft(path: str, tokenizer):
    """The --draft-model: a plain mlx-lm model directory or another flash model directory (with
    its own stored settings), whose tokenizer must be the model's (as mlx_lm.generate checks)."""
    directory = Path(path)
    if (directory / MANIFEST_FILE).is_file():
        draft, draft_tokenizer = load(directory)
    elif (directory / "config.json").is_file():
        draft, draft_tokenizer = mlx_lm_load(str(directory))
    else:
        raise FlashError(f"--draft-model {path}: not an mlx-lm or flash model directory")
    if draft_tokenizer.vocab_size != tokenizer.vocab_size:
        raise FlashError(
            f"--draft-model {path}: its tokenizer has {draft_tokenizer.vocab_size} tokens, the "
            f"model's {tokenizer.vocab_size}: speculative decoding needs the same tokenizer"
        )
    return draft


def speculative_stats(model, draft, args: argparse.Namespace, response, drafted: int) -> dict:
    """What speculative decoding did: draft tokens accepted, verify steps, the flash bytes read per
    generated token by decode and verify steps together, and the draft's weights (MLX's peak
    counts them; the flash model's plan does not)."""
    passes = [p for p in model.flash.telemetry.passes if p.phase in ("decode", "verify")]
    read = sum(p.total.read.bytes for p in passes)
    return {
        "draft_model": args.draft_model,
        "draft_weight_bytes": sum(p.nbytes for _, p in tree_flatten(draft.parameters())),
        "num_draft_tokens": args.num_draft_tokens,
        "accepted_draft_tokens": drafted,
        "acceptance_rate": drafted / max(1, response.generation_tokens),
        "verify_steps": sum(p.phase == "verify" for p in passes),
        "flash_bytes_per_generated_token": read / max(1, response.generation_tokens),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_cli(lambda args: run(args, parser), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
