"""``python -m mlx_flash.convert SRC OUT [options]`` and
``python -m mlx_flash.convert --verify DIR``."""

from __future__ import annotations

import argparse
import sys

from mlx_flash.cli import add_debug_arg, run_cli

from .calibrate import add_calibration_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.convert",
        description="Convert a model (Hugging Face / mlx-lm directory, hub repo id, or .gguf file) "
        "into a flash model directory: trunk weights for DRAM plus a neuron-bundled FFN store for "
        "streaming.",
    )
    p.add_argument("src", nargs="?", help="source model: directory, hub repo id, or .gguf file")
    p.add_argument("out", nargs="?", help="output flash model directory")
    p.add_argument(
        "--verify", metavar="DIR", help="check the checksums of a flash model directory and exit"
    )
    _add_store_args(p)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _add_calibration_args(p)
    add_debug_arg(p)
    return p


def _add_store_args(p: argparse.ArgumentParser) -> None:
    """How the FFN store is written: dtype, quantization, layout, alignment."""
    p.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="store and trunk dtype (default: the source's)",
    )
    p.add_argument(
        "-q", "--quantize", action="store_true", help="quantize FFN records (affine, along d_model)"
    )
    p.add_argument(
        "--q-bits", type=int, default=4, choices=[4, 8], help="bits per weight with --quantize"
    )
    p.add_argument(
        "--q-group-size",
        type=int,
        default=64,
        choices=[32, 64, 128],
        help="group size with --quantize",
    )
    p.add_argument(
        "--layout",
        choices=["bundled", "unbundled"],
        default="bundled",
        help="bundled: one record per neuron (gate row, up row, down column); "
        "unbundled: one per matrix row",
    )
    p.add_argument(
        "--align",
        type=int,
        default=0,
        help="pad records to a multiple of this many bytes (4096 for O_DIRECT); 0 = no padding",
    )


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    """What the conversion measures the activations on, and what the predictors learn."""
    p.add_argument(
        "--calibration",
        metavar="FILE",
        default="builtin",
        help="text to measure FFN activations on and train the predictors with "
        "(default: a built-in English sample)",
    )
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="skip calibration (the model then runs dense by default)",
    )
    add_calibration_flags(p)


def run(args: argparse.Namespace) -> int:
    if args.verify:
        from .verify import verify

        problems = verify(args.verify)
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        if not problems:
            print(f"{args.verify}: OK")
        return 1 if problems else 0
    if not args.src or not args.out:
        build_parser().error("SRC and OUT are required (or --verify DIR)")
    from .converter import convert

    convert(
        args.src,
        args.out,
        dtype=args.dtype,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        layout=args.layout,
        align=args.align,
        force=args.force,
        calibration=None if args.no_calibration else args.calibration,
        sparsity=args.sparsity,
        predictor_rank=args.predictor_rank,
        placement=args.placement,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
