"""`quantscale mamba ...`: Quamba-style static INT8 for Mamba / Mamba2 models.

  quantscale mamba fixture [--kind mamba|mamba2|bamba|all]  train (once) the cached fixtures
  quantscale mamba quantize MODEL OUT [--method quamba2 --groups 4x4 ...]
  quantscale mamba eval [--model MODEL] [--settings bf16,quamba1,quamba2|all] [--json F]

MODEL is a checkpoint directory (with its tokenizer) or `fixture:mamba` / `fixture:mamba2`;
`fixture:bamba` is a hybrid: `quantscale quantize` / `eval` take it (docs/hybrid.md).
`eval` quantizes the model once per named setting (see
`quantscale.mamba.evaluate.mamba_sweep_settings`) and prints held-out Wikipedia perplexity and
cloze accuracy next to the unquantized (bf16) baseline, the SQNR of the final hidden states
against the float32 model, and the SQNR of the SSM input x's INT8 round trip, both on 8
held-out windows of 512 tokens (`--json` keeps the SQNR of every point).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from quantscale.commands.options import add_calibration_options, add_overwrite_option

if TYPE_CHECKING:
    from quantscale.mamba.mixers import MambaRecipe


def _parse_groups(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"groups {text!r}: expected HEADSxCHANNELS, e.g. 4x4")
    return int(parts[0]), int(parts[1])


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"layers {text!r}: expected e.g. 0,-1") from err


def _recipe(args: argparse.Namespace) -> MambaRecipe:
    """The MambaRecipe of `quantscale mamba quantize`'s options (they override --recipe)."""
    from quantscale.mamba.mixers import MambaRecipe, read_recipe

    base = read_recipe(args.recipe) if args.recipe else MambaRecipe(method=args.method)
    heads, channels = args.groups or (None, None)
    return base.with_options(
        n_samples=args.calib_samples,
        seq_len=args.calib_seq_len,
        batch_size=args.calib_batch_size,
        head_groups=heads,
        channel_groups=channels,
        percentile_alpha=args.alpha,
        ema_sigma=args.sigma,
        float_layers=args.float_layers,
    )


def run_fixture(args: argparse.Namespace) -> int:
    from quantscale.mamba.fixtures import FIXTURES, fixture_checkpoint, training_log

    kinds = list(FIXTURES) if args.kind == "all" else [args.kind]
    for kind in kinds:
        path = fixture_checkpoint(kind)
        log = training_log(kind)
        print(
            f"{kind}: {path} ({log['n_params']:,} params, {log['train_tokens']:,} tokens, "
            f"{log['seconds']:.0f} s on {log['threads']} threads, "
            f"loss {log['losses'][0]:.2f} -> {sum(log['losses'][-10:]) / 10:.2f})"
        )
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from quantscale.mamba.quantize import quantize_and_save

    recipe = _recipe(args)
    start = time.perf_counter()
    out = quantize_and_save(args.model, args.out, recipe, args.calib_data, args.overwrite)
    print(f"wrote {out} ({recipe.method}, in {time.perf_counter() - start:.0f} s)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from quantscale.mamba.evaluate import evaluate_settings, mamba_sweep_settings, print_rows

    names = list(mamba_sweep_settings()) if args.settings == "all" else args.settings.split(",")
    rows = evaluate_settings(
        args.model,
        names,
        args.calib_samples,
        args.calib_seq_len,
        args.n_tokens,
        args.n_items,
        args.calib_data,
        args.calib_batch_size,
    )
    print_rows(args.model, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    """The shared calibration flags with the Quamba defaults (512 x 512, batches of 8)."""
    add_calibration_options(parser, samples=512, seq_len=512, batch_size=8)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("mamba", help="Quamba-style static INT8 for Mamba / Mamba2")
    sub = p.add_subparsers(dest="mamba_command", metavar="ACTION", required=True)

    f = sub.add_parser("fixture", help="train (once) and describe the cached fixture models")
    f.add_argument("--kind", choices=["mamba", "mamba2", "bamba", "all"], default="all")
    f.set_defaults(func=run_fixture)

    q = sub.add_parser("quantize", help="calibrate, quantize and save a Mamba model")
    q.add_argument("model", help="checkpoint directory or fixture:mamba / fixture:mamba2")
    q.add_argument("out", help="output directory")
    q.add_argument("--method", choices=["quamba1", "quamba2"], default="quamba1")
    q.add_argument("--groups", type=_parse_groups, help="Quamba2 head x channel groups (4x4)")
    q.add_argument("--alpha", type=float, help="percentile of |x| for the SSM input")
    q.add_argument("--sigma", type=float, help="EMA weight of each batch's percentile")
    q.add_argument("--float-layers", type=_parse_layers, help="layers kept in float, e.g. 0,-1")
    q.add_argument("--recipe", help="YAML/JSON MambaRecipe (command-line options override it)")
    add_overwrite_option(q)
    _add_calibration(q)
    q.set_defaults(calib_batch_size=None)  # unset: the recipe's batch size (8 by default)
    q.set_defaults(func=run_quantize)

    e = sub.add_parser("eval", help="perplexity / cloze of named settings vs the baseline")
    e.add_argument("--model", default="fixture:mamba", help="model (default fixture:mamba)")
    e.add_argument("--settings", default="bf16,quamba1,quamba2", help="comma list or 'all'")
    e.add_argument("--n-tokens", type=int, default=32768, help="held-out tokens for perplexity")
    e.add_argument("--n-items", type=int, default=200, help="cloze items")
    e.add_argument("--json", help="also write the rows to this JSON file")
    _add_calibration(e)
    e.set_defaults(func=run_eval)
