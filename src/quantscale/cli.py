"""The `quantscale` command.

Each module in `COMMANDS` adds one sub-command through `register(subparsers)`; the parser it
adds sets `func`, which receives the parsed arguments and returns an exit code. Shared option
helpers live beside them in `quantscale.commands.options`.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from quantscale import __version__
from quantscale.commands import (
    calibrate,
    convert,
    demo,
    dequantize,
    eval,
    inspect,
    mamba,
    quantize,
    sensitivity,
    sweep,
    validate,
)
from quantscale.errors import QuantscaleError

COMMANDS: tuple[ModuleType, ...] = (
    calibrate,
    convert,
    demo,
    dequantize,
    eval,
    inspect,
    mamba,
    quantize,
    sensitivity,
    sweep,
    validate,
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every sub-command of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="quantscale", description="Post-training quantization toolkit for LLMs."
    )
    parser.add_argument("--version", action="version", version=f"quantscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QuantscaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
