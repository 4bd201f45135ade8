"""``python -m mlx_flash.chat``: an interactive chat like ``mlx_lm.chat``, reusing the prompt cache across turns."""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .cli import add_flash_args, load_options, resolve_model, run_cli
from .loader import load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.chat", description="Chat with a flash-streamed model."
    )
    p.add_argument(
        "--model",
        help="flash model directory (or a model to convert first; default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="maximum tokens per answer")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling top-p")
    p.add_argument("--seed", type=int, default=None, help="PRNG seed")
    p.add_argument("--system-prompt", default=None, help="system prompt")
    p.add_argument(
        "--max-kv-size", type=int, default=4096, help="tokens of conversation the KV cache holds"
    )
    add_flash_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    if args.seed is not None:
        mx.random.seed(args.seed)
    path = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    model, tokenizer = load(
        path,
        args.memory_budget,
        max_context=args.max_kv_size,
        **load_options(args, is_default_model=args.model is None),
    )
    cache = make_prompt_cache(model, args.max_kv_size)
    sampler = make_sampler(args.temp, args.top_p)
    print(f"[{path.name}] type a message; 'q' quits, 'r' resets the conversation.", file=sys.stderr)
    first = True
    while True:
        try:
            query = input(">> ")
        except EOFError:
            break
        if query == "q":
            break
        if query == "r":
            cache, first = make_prompt_cache(model, args.max_kv_size), True
            continue
        messages = (
            [{"role": "system", "content": args.system_prompt}]
            if first and args.system_prompt
            else []
        )
        messages.append({"role": "user", "content": query})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        for response in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            sampler=sampler,
            prompt_cache=cache,
        ):
            print(response.text, end="", flush=True)
        print()
        first = False
    model.flash.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
