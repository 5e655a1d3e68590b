"""The model front door (models/loader, quantize.load_model) and the algorithm registry."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny_models import make_tiny_llama

from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.models import loader
from quantscale.quantize import load_model


def _save(tmp_path, name="m", quantization_config=None, **extra):
    model = make_tiny_llama()
    path = tmp_path / name
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    config.update(extra)
    (path / "config.json").write_text(json.dumps(config))
    return path, model


def test_plain_checkpoint_loads_without_tokenizer(tmp_path):
    path, model = _save(tmp_path)
    loaded, tokenizer = load_model(path)
    assert tokenizer is None and not loaded.training
    ids = torch.arange(8).reshape(1, 8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loader.tied_embeddings(loaded) == bool(loaded.config.tie_word_embeddings)


@pytest.mark.parametrize(
    ("qc", "extra", "method"),
    [
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, {}, "modelopt"),
        ({"quant_method": "gptq", "bits": 4}, {}, "gptq"),
        (None, {"neuron_quantization": {"quantized_dtype": "f8e4m3"}}, "neuron_quantization"),
    ],
)
def test_unapplied_quantization_configs_are_refused(tmp_path, qc, extra, method):
    path, _ = _save(tmp_path, quantization_config=qc, **extra)
    with pytest.raises(CheckpointError, match=f"quant_method '{method}' is not applied"):
        load_model(path)


def test_fake_quant_entry_with_another_format_is_refused(tmp_path):
    path, _ = _save(tmp_path, quantscale={"format": "something-else", "recipe": {}})
    with pytest.raises(CheckpointError, match="quantscale.format is 'something-else'"):
        load_model(path)


def test_resolve_model_names_the_choices(tmp_path):
    with pytest.raises(QuantscaleError, match="smollm2"):
        loader.resolve_model(tmp_path / "nothing")


def test_tokenizer_falls_back_to_the_baseline(tmp_path):
    with pytest.raises(QuantscaleError, match="no tokenizer_config.json"):
        loader.load_tokenizer(tmp_path)
    assert loader.saved_tokenizer(tmp_path) is None


def test_registry_names_the_known_algorithms():
    from quantscale.algorithms.base import ALGORITHMS, get_algorithm

    assert {"rtn", "gptq"} <= set(ALGORITHMS)
    assert get_algorithm("RTN").needs_data is False
    assert get_algorithm("gptq", dampening_frac=0.1).dampening_frac == 0.1
    with pytest.raises(QuantscaleError, match="unknown weight algorithm 'awq'; known: gptq, rtn"):
        get_algorithm("awq")


def test_sweep_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    from quantscale.analysis.sweep import SweepRow, plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(QuantscaleError, match=r"quantscale\[plots\]"):
        plot([SweepRow("baseline", {"ppl": 1.0})], tmp_path / "p.png")


def test_compressed_tensors_checkpoints_pass_through_to_transformers(tmp_path):
    from quantscale.export import export_model
    from quantscale.quantize import quantize_model

    model = make_tiny_llama(dtype=torch.bfloat16)
    quantize_model(model, "W8A16")
    out = export_model(model, tmp_path / "ct", "compressed-tensors")
    loaded, _ = load_model(out, torch.bfloat16)  # transformers decompresses the weights
    ids = torch.arange(8).reshape(1, 8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0.05, atol=0.05)


def test_a_broken_algorithm_module_raises_its_own_error():
    import subprocess

    code = (
        "import sys; sys.modules['quantscale.algorithms.gptq'] = None\nimport quantscale.quantize\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "Error: import of quantscale.algorithms.gptq halted" in run.stderr
