"""`quantscale convert CKPT OUT --to {hf,compressed-tensors,neuron,modelopt} [--explain]`.

FP8 block checkpoints convert between HF, compressed-tensors and Neuron; NVFP4 checkpoints
between compressed-tensors and ModelOpt; pseudo-quantized ones (fp16 + `_scales`) repack into
compressed-tensors or ModelOpt.
"""

from __future__ import annotations

import argparse

from quantscale.commands.options import add_parallel_options, parallel_runner, print_written
from quantscale.errors import QuantscaleError

TARGETS = ("hf", "compressed-tensors", "neuron", "modelopt")


def run(args: argparse.Namespace) -> int:
    from quantscale.api import convert
    from quantscale.checkpoint.convert import explain

    if args.explain:
        print(explain(args.to))
        if args.ckpt is None:
            return 0
    if args.ckpt is None or args.out is None:
        raise QuantscaleError("convert needs CKPT and OUT (or only --explain)")
    runner = parallel_runner(args)
    out = convert(args.ckpt, args.out, args.to, overwrite=args.overwrite, runner=runner)
    print_written(runner, out, args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="FP8 block checkpoint between HF, compressed-tensors and Neuron layouts; "
        "NVFP4 between compressed-tensors and ModelOpt",
    )
    p.add_argument("ckpt", nargs="?", help="FP8 or NVFP4 checkpoint directory")
    p.add_argument("out", nargs="?", help="output checkpoint directory")
    p.add_argument("--to", required=True, choices=TARGETS, help="target convention")
    p.add_argument("--explain", action="store_true", help="print the rule for each tensor kind")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_parallel_options(p)
    p.set_defaults(func=run)
