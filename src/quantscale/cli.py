"""The `quantscale` command.

Each module in `COMMANDS` adds one sub-command through `register(subparsers)`; the parser it
adds sets `func`, which receives the parsed arguments and returns an exit code. Shared option
helpers live beside them in `quantscale.commands.options`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from quantscale import __version__
from quantscale.commands import (
    calibrate,
    convert,
    demo,
    dequantize,
    eval,
    explain,
    inspect,
    mamba,
    quantize,
    sensitivity,
    sweep,
    validate,
)
from quantscale.distributed import launched
from quantscale.errors import QuantscaleError

DISTRIBUTED = ("quantize",)  # the commands that run across torchrun ranks
COMMANDS: tuple[ModuleType, ...] = (
    calibrate,
    convert,
    demo,
    dequantize,
    eval,
    explain,
    inspect,
    mamba,
    quantize,
    sensitivity,
    sweep,
    validate,
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (stdout stays for results and JSON)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(quiet: bool) -> None:
    """Show quantscale's INFO messages (or only warnings with --quiet) on stderr, once."""
    logger = logging.getLogger("quantscale")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every sub-command of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="quantscale", description="Post-training quantization toolkit for LLMs."
    )
    parser.add_argument("--version", action="version", version=f"quantscale {__version__}")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and errors on stderr"
    )
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
    configure_logging(args.quiet)
    if launched() and args.command not in DISTRIBUTED:
        print(
            f"error: `{args.command}` runs in one process; under torchrun only "
            f"{', '.join(DISTRIBUTED)} does",
            file=sys.stderr,
        )
        return 2
    try:
        return int(args.func(args) or 0)
    except QuantscaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
