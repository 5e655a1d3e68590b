"""`quantscale sensitivity MODEL --scheme W8A8`: per-layer SQNR and output MSE when only that
layer is quantized; `--mixed-precision BUDGET` keeps the most sensitive layers at higher
precision, reports the choice and writes the resulting recipe."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from quantscale.commands.options import add_calibration_options, calibration_tokens
from quantscale.errors import QuantscaleError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `sensitivity` sub-command."""
    p = subparsers.add_parser(
        "sensitivity", help="per-layer quantization error and mixed precision", description=__doc__
    )
    p.add_argument("model", help="checkpoint dir or a named model (smollm2, gemma3)")
    p.add_argument("--scheme", default="W8A8", help="preset or recipe file (YAML/JSON)")
    p.add_argument("--observer", help="activation observer (default: the scheme's)")
    p.add_argument(
        "--smooth",
        metavar="ALPHA",
        help="smooth the float model first (SmoothQuant alpha, or down=0.8+qkv=0.5; "
        "'search' for a per-layer searched alpha)",
    )
    add_calibration_options(p)
    p.add_argument("--probe-tokens", type=int, default=1024, help="held-out tokens for the probe")
    p.add_argument(
        "--mixed-precision",
        type=float,
        metavar="BUDGET",
        help="keep the most sensitive layers at --high-precision: a fraction (<1) of the "
        "quantized parameters, or a number of layers (>=1)",
    )
    p.add_argument(
        "--high-precision",
        default="none",
        help="scheme for the kept layers: a preset (e.g. W8A16) or 'none' (unquantized)",
    )
    p.add_argument("--recipe-out", type=Path, help="write the mixed-precision recipe (JSON)")
    p.add_argument(
        "--eval", action="store_true", help="perplexity of baseline, full and mixed recipes"
    )
    p.add_argument("--n-tokens", type=int, default=4096, help="held-out tokens for --eval")
    p.add_argument("--top", type=int, default=0, help="print only the N most sensitive layers")
    p.add_argument("--json", type=Path, help="write all results as JSON")
    p.set_defaults(func=run, tasks=["ppl"])


def run(args: argparse.Namespace) -> int:
    from quantscale.analysis.sensitivity import layer_sensitivity, probe_windows
    from quantscale.analysis.sweep import Setting, calibrate_shared
    from quantscale.calibration.sequential import as_batches

    model, tokenizer = _load(args.model)
    recipe = _recipe(args)
    calib = as_batches(calibration_tokens(tokenizer, args), args.calib_batch_size)
    if args.smooth:
        from quantscale.algorithms.smoothing import smooth_model

        smooth_model(model, args.smooth, calib)
    full = Setting(args.scheme, recipe)
    qparams = calibrate_shared(model, [full], calib)[full.name]
    probe = probe_windows(tokenizer, args.probe_tokens)
    results = layer_sensitivity(model, recipe, calib, probe, qparams)
    report: dict[str, Any] = {"scheme": args.scheme, "layers": [asdict(r) for r in results]}
    mixed, high, chosen = _mixed_precision(args, results, recipe, report)
    _print(results, {r.name for r in chosen}, args.top)
    if chosen:
        kept = report["mixed_precision"]
        print(
            f"mixed precision: {len(chosen)} layer(s) at {args.high_precision}, "
            f"{100 * kept['kept_params_fraction']:.1f}% of quantized parameters: "
            + ", ".join(kept["kept"])
        )
    if args.eval:
        report["eval"] = _evaluate(args, model, tokenizer, calib, full, qparams, mixed, high)
        print(report["eval"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def _load(spec: str) -> tuple[Any, Any]:
    from quantscale.orchestrator import load_model

    model, tokenizer = load_model(spec)
    if tokenizer is None:
        raise QuantscaleError(f"{spec}: no tokenizer saved with the model")
    return model, tokenizer


def _recipe(args: argparse.Namespace) -> Any:
    from quantscale.analysis.sweep import with_activations
    from quantscale.scheme import load_recipe

    recipe = load_recipe(args.scheme)
    return with_activations(recipe, observer=args.observer) if args.observer else recipe


def _mixed_precision(
    args: argparse.Namespace, results: list, recipe: Any, report: dict[str, Any]
) -> tuple[Any, Any, list]:
    """(mixed Setting or None, the kept layers' scheme, kept layers) of --mixed-precision;
    records the choice in `report` and writes --recipe-out."""
    from quantscale.analysis.sensitivity import mixed_precision
    from quantscale.analysis.sweep import Setting
    from quantscale.scheme import preset_scheme

    if args.mixed_precision is None:
        return None, None, []
    high = None if args.high_precision.lower() == "none" else preset_scheme(args.high_precision)
    mixed, chosen = mixed_precision(results, recipe, args.mixed_precision, high)
    report["mixed_precision"] = {
        "budget": args.mixed_precision,
        "high_precision": args.high_precision,
        "kept": [r.name for r in chosen],
        "kept_params_fraction": sum(r.params for r in chosen) / sum(r.params for r in results),
    }
    if args.recipe_out:
        args.recipe_out.write_text(json.dumps(mixed.model_dump(mode="json"), indent=1))
        print(f"wrote {args.recipe_out} (use it with --scheme)")
    if not chosen:
        return None, high, chosen
    return Setting(f"{args.scheme} mixed ({len(chosen)} kept)", mixed), high, chosen


def _evaluate(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    calib: list,
    full: Any,
    qparams: dict,
    mixed: Any,
    high: Any,
) -> str:
    """Markdown table of --tasks for the baseline, full and mixed recipes."""
    from quantscale.analysis.sensitivity import evaluation_settings
    from quantscale.analysis.sweep import markdown_table, measurer, run_sweep

    settings, shared = evaluation_settings(full, qparams, mixed, high)
    measure = measurer(tokenizer, args.tasks, args.n_tokens)
    return markdown_table(run_sweep(model, settings, calib, measure, shared=shared))


def _print(results, kept: set[str], top: int) -> None:
    ranked = sorted(results, key=lambda r: r.output_mse, reverse=True)
    rank = {r.name: i + 1 for i, r in enumerate(ranked)}
    shown = ranked[:top] if top else results
    table = Table(title="sensitivity (only this layer quantized)")
    for col in ("layer", "SQNR dB", "output MSE", "output SQNR dB", "rank", "kept"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in shown:
        table.add_row(
            r.name,
            f"{r.sqnr_db:.1f}",
            f"{r.output_mse:.3e}",
            f"{r.output_sqnr_db:.1f}",
            str(rank[r.name]),
            "yes" if r.name in kept else "",
        )
    Console().print(table)
