"""`quantscale inspect CKPT`: the precision report of a checkpoint (headers only)."""

from __future__ import annotations

import argparse
import json

from quantscale.checkpoint.inspect import precision_report, render, write_report
from quantscale.commands.options import add_overwrite_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="precision report: dtypes, shapes, scales and block sizes per module kind",
        description="Print per module kind the dtype, shapes, scale dtype/shape and block size, "
        "the tensor counts, bytes by dtype and the saving against bf16. Reads shard headers "
        "only, so it is instant on large checkpoints.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (safetensors + config.json)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="also write the report as plain text to FILE (e.g. model_precision_report.txt), "
        "atomically; an existing FILE is refused unless --overwrite",
    )
    add_overwrite_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = precision_report(args.checkpoint)
    if args.out is not None:
        write_report(report, args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    return 0
