"""One entry point for every metric, for the CLI and for sweeps over in-memory models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from quantscale.data import assets
from quantscale.data.calibration import bos_token_id, eval_tokens
from quantscale.errors import QuantscaleError

TASKS = ("ppl", "cloze", "zeroshot")
DEFAULT_TASKS = ("ppl", "cloze")
# Names the CLI accepts in place of a checkpoint dir.
NAMED_MODELS = {"smollm2": assets.smollm2_checkpoint, "gemma3": assets.gemma3_checkpoint}


def resolve_model_path(name_or_path: str) -> Path:
    """A checkpoint dir, or one of NAMED_MODELS built in the cache."""
    if name_or_path in NAMED_MODELS:
        return NAMED_MODELS[name_or_path]()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise QuantscaleError(
            f"{path} is not a checkpoint dir (no config.json); "
            f"give a dir or one of: {', '.join(NAMED_MODELS)}"
        )
    return path


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM from a checkpoint dir, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.eval()


def load_tokenizer(path: str | Path, fallback: str | Path | None = None):
    """The tokenizer saved with a checkpoint, else the one of `fallback` (e.g. the baseline)."""
    from transformers import AutoTokenizer

    for candidate in (path, fallback):
        if candidate is not None and (Path(candidate) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(candidate))
    raise QuantscaleError(f"{path} has no tokenizer_config.json and no baseline to borrow from")


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    n_tokens: int | None = 4096,
    n_items: int = 200,
    seq_len: int = 512,
    batch_size: int = 4,
) -> dict[str, float]:
    """Evaluate an in-memory causal LM on the held-out Wikipedia split (and BIG-bench).

    Returns {"ppl"} for perplexity over the first `n_tokens` held-out tokens, {"cloze"} for
    last-word accuracy on `n_items` items, and for "zeroshot" the keys "<task>" (acc) and
    "<task>_norm" (acc_norm) of each task in `quantscale.eval.zeroshot.TASKS`.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise QuantscaleError(f"unknown eval tasks {sorted(unknown)}; known: {', '.join(TASKS)}")
    model.eval()
    results: dict[str, float] = {}
    if "ppl" in tasks:
        from quantscale.eval.perplexity import perplexity

        tokens = eval_tokens(tokenizer, n_tokens)
        bos = bos_token_id(tokenizer)
        results["ppl"] = perplexity(model, tokens, seq_len, batch_size, bos_id=bos)
    if "cloze" in tasks:
        from quantscale.eval.cloze import cloze_accuracy

        results["cloze"] = cloze_accuracy(model, tokenizer, n_items, batch_size=2 * batch_size)
    if "zeroshot" in tasks:
        from quantscale.eval.zeroshot import zeroshot_accuracy

        for name, metrics in zeroshot_accuracy(model, tokenizer, n_items=n_items).items():
            results[name] = metrics["acc"]
            results[f"{name}_norm"] = metrics["acc_norm"]
    return results
