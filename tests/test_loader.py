"""The model front door (models/loader, quantize.load_model) and the algorithm registry."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from tiny_models import make_tiny_llama

from quantscale.errors import CheckpointError, QuantscaleError
from quantscale.models import loader
from quantscale.orchestrator import load_model


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
    assert {"awq", "awq+gptq", "autoround"} <= set(ALGORITHMS)
    known = "known: " + re.escape(", ".join(sorted(ALGORITHMS)))
    with pytest.raises(QuantscaleError, match=f"unknown weight algorithm 'adaround'; {known}"):
        get_algorithm("adaround")


def test_sweep_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    from quantscale.analysis.sweep import SweepRow, plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(QuantscaleError, match=r"quantscale\[plots\]"):
        plot([SweepRow("baseline", {"ppl": 1.0})], tmp_path / "p.png")


def test_compressed_tensors_checkpoints_pass_through_to_transformers(tmp_path):
    from quantscale.export import export_model
    from quantscale.orchestrator import quantize_model

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
        "import sys; sys.modules['quantscale.algorithms.gptq'] = None\n"
        "import quantscale.orchestrator\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "Error: import of quantscale.algorithms.gptq halted" in run.stderr


def _ct_int4(tmp_path, hidden: int):
    from quantscale.export import export_model
    from quantscale.orchestrator import quantize_model

    model = make_tiny_llama(96, hidden, 256, torch.bfloat16)
    quantize_model(model, "W4A16")
    return model, export_model(model, tmp_path / "ct", "compressed-tensors")


def test_compressed_tensors_int4_evaluates_through_base_model(tmp_path):
    """Packed int4 weights stay compressed after from_pretrained, decompressed only by a
    pre-hook on the top model: evaluators calling `base_model` must still see weights."""
    from quantscale.eval.perplexity import perplexity
    from quantscale.eval.scoring import final_hidden, project

    model, out = _ct_int4(tmp_path, 128)
    loaded, _ = load_model(out, torch.bfloat16)
    ids = torch.arange(8).reshape(1, 8)
    with torch.inference_mode():
        theirs = project(loaded, final_hidden(loaded, ids))  # no top-level forward first
        ours = project(model, final_hidden(model, ids))
        torch.testing.assert_close(theirs, ours, rtol=0.05, atol=0.05)
        torch.testing.assert_close(loaded(ids).logits.float(), theirs, rtol=0, atol=0)
    tokens = torch.randint(0, 96, (64,), generator=torch.Generator().manual_seed(0))
    ppl_ours = perplexity(model, tokens, seq_len=16)
    ppl_theirs = perplexity(loaded, tokens, seq_len=16)
    assert abs(ppl_theirs - ppl_ours) / ppl_ours < 0.01, (ppl_ours, ppl_theirs)


def test_compressed_tensors_ragged_groups_are_refused(tmp_path):
    """in_features 192 with group 128: compressed-tensors 0.20 cannot decompress it."""
    from transformers import AutoModelForCausalLM

    from quantscale.checkpoint.validate import validate_checkpoint

    _, out = _ct_int4(tmp_path, 192)
    raw = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="divisble by the given group_size 128 but got 192"):
        raw(torch.arange(8).reshape(1, 8))  # the runtime failure the rule stands for
    with pytest.raises(
        CheckpointError, match=r"12 weights .*k_proj.weight_packed.*group_size 128 but got 192"
    ):
        load_model(out, torch.bfloat16)
    report = validate_checkpoint(out, runtime="transformers")
    assert "runtime-refuses" in report.codes() and not report.ok
    finding = next(f for f in report.errors if f.code == "runtime-refuses")
    assert "model.layers.0.self_attn.q_proj.weight_packed" in finding.tensors
