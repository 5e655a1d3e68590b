"""The main job on the embedded default: SmolLM2-135M -> FP8 block-128 -> report -> bf16 -> ppl."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantscale import cache
from quantscale.checkpoint.dequantize import dequantize_checkpoint
from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
from quantscale.checkpoint.inspect import precision_report
from quantscale.checkpoint.inspect import render as render_report
from quantscale.checkpoint.validate import render as render_validation
from quantscale.checkpoint.validate import validate_checkpoint
from quantscale.data import assets
from quantscale.data.calibration import eval_tokens
from quantscale.eval.perplexity import perplexity
from quantscale.models.loader import load_pretrained, load_tokenizer


def _ppl(path: Path, tokens: torch.Tensor) -> float:
    return perplexity(load_pretrained(path), tokens)


def run_demo(
    work: Path | None = None, n_tokens: int = 4096, console: Console | None = None
) -> dict:
    """Run the demo; returns the measured perplexities and timings."""
    console = console or Console()
    work = work or cache.cache_dir() / "demo"
    start = time.perf_counter()
    bf16 = assets.smollm2_checkpoint()
    console.rule(f"[bold]SmolLM2-135M-Instruct (bf16): {bf16}")
    fp8_dir, deq_dir = work / "smollm2-fp8-block128", work / "smollm2-fp8-dequantized"
    t0 = time.perf_counter()
    quantize_checkpoint_fp8(bf16, fp8_dir, overwrite=True)
    t_quant = time.perf_counter() - t0
    console.print(f"FP8 block-128 checkpoint written to {fp8_dir} in {t_quant:.2f} s")
    render_report(precision_report(fp8_dir), console)
    render_validation(validate_checkpoint(fp8_dir, runtime=None), console)
    dequantize_checkpoint(fp8_dir, deq_dir, overwrite=True)
    console.print(f"dequantized back to bf16 in {deq_dir}")
    tokens = eval_tokens(load_tokenizer(bf16), n_tokens)
    results = {"bf16": _ppl(bf16, tokens), "fp8_block128": _ppl(deq_dir, tokens)}
    table = Table(title=f"Perplexity on {tokens.numel()} held-out Wikipedia tokens")
    for col in ("model", "perplexity", "delta"):
        table.add_column(col)
    table.add_row("bf16", f"{results['bf16']:.3f}", "")
    delta = results["fp8_block128"] - results["bf16"]
    pct = 100 * delta / results["bf16"]
    table.add_row("FP8 block-128", f"{results['fp8_block128']:.3f}", f"{delta:+.3f} ({pct:+.2f}%)")
    console.print(table)
    results["quantize_s"] = t_quant
    results["total_s"] = time.perf_counter() - start
    console.print(f"demo finished in {results['total_s']:.1f} s")
    return results
