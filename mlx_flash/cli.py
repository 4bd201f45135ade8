"""Pieces shared by the command-line tools: the flash flags (made from ``FlashOptions``), model
resolution, and error reporting."""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import Field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .default_model import default_dtype, default_model_path
from .runtime.errors import FlashError, OptionError
from .runtime.files import cache_root, write_json
from .runtime.manifest import MANIFEST_FILE, read_manifest
from .runtime.options import check_option, option_fields, tool_default, tool_defaults

REPORT = "this is a bug in mlx_flash: please report it with the traceback above"


def add_flash_args(parser: argparse.ArgumentParser, tool: str) -> None:
    """Add a flag for every FlashOptions field. Flags the parser already has (mlx-lm's own, such
    as ``--max-kv-size``) keep their meaning and get the flash default and help."""
    existing = {s: a for a in parser._actions for s in a.option_strings}
    group = parser.add_argument_group(
        "flash options (stored defaults: python -m mlx_flash.settings)"
    )
    for f in option_fields():
        if not f.metadata["cli"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        help = _help(f, tool)
        if flag in existing:
            action = existing[flag]
            action.default, action.help, action.type = None, help, _arg_type(f.name)
            continue
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
            continue
        group.add_argument(flag, type=_arg_type(f.name), metavar=f.metadata["metavar"], help=help)
        for alias in f.metadata["aliases"]:
            group.add_argument(
                "--" + alias.replace("_", "-"),
                dest=f.name,
                type=_arg_type(f.name),
                action=_Deprecated,
                help=argparse.SUPPRESS,
            )


def load_options(args: argparse.Namespace, tool: str) -> dict[str, Any]:
    """``mlx_flash.load`` keywords from the flash flags: the command's defaults, then what was given
    (the model directory's stored settings fill the rest)."""
    given = {f.name: getattr(args, f.name, None) for f in option_fields() if f.metadata["cli"]}
    return {**tool_defaults(tool), **{k: v for k, v in given.items() if v is not None}}


def refuse(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]) -> None:
    """Inherited flags mlx_flash does not honour yet: an error if one was given, never ignored."""
    for name in names:
        if getattr(args, name) != parser.get_default(name):
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} is not supported by mlx_flash yet")


def resolve_model(model: str | None, log: Callable[[str], None] = print) -> Path:
    """A flash model directory for --model: as given, or converted once into the cache."""
    if model is None:
        return default_model_path(log=log)
    path = Path(model)
    if (path / MANIFEST_FILE).is_file():
        return path
    if not path.exists() and (model.count("/") != 1 or model.startswith((".", "/", "~"))):
        raise FlashError(
            f"{model}: no such file or directory (and not a hub repo id like org/name)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        read_manifest(path)  # raises the clear "not a flash model directory" error
    stem = path.stem if path.suffix == ".gguf" else str(model).strip("/")
    out = cache_root() / "converted" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}-{default_dtype()}"
    if (out / MANIFEST_FILE).is_file():
        return out
    from .convert.converter import convert

    log(
        f"{model} is not a flash model directory: converting it into {out} once, without "
        "calibration (it runs dense; convert with python -m mlx_flash.convert for sparsity)"
    )
    dtype = default_dtype() if path.suffix == ".gguf" else None
    return convert(model, out, dtype=dtype, force=True, calibration=None, log=log)


def prepare_generation(
    parser: argparse.ArgumentParser, args: argparse.Namespace, unsupported: Sequence[str]
) -> tuple[Path, dict | None]:
    """What the mlx-lm-style commands (generate, chat) do before loading: refuse the inherited
    flags not honoured yet, seed, resolve --model; the model directory and tokenizer config."""
    refuse(parser, args, unsupported)
    if args.seed is not None:
        mx.random.seed(args.seed)
    path = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    tokenizer_config = {"trust_remote_code": True} if args.trust_remote_code else None
    return path, tokenizer_config


def stream(model, tokenizer, prompt, args: argparse.Namespace, sampler, **kwargs):
    """mlx-lm's ``stream_generate`` with the command's --max-tokens and sampler, prefilling in the
    steps and quantizing the KV cache as the memory plan assumes."""
    from mlx_lm.generate import stream_generate

    options = model.flash.options
    return stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        sampler=sampler,
        prefill_step_size=options.prefill_step_size,
        kv_bits=options.kv_bits,
        kv_group_size=options.kv_group_size,
        quantized_kv_start=options.quantized_kv_start,
        **kwargs,
    )


def make_args_sampler(args: argparse.Namespace, tokenizer):
    """mlx-lm's sampler from mlx_lm.generate's sampling flags."""
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(
        args.temp,
        args.top_p,
        args.min_p,
        args.min_tokens_to_keep,
        top_k=args.top_k,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )


def write_outputs(
    data: dict, json_path: Path | None, plot_path: Path | None, plot: Callable[[dict, Path], None]
) -> None:
    """A measuring command's --json and --plot files, each named on stdout once written."""
    if json_path:
        write_json(json_path, data)
        print(f"wrote {json_path}")
    if plot_path:
        plot(data, plot_path)
        print(f"wrote {plot_path}")


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (with causes) on errors"
    )


def run_cli(
    main: Callable[[argparse.Namespace], int],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse and run. Expected bad input (a FlashError, or the OS refusing one of the user's paths)
    is one line on stderr and exit status 1 (a traceback with --debug); anything else is a bug:
    the traceback and a request to report it."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        expected = isinstance(e, FlashError) or (isinstance(e, OSError) and e.filename is not None)
        if not expected or getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {e}" if expected else f"error: {REPORT}", file=sys.stderr)
        return 1 if expected else 2


def _help(f: Field, tool: str) -> str:
    default = tool_default(f.name, tool)
    text = f.metadata["help"]
    if default is not None and "default" not in text:
        text += f" (default: {default})"
    return text.replace("%", "%%")


def _literal(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _arg_type(name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return check_option(name, _literal(text))
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    parse.__name__ = name
    return parse


class _Deprecated(argparse.Action):
    """An old flag name: works, and says which name to use instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"warning: {option_string} is deprecated; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)
