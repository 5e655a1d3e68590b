"""The Python API (`import quantscale as qs`): the README's example runs, and each function
gives what the command behind it gives."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_llama

import quantscale as qs
from quantscale.errors import QuantscaleError
from quantscale.runtime.qlinear import QuantLinear

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has a ```python block"
    return match.group(1)


def test_import_is_light_and_names_the_api():
    code = "import sys, quantscale as qs; print('torch' in sys.modules, qs.__version__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", qs.__version__]
    assert {"quantize", "inspect", "validate", "convert", "evaluate"} <= set(qs.__all__)
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        qs.quantise  # noqa: B018


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), str(README), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    ppl = eval(printed[-1])["ppl"]  # the dict the example prints
    assert 15 < ppl < 40, printed
    assert (tmp_path / "out/smollm2-w4a16/config.json").is_file()


def _tokens(rows: int = 4, width: int = 32) -> torch.Tensor:
    return torch.randint(0, 96, (rows, width), generator=torch.Generator().manual_seed(1))


def test_quantize_in_memory_with_token_ids_returns_the_model():
    model = make_tiny_llama(96, 128, 256)
    out = qs.quantize(model, scheme="W8A8", method="gptq", calibration=_tokens())
    assert out is model
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 14 and all(m.input_qparams() is not None for m in linears)


def test_quantize_in_memory_exports_and_evaluate_reads_it_back(tmp_path):
    from quantscale.eval.perplexity import perplexity

    model = make_tiny_llama(96, 128, 256)
    out = qs.quantize(model, tmp_path / "ct", scheme="W4A16", method="rtn")
    assert isinstance(out, Path) and (out / "config.json").is_file()
    assert qs.validate(out).ok
    assert {row.kind for row in qs.inspect(out).kinds} >= {"attention.q", "mlp.down"}
    from quantscale.orchestrator import load_evaluated  # what qs.evaluate reads a path with

    tokens = _tokens(1, 64)[0]
    assert perplexity(load_evaluated(out), tokens, seq_len=16) == pytest.approx(
        perplexity(model, tokens, seq_len=16), rel=1e-6
    )


def test_quantize_in_memory_without_tokenizer_names_what_is_missing():
    model = make_tiny_llama(96, 128, 256)
    with pytest.raises(QuantscaleError, match=r"tokenizer=None\): no tokenizer found"):
        qs.quantize(model, scheme="W8A8", method="gptq", calibration=["some text"])
    with pytest.raises(QuantscaleError, match=r"integer tensor \[N, L\]; got torch.float32"):
        qs.quantize(model, scheme="W8A8", method="gptq", calibration=torch.zeros(2, 8))


def test_quantize_a_path_needs_an_output_dir():
    with pytest.raises(QuantscaleError, match="output_dir is required"):
        qs.quantize("smollm2", scheme="W4A16")


def test_evaluate_in_memory_needs_its_tokenizer():
    with pytest.raises(QuantscaleError, match="needs its tokenizer"):
        qs.evaluate(make_tiny_llama(96, 128, 256), tasks=["ppl"])


def test_calibration_strings_are_joined_text(tmp_path):
    """A list of strings calibrates like the same text in a file."""
    from quantscale.data.calibration import calibration_batches

    class WordTokenizer:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [len(w) for w in text.split()]}

    texts = ["one two three four five six", "seven eight nine ten eleven twelve"]
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(texts))
    tok = WordTokenizer()
    torch.testing.assert_close(
        calibration_batches(tok, 3, 4, source=texts), calibration_batches(tok, 3, 4, source=path)
    )


def test_quantize_mamba_checkpoint_from_token_ids(tmp_path):
    """qs.quantize on a Mamba checkpoint without a tokenizer: the defaults take the Quamba
    path (they used to be refused as --method / --format) and token ids need no tokenizer."""
    from transformers import MambaConfig, MambaForCausalLM

    from quantscale.mamba.quantize import load_quantized

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)
    MambaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    with pytest.raises(QuantscaleError, match=r"no tokenizer found.*calibration=ids"):
        qs.quantize(tmp_path / "m", tmp_path / "q", "W8A8", calib_samples=2, calib_seq_len=16)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    out = qs.quantize(tmp_path / "m", tmp_path / "q", "W8A8", calibration=ids)
    assert load_quantized(out).config.quantization_config["quant_method"] == "quamba"
