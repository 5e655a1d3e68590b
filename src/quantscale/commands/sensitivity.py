"""`quantscale sensitivity MODEL --scheme W8A8`: per-layer SQNR and output MSE when only that
layer is quantized; `--mixed-precision BUDGET` keeps the most sensitive layers at higher
precision, reports the choice and writes the resulting recipe."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

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


def _probe(tokenizer, n_tokens: int, seq_len: int = 512):
    """Held-out tokens as [n, seq_len] windows, from the end of the evaluation split."""
    from quantscale.data.calibration import eval_tokens

    stream = eval_tokens(tokenizer)
    n = max(1, n_tokens // seq_len)
    if stream.numel() < n * seq_len:
        raise QuantscaleError(f"held-out text has {stream.numel()} tokens, fewer than {n_tokens}")
    return stream[-n * seq_len :].reshape(n, seq_len)


def run(args: argparse.Namespace) -> int:
    from quantscale.analysis.sensitivity import layer_sensitivity, mixed_precision
    from quantscale.analysis.sweep import (
        BASELINE,
        Setting,
        calibrate_shared,
        markdown_table,
        measurer,
        run_sweep,
        with_activations,
    )
    from quantscale.calibration.activations import is_static
    from quantscale.calibration.sequential import as_batches
    from quantscale.quantize import load_model
    from quantscale.scheme import load_recipe, preset_scheme

    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise QuantscaleError(f"{args.model}: no tokenizer saved with the model")
    recipe = load_recipe(args.scheme)
    if args.observer:
        recipe = with_activations(recipe, observer=args.observer)
    calib = as_batches(calibration_tokens(tokenizer, args), args.calib_batch_size)
    if args.smooth:
        from quantscale.algorithms.smoothing import smooth_model

        smooth_model(model, args.smooth, calib)
    full = Setting(args.scheme, recipe)
    qparams = calibrate_shared(model, [full], calib)[full.name]
    probe = _probe(tokenizer, args.probe_tokens)
    results = layer_sensitivity(model, recipe, calib, probe, qparams)
    report = {"scheme": args.scheme, "layers": [asdict(r) for r in results]}
    chosen, high = [], None
    if args.mixed_precision is not None:
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
    _print(results, {r.name for r in chosen}, args.top)
    if chosen:
        kept = report["mixed_precision"]
        print(
            f"mixed precision: {len(chosen)} layer(s) at {args.high_precision}, "
            f"{100 * kept['kept_params_fraction']:.1f}% of quantized parameters: "
            + ", ".join(kept["kept"])
        )
    if args.eval:
        settings = [Setting(BASELINE, None), full]
        shared = {full.name: qparams}
        if chosen:
            settings.append(Setting(f"{args.scheme} mixed ({len(chosen)} kept)", mixed))
            shared[settings[-1].name] = qparams  # kept layers need no scales of their own
            if high is not None and (
                is_static(high.input_activations) or is_static(high.output_activations)
            ):
                shared = None  # the kept layers' scheme has activations: calibrate all
        rows = run_sweep(
            model, settings, calib, measurer(tokenizer, args.tasks, args.n_tokens), shared=shared
        )
        table = markdown_table(rows)
        report["eval"] = table
        print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


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
