"""`quantscale mamba ...`: Quamba-style static INT8 for Mamba / Mamba2 models.

  quantscale mamba fixture [--kind mamba|mamba2|all]     train (once) the cached fixtures
  quantscale mamba quantize MODEL OUT [--method quamba2 --groups 4x4 ...]
  quantscale mamba eval [--model MODEL] [--settings bf16,quamba1,quamba2|all] [--json F]

MODEL is a checkpoint directory (with its tokenizer) or `fixture:mamba` / `fixture:mamba2`.
`eval` quantizes the model once per named setting (see
`quantscale.mamba.quantize.mamba_sweep_settings`) and prints held-out Wikipedia perplexity and
cloze accuracy next to the unquantized (bf16) baseline, the SQNR of the final hidden states
against the float32 model, and the SQNR of the SSM input x's INT8 round trip, both on 8
held-out windows of 512 tokens (`--json` keeps the SQNR of every point).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantscale.errors import QuantscaleError

FIXTURE_PREFIX = "fixture:"


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


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a checkpoint directory or `fixture:<kind>`."""
    if spec.startswith(FIXTURE_PREFIX):
        from quantscale.mamba.fixtures import load_fixture

        model, tokenizer = load_fixture(spec[len(FIXTURE_PREFIX) :], dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec)
        if not (path / "config.json").is_file():
            raise QuantscaleError(f"{path}: not a checkpoint directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def _recipe(args: argparse.Namespace):
    from quantscale.mamba.mixers import MambaRecipe

    if args.recipe:
        import yaml

        path = Path(args.recipe)
        if not path.is_file():
            raise QuantscaleError(f"recipe file {path} does not exist")
        data = yaml.safe_load(path.read_text())
        recipe = MambaRecipe.model_validate(data)
    else:
        recipe = MambaRecipe(method=args.method)
    update = {"n_samples": args.n_samples, "seq_len": args.seq_len}
    if args.groups:
        update["head_groups"], update["channel_groups"] = args.groups
    if args.alpha is not None:
        update["percentile_alpha"] = args.alpha
    if args.sigma is not None:
        update["ema_sigma"] = args.sigma
    if args.float_layers is not None:
        update["float_layers"] = args.float_layers
    return MambaRecipe.model_validate({**recipe.model_dump(), **update})


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
    from quantscale.mamba.quantize import calibration_token_batches, quantize_mamba, save_quantized

    recipe = _recipe(args)
    model, tokenizer = load_model(args.model)
    batches = calibration_token_batches(tokenizer, recipe)
    start = time.perf_counter()
    quantize_mamba(model, batches, recipe)
    out = save_quantized(model, args.out, tokenizer, overwrite=args.overwrite)
    print(f"wrote {out} ({recipe.method}, calibrated in {time.perf_counter() - start:.0f} s)")
    return 0


def _reference_hidden(model_spec: str, windows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out token windows [8, 512], the float32 model's final hidden states on them)."""
    from quantscale.data.calibration import eval_tokens
    from quantscale.mamba.quantize import final_hidden_states

    model, tokenizer = load_model(model_spec)
    probe = eval_tokens(tokenizer, windows * 512).reshape(windows, 512)
    return probe, final_hidden_states(model, probe)


def evaluate_settings(
    model_spec: str, names: list[str], n_samples: int, seq_len: int, n_tokens: int, n_items: int
) -> list[dict]:
    """Measure each named setting on one model; returns one row per setting."""
    from quantscale.eval.error import sqnr_db
    from quantscale.mamba.quantize import (
        calibration_token_batches,
        final_hidden_states,
        mamba_sweep_settings,
        measure,
        point_sqnr,
        quantize_mamba,
    )

    settings = mamba_sweep_settings()
    unknown = [n for n in names if n not in settings]
    if unknown:
        raise QuantscaleError(f"unknown setting(s) {unknown}; known: {', '.join(settings)}")
    probe, reference = _reference_hidden(model_spec)
    rows = []
    for name in names:
        recipe = settings[name]
        start = time.perf_counter()
        if recipe is None:
            model, tokenizer = load_model(model_spec, torch.bfloat16)
        else:
            recipe = recipe.model_copy(update={"n_samples": n_samples, "seq_len": seq_len})
            model, tokenizer = load_model(model_spec)
            quantize_mamba(model, calibration_token_batches(tokenizer, recipe), recipe)
        row = {"setting": name, **measure(model, tokenizer, n_tokens, n_items)}
        row["hidden_sqnr_db"] = sqnr_db(reference, final_hidden_states(model, probe))
        row["point_sqnr_db"] = {} if recipe is None else point_sqnr(model, [probe])
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
    base = next((r["ppl"] for r in rows if r["setting"] == "bf16"), None)
    for row in rows:
        row["ppl_increase_pct"] = None if base is None else 100 * (row["ppl"] / base - 1)
    return rows


def _print_rows(model_spec: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model_spec}: held-out Wikipedia")
    columns = ("setting", "perplexity", "vs bf16", "cloze acc", "SQNR vs fp32", "x SQNR")
    for col in (*columns, "seconds"):
        table.add_column(col, justify="left" if col == "setting" else "right", no_wrap=True)
    for r in rows:
        delta = r["ppl_increase_pct"]
        table.add_row(
            r["setting"],
            f"{r['ppl']:.3f}",
            "" if delta is None else f"{delta:+.2f}%",
            f"{100 * r['cloze']:.1f}%",
            f"{r['hidden_sqnr_db']:.1f} dB",
            f"{r['point_sqnr_db']['ssm.x']:.1f} dB" if "ssm.x" in r["point_sqnr_db"] else "",
            f"{r['seconds']:.0f}",
        )
    Console(width=max(120, Console().width)).print(table)


def run_eval(args: argparse.Namespace) -> int:
    from quantscale.mamba.quantize import mamba_sweep_settings

    names = list(mamba_sweep_settings()) if args.settings == "all" else args.settings.split(",")
    rows = evaluate_settings(
        args.model, names, args.n_samples, args.seq_len, args.n_tokens, args.n_items
    )
    _print_rows(args.model, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-samples", type=int, default=512, help="calibration sequences (512)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length (512)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("mamba", help="Quamba-style static INT8 for Mamba / Mamba2")
    sub = p.add_subparsers(dest="mamba_command", metavar="ACTION", required=True)

    f = sub.add_parser("fixture", help="train (once) and describe the cached fixture models")
    f.add_argument("--kind", choices=["mamba", "mamba2", "all"], default="all")
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
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_calibration_args(q)
    q.set_defaults(func=run_quantize)

    e = sub.add_parser("eval", help="perplexity / cloze of named settings vs the baseline")
    e.add_argument("--model", default="fixture:mamba", help="model (default fixture:mamba)")
    e.add_argument("--settings", default="bf16,quamba1,quamba2", help="comma list or 'all'")
    e.add_argument("--n-tokens", type=int, default=32768, help="held-out tokens for perplexity")
    e.add_argument("--n-items", type=int, default=200, help="cloze items")
    e.add_argument("--json", help="also write the rows to this JSON file")
    _add_calibration_args(e)
    e.set_defaults(func=run_eval)
