"""``python -m mlx_flash.chat``: an interactive chat like ``mlx_lm.chat``, reusing the prompt cache
across turns. Its flags are mlx_lm.chat's own, mlx_lm.generate's sampling flags chat lacks, and the
flash options."""

from __future__ import annotations

import argparse
import sys

from mlx_lm.chat import setup_arg_parser
from mlx_lm.generate import setup_arg_parser as generate_arg_parser
from mlx_lm.models.cache import make_prompt_cache

from .cli import (
    add_debug_arg,
    add_flash_args,
    load_options,
    make_args_sampler,
    prepare_generation,
    run_cli,
    stream,
)
from .runtime.loader import load

TOOL = "chat"
UNSUPPORTED = ("adapter_path", "pipeline")  # mlx_lm.chat flags this tool does not honour yet
SAMPLING = ("min_p", "top_k", "min_tokens_to_keep")  # mlx_lm.generate's, missing from mlx_lm.chat


def build_parser() -> argparse.ArgumentParser:
    p = setup_arg_parser()
    p.prog, p.usage = "python -m mlx_flash.chat", "%(prog)s [-h] [options]"
    p.description = "Chat with a model whose FFN streams from flash."
    p.set_defaults(model=None)
    for action in generate_arg_parser()._actions:
        if action.dest in SAMPLING:
            p._add_action(action)
    add_flash_args(p, TOOL)
    add_debug_arg(p)
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    path, tokenizer_config = prepare_generation(parser, args, UNSUPPORTED)
    model, tokenizer = load(path, tokenizer_config=tokenizer_config, **load_options(args, TOOL))
    options = model.flash.options

    def new_cache():
        return make_prompt_cache(model, options.max_kv_size)

    cache, first = new_cache(), True
    sampler = make_args_sampler(args, tokenizer)
    print(f"[{path.name}] type a message; 'q' quits, 'r' resets the conversation.", file=sys.stderr)
    while True:
        try:
            query = input(">> ")
        except EOFError:
            break
        if query == "q":
            break
        if query == "r":
            cache, first = new_cache(), True
            continue
        messages = (
            [{"role": "system", "content": args.system_prompt}]
            if first and args.system_prompt
            else []
        )
        messages.append({"role": "user", "content": query})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        for response in stream(model, tokenizer, prompt, args, sampler, prompt_cache=cache):
            print(response.text, end="", flush=True)
        print()
        first = False
    model.flash.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_cli(lambda args: run(args, parser), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
