"""`quantscale validate CKPT`: check config.json against the tensors; exit 1 on errors."""

from __future__ import annotations

import argparse
import json

from quantscale.checkpoint.validate import render, validate_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check an FP8 block checkpoint's config against its tensors",
        description="Report, with plain-words explanations, config/tensor mismatches of an FP8 "
        "block-wise checkpoint: modules_to_not_convert entries that match FP8 modules, FP8 "
        "weights without scales, scales of the wrong shape or inverted, unquantized weights "
        "in converted modules, bad quantization_config fields and tensors a runtime refuses. "
        "Exit code 1 when there are errors.",
    )
    parser.add_argument(
        "checkpoint", help="checkpoint directory (safetensors + config.json) or a GGUF file"
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument(
        "--runtime",
        default=None,
        help="treat tensors this runtime refuses as errors: transformers, vllm (rules of "
        "every vLLM build), vllm-cpu (those plus the CPU build's: no FP8 block without AMX, "
        "no FP4, FP8 through torch._scaled_mm, static int8 activations) or llama.cpp (GGUF "
        "files, and what its convert_hf_to_gguf.py refuses in a safetensors checkpoint); "
        "without it, all but the vllm-cpu and converter rules warn",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=12,
        help="weights whose tiles are read to check for inverted scales (default 12)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = validate_checkpoint(args.checkpoint, runtime=args.runtime, sample=args.sample)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    return 0 if report.ok else 1
