"""`quantscale calibrate MODEL OUT --scheme W8A8 --observer percentile`: calibrate static
activation scales and quantize the weights layer by layer, then save the fake-quantized model
with its scales (reload it with `quantscale.orchestrator.load_model`)."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from quantscale.commands.options import (
    add_calibration_options,
    add_overwrite_option,
    add_rotate_option,
    calibration_tokens,
    torch_dtype,
)
from quantscale.errors import QuantscaleError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `calibrate` sub-command."""
    p = subparsers.add_parser(
        "calibrate",
        help="calibrate and quantize a model, save it fake-quantized",
        description=__doc__,
    )
    p.add_argument("model", help="checkpoint dir or a named model (smollm2, gemma3)")
    p.add_argument("out", type=Path, help="output dir")
    p.add_argument("--scheme", default="W8A8", help="preset or recipe file (YAML/JSON)")
    p.add_argument("--observer", help="activation observer (minmax, percentile, mse, aciq, kl...)")
    p.add_argument("--alpha", type=float, help="percentile alpha")
    p.add_argument("--sigma", type=float, help="EMA sigma of per-batch statistics")
    p.add_argument("--method", default="rtn", help="weight algorithm (rtn, gptq)")
    p.add_argument(
        "--smooth",
        metavar="ALPHA",
        help="SmoothQuant before calibrating each layer: an alpha (0.5) or per mapping "
        "(down=0.8+qkv=0.5; mappings qkv, gate_up, down, vo); an alpha 'search' picks, per "
        "layer and mapping, the alpha in 0.3..0.95 of least W8A8 output error "
        "(qkv=search+gate_up=search+down=search)",
    )
    p.add_argument(
        "--smooth-objective",
        choices=("mse", "relative"),
        default="mse",
        help="what a searched alpha minimises: the mean squared output error, or each token's "
        "squared error over its squared output norm (rare huge tokens weigh no more)",
    )
    add_calibration_options(p, calib_dtype=True)
    add_rotate_option(p)
    add_overwrite_option(p)
    p.set_defaults(func=run)


def build_recipe(args: argparse.Namespace):
    """The --scheme recipe with --observer / --alpha / --sigma applied to input activations."""
    from quantscale.analysis.sweep import with_activations
    from quantscale.scheme import load_recipe

    recipe = load_recipe(args.scheme)
    if getattr(args, "rotate", None):  # absent from namespaces built before --rotate
        recipe.rotate = args.rotate
    kwargs = {k: v for k, v in (("alpha", args.alpha), ("sigma", args.sigma)) if v is not None}
    updates = {"observer": args.observer} if args.observer else {}
    if kwargs:
        updates["observer_kwargs"] = kwargs
    return with_activations(recipe, **updates) if updates else recipe


def run(args: argparse.Namespace) -> int:
    from quantscale.algorithms.smoothing import SmoothQuant
    from quantscale.export.fake_quant import save_quantized
    from quantscale.orchestrator import load_model, quantize_model
    from quantscale.runtime.qlinear import compute_dtype, matmul_kernel

    if args.out.exists() and not args.overwrite:
        from quantscale.errors import OutputExistsError

        raise OutputExistsError(f"{args.out} exists; pass --overwrite to replace it")
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise QuantscaleError(f"{args.model}: no tokenizer saved with the model")
    recipe = build_recipe(args)
    transforms = [SmoothQuant(args.smooth, objective=args.smooth_objective)] if args.smooth else []
    start = time.perf_counter()
    calib = calibration_tokens(tokenizer, args)
    with compute_dtype(torch_dtype(args.calib_dtype)), matmul_kernel(args.calib_kernel):
        quantize_model(model, recipe, calib, args.method, args.calib_batch_size, transforms)
    seconds = time.perf_counter() - start
    out = save_quantized(model, args.out, tokenizer, overwrite=args.overwrite)
    smooth = f", smooth {args.smooth}" if args.smooth else ""
    smooth += f", rotate {recipe.rotate}" if recipe.rotate else ""
    print(f"wrote {out} ({args.scheme}, {args.method}{smooth}, calibrated in {seconds:.0f} s)")
    if transforms and transforms[0].chosen:
        print(alphas_summary(transforms[0].chosen))
    return 0


def alphas_summary(chosen: dict[str, dict[str, float]]) -> str:
    """One line per mapping: the alphas applied over the layers (searched or fixed), how often."""
    per_mapping: dict[str, list[float]] = {}
    for alphas in chosen.values():
        for name, alpha in alphas.items():
            per_mapping.setdefault(name, []).append(alpha)
    lines = ["smoothing alphas applied (alpha x layers):"]
    for name, values in per_mapping.items():
        counts = sorted(Counter(values).items())
        lines.append(f"  {name}: " + ", ".join(f"{a:g} x{n}" for a, n in counts))
    return "\n".join(lines)
