"""`quantscale quantize MODEL_DIR OUT --scheme SCHEME`: quantize a checkpoint.

Each scheme has a handler in `SCHEMES`; schemes that need calibration add theirs there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from quantscale.errors import QuantscaleError


def parse_block(text: str) -> tuple[int, int]:
    """`128x128` (or `128`) -> (128, 128)."""
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"block {text!r}: expected ROWSxCOLS, e.g. 128x128"
        ) from err
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"block {text!r}: expected ROWSxCOLS, e.g. 128x128")
    return dims[0], dims[1]


def run_fp8_block(args: argparse.Namespace) -> int:
    """Streaming FP8 block quantization (no calibration)."""
    from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8

    out = quantize_checkpoint_fp8(
        args.model_dir,
        args.out,
        block=args.block,
        ignore=args.ignore,
        scale_fmt=args.scale_fmt,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


SCHEMES: dict[str, Callable[[argparse.Namespace], int]] = {"fp8-block": run_fp8_block}
KNOWN_SCHEMES = ("fp8-block", "fp8", "fp8-dynamic", "nvfp4", "nvfp4a16", "mxfp4", "w8a8", "w4a16")


def run(args: argparse.Namespace) -> int:
    handler = SCHEMES.get(args.scheme)
    if handler is None:
        raise QuantscaleError(
            f"scheme {args.scheme!r} is not yet supported by `quantize`; "
            f"supported: {', '.join(sorted(SCHEMES))}"
        )
    return handler(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a checkpoint (e.g. FP8 block-wise)")
    p.add_argument("model_dir", help="input checkpoint directory (bf16/fp16/fp32 safetensors)")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--scheme", default="fp8-block", help="quantization scheme (default fp8-block)")
    p.add_argument("--block", type=parse_block, default=(128, 128), help="tile, e.g. 128x128")
    p.add_argument(
        "--ignore",
        nargs="*",
        default=[],
        metavar="PAT",
        help="extra modules to leave unquantized (glob, name or re:regex)",
    )
    p.add_argument("--scale-fmt", choices=["ue8m0"], default=None, help="power-of-two scales")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)
