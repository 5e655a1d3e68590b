"""`quantscale sweep MODEL --scheme W8A8 --observer percentile --alpha 0.999,0.9995,0.9999,1.0`:
measure a model under a range of calibration settings; prints a table and writes a PNG plot,
a markdown table and JSON."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantscale.commands.options import add_calibration_options, calibration_tokens
from quantscale.errors import QuantscaleError


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `sweep` sub-command."""
    p = subparsers.add_parser(
        "sweep", help="perplexity per calibration setting", description=__doc__
    )
    p.add_argument("model", help="checkpoint dir or a named model (smollm2, gemma3)")
    p.add_argument("--scheme", default="W8A8", help="preset or recipe file (YAML/JSON)")
    p.add_argument("--observer", help="activation observer for every setting (e.g. percentile)")
    p.add_argument("--alpha", type=_floats, default=[], help="percentile alphas, comma-separated")
    p.add_argument("--sigma", type=_floats, default=[], help="EMA sigmas, comma-separated")
    p.add_argument(
        "--sigma-warmup",
        type=int,
        metavar="N",
        help="add a setting whose EMA momentum ramps up over the first N calibration batches",
    )
    p.add_argument(
        "--observers",
        type=_names,
        default=[],
        help="observer kinds: minmax,percentile,mse,aciq,kl,max_entropy,percentile_mse",
    )
    p.add_argument("--per-channel", action="store_true", help="add per-channel activations")
    p.add_argument("--first-last", action="store_true", help="add first/last layer kept float")
    p.add_argument(
        "--smooth",
        type=_names,
        default=[],
        help="SmoothQuant settings, comma-separated: an alpha for every mapping (0.5) or "
        "per mapping joined by '+' (down=0.8+qkv=0.5; mappings qkv, gate_up, down, vo); "
        "an alpha 'search' is chosen per layer and mapping (needs --mode layerwise); "
        "each one with every --observers kind",
    )
    p.add_argument(
        "--mode",
        choices=("shared", "layerwise"),
        default="shared",
        help="shared: one float calibration pass for all settings; layerwise: full pipeline each",
    )
    add_calibration_options(p)
    p.add_argument("--n-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    p.add_argument("--tasks", type=_names, default=["ppl"], help="ppl,cloze,zeroshot")
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where PNG/markdown/JSON go")
    p.add_argument("--no-baseline", action="store_true", help="skip the unquantized row")
    p.add_argument(
        "--mamba-settings",
        help="Mamba / Mamba2 models (fixture:mamba, fixture:mamba2 or a checkpoint): comma list "
        "of `quantscale mamba eval` settings, or 'all' (alpha, sigma, warm-up, observers, "
        "per-channel, per-layer alpha, sensitivity scan, groups, layers, W4; the default "
        "without the observer flags, which on Mamba set the SSM input ssm.x of Quamba1 "
        "settings)",
    )
    p.set_defaults(func=run)


_LLM_ONLY = (("smooth", "--smooth"),)
MAMBA_TASKS = ("ppl", "cloze")  # what `mamba.evaluate.measure` measures


def _mamba_names(args: argparse.Namespace, flagged: bool) -> list[str]:
    """The named Mamba settings: --mamba-settings ('all' by default), or only the bf16
    baseline when the observer flags give the settings; bf16 dropped by --no-baseline."""
    from quantscale.mamba.evaluate import mamba_sweep_settings

    spec = args.mamba_settings or ("bf16" if flagged else "all")
    names = list(mamba_sweep_settings()) if spec == "all" else spec.split(",")
    return [n for n in names if not (args.no_baseline and n == "bf16")]


def run_mamba(args: argparse.Namespace) -> int:
    """The scale-strategy sweep of a Mamba model: Quamba settings through `quantscale mamba`,
    plus one per --alpha / --sigma / --observers value (`mamba.evaluate.flag_settings`)."""
    from quantscale.analysis.sweep import mamba_rows, write_outputs
    from quantscale.mamba.evaluate import evaluate_settings, flag_settings, print_rows

    _refuse_llm_flags(args)
    extra = flag_settings(
        args.observer,
        args.alpha,
        args.sigma,
        args.observers,
        args.sigma_warmup,
        args.per_channel,
        args.first_last,
    )
    rows = evaluate_settings(
        args.model,
        _mamba_names(args, bool(extra)),
        args.calib_samples,
        args.calib_seq_len,
        args.n_tokens,
        200,
        args.calib_data,
        args.calib_batch_size,
        extra=extra,
    )
    print_rows(args.model, rows)
    if not rows:
        return 0
    stem = "sweep_" + re.sub(r"\W+", "_", Path(str(args.model).removeprefix("fixture:")).name)
    title = f"{args.model} W8A8 settings, {args.calib_samples}x{args.calib_seq_len}"
    paths = write_outputs(mamba_rows(rows), args.out_dir, stem, title, _meta(args))
    print(f"wrote {', '.join(p.name for p in paths)} in {args.out_dir}")
    return 0


def _refuse_llm_flags(args: argparse.Namespace) -> None:
    """The sweep options that have no meaning on a Mamba model, refused by name."""
    for attr, flag in _LLM_ONLY:
        if getattr(args, attr):
            raise QuantscaleError(f"{flag} applies to transformer models, not Mamba ({args.model})")
    if args.mode != "shared":
        raise QuantscaleError(f"--mode {args.mode} applies to transformer models, not Mamba")
    if args.scheme != "W8A8":
        raise QuantscaleError(
            f"--scheme {args.scheme}: the Mamba sweep's flags build Quamba W8A8 settings; name "
            "W4 settings with --mamba-settings (quamba2-W4A8-gptq, ...)"
        )
    other = [t for t in args.tasks if t not in MAMBA_TASKS]
    if other:
        raise QuantscaleError(f"--tasks {','.join(other)}: a Mamba sweep measures ppl and cloze")


def _meta(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}


def run(args: argparse.Namespace) -> int:
    from quantscale.orchestrator import is_mamba, load_model

    if is_mamba(args.model):
        return run_mamba(args)
    from quantscale.analysis.sweep import build_settings, measurer, run_sweep, write_outputs
    from quantscale.scheme import normalize_preset_name

    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise QuantscaleError(f"{args.model}: no tokenizer saved with the model")
    settings = build_settings(
        model,
        args.scheme,
        args.observer,
        args.alpha,
        args.sigma,
        args.observers,
        args.per_channel,
        args.first_last,
        baseline=not args.no_baseline,
        smooth=args.smooth,
        sigma_warmup=args.sigma_warmup,
    )
    calib = calibration_tokens(tokenizer, args)
    measure = measurer(tokenizer, args.tasks, args.n_tokens)
    rows = run_sweep(model, settings, calib, measure, args.mode, args.calib_batch_size)
    _print(rows)
    stem = "sweep_" + normalize_preset_name(Path(args.scheme).stem).lower()
    title = f"{Path(str(args.model)).name} {args.scheme}, {args.calib_samples}x{args.calib_seq_len}"
    paths = write_outputs(rows, args.out_dir, stem, title, _meta(args))
    print(f"wrote {', '.join(p.name for p in paths)} in {args.out_dir}")
    return 0


def _print(rows) -> None:
    from quantscale.analysis.sweep import format_metric

    metrics = list(rows[0].metrics)
    table = Table(title="sweep")
    table.add_column("setting")
    for m in metrics:
        table.add_column(m, justify="right")
        table.add_column("vs baseline", justify="right")
    table.add_column("s", justify="right")
    for r in rows:
        cells = [r.setting]
        for m in metrics:
            d = r.delta_pct.get(m)
            cells += [format_metric(m, r.metrics[m]), "" if d is None else f"{d:+.2f}%"]
        table.add_row(*cells, f"{r.seconds:.0f}")
    Console().print(table)
