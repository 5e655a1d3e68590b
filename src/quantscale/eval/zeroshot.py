"""Zero-shot multiple choice (BIG-bench tasks) through lm-evaluation-harness, offline.

The `bigbench==1.0.0` sdist (358 MB) is fetched once by pip; the task.json files of the
tasks below are copied into `<cache>/bigbench/`, turned into JSONL files (examples shuffled
with `random.Random(0)`), and the YAML templates in `quantscale/eval/tasks/` are rendered
into `<cache>/zeroshot/tasks/`, a folder that also works with
`lm_eval --include_path <it> --tasks qs_step_inference --device cpu`.
lm-eval scores each option by its summed log-likelihood after the query (`acc`) and by
log-likelihood per byte (`acc_norm`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from torch import nn

from quantscale.cache import cache_dir, cache_lock
from quantscale.data import assets
from quantscale.errors import QuantscaleError

BIGBENCH = ("bigbench", "1.0.0")
# name -> (task.json path inside the sdist's bigbench/benchmark_tasks, query suffix)
TASKS = {
    "step_inference": ("goal_step_wikihow/step_inference/task.json", ""),
    "social_iqa": ("social_iqa/task.json", "\nAnswer:"),
}
SHUFFLE_SEED = 0


def _fetch_bigbench_tree(workdir: Path) -> Path:
    """Download and unpack the bigbench sdist under `workdir`; return its benchmark_tasks.

    `pip download` unpacks the sdist to read its metadata and then refuses it (it declares a
    direct-URL dependency), so the unpacked tree is kept with `--no-clean` and read directly.
    """
    env = {**os.environ, "TMPDIR": str(workdir)}
    spec = f"{BIGBENCH[0]}=={BIGBENCH[1]}"
    result = assets.pip_download(spec, workdir / "dl", ("--no-clean",), env)
    found = sorted(workdir.glob("**/bigbench/benchmark_tasks"))
    if not found:
        raise QuantscaleError(
            f"could not fetch {BIGBENCH[0]}=={BIGBENCH[1]} with pip: {result.stderr[-500:]}"
        )
    return found[0]


def bigbench_task_file(name: str) -> Path:
    """`<cache>/bigbench/<name>.json`: the BIG-bench task.json of a task in `TASKS`."""
    if name not in TASKS:
        raise QuantscaleError(f"unknown zero-shot task {name!r}; known: {', '.join(TASKS)}")
    folder = cache_dir() / "bigbench"
    dest = folder / f"{name}.json"
    if dest.exists():
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    with cache_lock("bigbench"):
        if dest.exists():
            return dest
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".bigbench-") as tmp:
            tree = _fetch_bigbench_tree(Path(tmp))
            for task, (member, _) in TASKS.items():
                target = folder / f"{task}.json"
                shutil.copyfile(tree / member, target.with_suffix(".tmp"))
                os.replace(target.with_suffix(".tmp"), target)
    return dest


def task_rows(task_json: dict, query_suffix: str = "", seed: int = SHUFFLE_SEED) -> list[dict]:
    """BIG-bench multiple-choice examples as {query, choices, gold} rows, shuffled by `seed`."""
    rows = []
    for example in task_json["examples"]:
        choices = list(example["target_scores"])
        scores = list(example["target_scores"].values())
        query = example["input"].strip() + query_suffix
        rows.append({"query": query, "choices": choices, "gold": scores.index(max(scores))})
    random.Random(seed).shuffle(rows)
    return rows


def task_jsonl(name: str) -> Path:
    """`<cache>/zeroshot/<name>.jsonl`, built once from the BIG-bench task."""
    path = cache_dir() / "zeroshot" / f"{name}.jsonl"
    if path.exists():
        return path
    task = json.loads(bigbench_task_file(name).read_text(encoding="utf-8"))
    rows = task_rows(task, TASKS[name][1])
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
