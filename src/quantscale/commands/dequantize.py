"""`quantscale dequantize CKPT OUT [--dtype bf16]`: write plain weights from an FP8 checkpoint."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from quantscale.checkpoint.dequantize import dequantize_checkpoint

    out = dequantize_checkpoint(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dequantize", help="FP8 checkpoint (HF, compressed-tensors, Neuron) -> plain weights"
    )
    p.add_argument("ckpt", help="FP8 checkpoint directory")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)
