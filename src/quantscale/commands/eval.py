"""`quantscale eval`: perplexity, cloze and zero-shot accuracy of a model vs a baseline.

With `--prompt TEXT` it generates instead: the greedy continuation of TEXT
(`--max-new-tokens`, 64 by default, with the generation cache) from the model as `eval` reads
it (a saved Quamba checkpoint runs its INT8 mixers), and from --baseline when given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantscale.checkpoint.gguf import find_gguf, load_gguf_model
from quantscale.commands.options import add_dtype_option, torch_dtype
from quantscale.errors import QuantscaleError
from quantscale.eval.generate import generate_text
from quantscale.eval.runner import TASKS, evaluate
from quantscale.models.loader import NAMED_MODELS, load_tokenizer
from quantscale.orchestrator import READERS, load_evaluated, resolve_model

# Metrics where lower is better; the others are accuracies.
LOWER_IS_BETTER = {"ppl"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` sub-command."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint (perplexity, cloze, zero-shot), optionally vs a baseline",
        description=__doc__,
    )
    parser.add_argument(
        "model",
        help="checkpoint dir loadable by transformers, a GGUF file (or a dir holding one), "
        f"one of {list(NAMED_MODELS)} or a trained fixture (fixture:mamba2, fixture:bamba)",
    )
    parser.add_argument("--baseline", help="checkpoint dir or name to compare against")
    parser.add_argument(
        "--tasks", default="ppl,cloze", help=f"comma-separated subset of {','.join(TASKS)}"
    )
    parser.add_argument("--n-tokens", type=int, default=4096, help="held-out tokens for ppl")
    parser.add_argument("--n-items", type=int, default=200, help="items for cloze / zero-shot")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window length")
    parser.add_argument(
        "--reader",
        choices=READERS,
        default="quantscale",
        help="how quantized checkpoints are read: our reader (the file's codes and activation "
        "scales, any layout we write) or transformers' loader (what it runs on this machine)",
    )
    parser.add_argument(
        "--prompt", help="generate the greedy continuation of TEXT instead of evaluating"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens --prompt generates (default 64)"
    )
    add_dtype_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise QuantscaleError(f"--tasks {text!r}: choose from {', '.join(TASKS)}")
    return tasks


def _load(path, tokenizer_fallback, args):
    """(model, tokenizer) of a checkpoint dir or a GGUF file (our reader or transformers',
    the tokenizer beside it)."""
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        tokenizer = _gguf_tokenizer(gguf_file, tokenizer_fallback)
        return load_gguf_model(gguf_file, torch_dtype(args.dtype), args.reader), tokenizer
    tokenizer = load_tokenizer(path, tokenizer_fallback)
    return load_evaluated(path, torch_dtype(args.dtype), args.reader), tokenizer


def _evaluate_path(path, tokenizer_fallback, args, tasks) -> dict[str, float]:
    model, tokenizer = _load(path, tokenizer_fallback, args)
    return evaluate(model, tokenizer, tasks, args.n_tokens, args.n_items, args.seq_len)


def _gguf_tokenizer(file: Path, fallback):
    """The tokenizer saved beside a GGUF file (our writer copies it), else the file's own."""
    try:
        return load_tokenizer(file.parent, fallback)
    except QuantscaleError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)


def _generate_path(path, tokenizer_fallback, args) -> str:
    model, tokenizer = _load(path, tokenizer_fallback, args)
    return generate_text(model, tokenizer, args.prompt, args.max_new_tokens)


def _run_prompt(args: argparse.Namespace, model_path: Path, baseline_path: Path | None) -> int:
    """Print the continuation of --prompt (the baseline's first, each labelled, if given)."""
    report = {"model": str(model_path), "prompt": args.prompt}
    if baseline_path is not None:
        report["baseline"] = str(baseline_path)
        report["baseline_continuation"] = _generate_path(baseline_path, None, args)
    report["continuation"] = _generate_path(model_path, baseline_path, args)
    if args.json:
        print(json.dumps(report, indent=2))
    elif baseline_path is None:
        print(report["continuation"])
    else:
        print(f"baseline: {report['baseline_continuation']}\nmodel:    {report['continuation']}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Evaluate MODEL (and --baseline) and print the metrics with deltas (or, with
    --prompt, the continuations)."""
    baseline_path = resolve_model(args.baseline) if args.baseline else None
    model_path = find_gguf(args.model) or resolve_model(args.model)
    if args.prompt is not None:
        return _run_prompt(args, model_path, baseline_path)
    tasks = _parse_tasks(args.tasks)
    report = {"model": str(model_path), "results": {}}
    if baseline_path is not None:
        report["baseline"] = str(baseline_path)
        report["baseline_results"] = _evaluate_path(baseline_path, None, args, tasks)
    report["results"] = _evaluate_path(model_path, baseline_path, args, tasks)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        Console().print(_table(report))
    return 0


def _table(report: dict) -> Table:
    """Metrics as rows; baseline, model and delta as columns."""
    base = report.get("baseline_results")
    table = Table(title=f"quantscale eval: {Path(report['model']).name}")
    table.add_column("metric")
    if base is not None:
        table.add_column("baseline", justify="right")
    table.add_column("model", justify="right")
    if base is not None:
        table.add_column("delta", justify="right")
    for name, value in report["results"].items():
        row = [name]
        if base is not None:
            row.append(_fmt(name, base[name]))
        row.append(_fmt(name, value))
        if base is not None:
            row.append(_delta(name, value - base[name]))
        table.add_row(*row)
    return table


def _fmt(name: str, value: float) -> str:
    return f"{value:.3f}" if name in LOWER_IS_BETTER else f"{100 * value:.1f}%"


def _delta(name: str, diff: float) -> str:
    worse = diff > 0 if name in LOWER_IS_BETTER else diff < 0
    text = f"{diff:+.3f}" if name in LOWER_IS_BETTER else f"{100 * diff:+.1f} pt"
    return f"[red]{text}[/red]" if worse and diff else f"[green]{text}[/green]"
