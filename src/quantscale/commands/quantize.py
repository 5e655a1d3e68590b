"""`quantscale quantize MODEL_DIR OUT --scheme SCHEME [--method rtn|gptq] [--format F]`.

`--scheme fp8-block` without `--method` streams the checkpoint shard by shard (`SCHEMES`);
any other preset or recipe file loads the model, calibrates and exports (`export.entry`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


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


def run(args: argparse.Namespace) -> int:
    """Streaming FP8 block without calibration; every other scheme/method is calibrated."""
    handler = SCHEMES.get(args.scheme)
    if handler is not None and args.method is None:
        return handler(args)
    from quantscale.export.entry import run_quantize

    return run_quantize(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a checkpoint (e.g. FP8 block-wise)")
    p.add_argument("model_dir", help="input checkpoint directory (bf16/fp16/fp32 safetensors)")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument(
        "--scheme",
        default="fp8-block",
        help="fp8-block (streaming) or a preset (W4A16, NVFP4, W8A8, ...) or a recipe YAML/JSON",
    )
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
    from quantscale.export.entry import add_quantize_arguments

    add_quantize_arguments(p)
    p.set_defaults(func=run)
