"""`quantscale dequantize CKPT OUT [--dtype bfloat16]`: plain weights from an FP8 checkpoint."""

from __future__ import annotations

import argparse

from quantscale.commands.options import (
    add_dtype_option,
    add_overwrite_option,
    add_parallel_options,
    parallel_runner,
    print_written,
)


def run(args: argparse.Namespace) -> int:
    from quantscale.checkpoint.dequantize import dequantize_checkpoint

    runner = parallel_runner(args)
    out = dequantize_checkpoint(
        args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite, runner=runner
    )
    print_written(runner, out, args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dequantize", help="FP8 checkpoint (HF, compressed-tensors, Neuron) -> plain weights"
    )
    p.add_argument("ckpt", help="FP8 checkpoint directory")
    p.add_argument("out", help="output checkpoint directory")
    add_dtype_option(p, default="bfloat16")
    add_overwrite_option(p)
    add_parallel_options(p)
    p.set_defaults(func=run)
