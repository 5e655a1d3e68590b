"""`quantscale explain [CKPT --tensor NAME] [--tile R,C] [--ue8m0]`: one 128x128 FP8 tile
walked through quantize and dequantize, with the numbers (a reproducible example weight
when no checkpoint is given)."""

from __future__ import annotations

import argparse

from quantscale.errors import QuantscaleError


def _tile(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--tile {text!r}: expected ROW,COL") from exc
    return r, c


def run(args: argparse.Namespace) -> int:
    from quantscale.checkpoint.explain import example_weight, explain_stored, explain_tile

    if args.ckpt is None:
        fmt = "ue8m0" if args.ue8m0 else None
        print(explain_tile(example_weight(), args.tile, scale_fmt=fmt, name="example weight"))
        return 0
    if args.tensor is None:
        raise QuantscaleError(f"explain {args.ckpt}: name the weight with --tensor")
    print(explain_stored(args.ckpt, args.tensor, args.tile))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain", help="walk one FP8 block tile through quantize and dequantize, with numbers"
    )
    p.add_argument("ckpt", nargs="?", help="checkpoint directory (default: an example weight)")
    p.add_argument("--tensor", help="the 2-D weight of CKPT to explain")
    p.add_argument("--tile", type=_tile, default=(0, 0), help="tile coordinates ROW,COL")
    p.add_argument("--ue8m0", action="store_true", help="power-of-two scales (DeepSeek V3.1)")
    p.set_defaults(func=run)
