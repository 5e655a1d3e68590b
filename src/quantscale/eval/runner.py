"""One entry point for every metric, for the CLI and for sweeps over in-memory models."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from quantscale.data.calibration import bos_token_id, eval_tokens
from quantscale.errors import QuantscaleError

TASKS = ("ppl", "cloze", "zeroshot")
DEFAULT_TASKS = ("ppl", "cloze")


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    n_tokens: int | None = 4096,
    n_items: int = 200,
    seq_len: int = 512,
    batch_size: int = 4,
) -> dict[str, float]:
    """Evaluate an in-memory causal LM on the held-out Wikipedia split (and zero-shot MC).

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
