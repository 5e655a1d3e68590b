"""`validate --runtime transformers` on dynamic int8 activations (checkpoint.runtimes).

transformers runs a compressed-tensors file's dynamic activations through compressed-tensors'
own fake quantization, whose symmetric int scale is absmax / 127.5 (SmolLM2 W8A8 dynamic:
23.177 there, 23.205 ours, `make interop`). The test pins that grid against compressed-tensors
itself where it is installed, and the rule on our exports.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_llama

from quantscale.checkpoint.runtimes import CT_NUMERICS, TF_MODELOPT, runtime_refusals
from quantscale.export import export_model
from quantscale.orchestrator import quantize_model
from quantscale.qdq import fake_quantize_dynamic
from quantscale.scheme import QuantArgs

CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))


def _export(tmp_path, scheme: str):
    model = make_tiny_llama(96, 128, 256, torch.bfloat16)
    quantize_model(model, scheme, CALIB)
    return export_model(model, tmp_path / "out", "compressed-tensors")


def test_compressed_tensors_dynamic_int8_grid_differs_from_ours(tmp_path):
    """The file's own input_activations args, quantized by compressed-tensors and by us."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    config = json.loads((_export(tmp_path, "W8A8_DYNAMIC") / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    raw = group["input_activations"]
    x = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(0))  # batch, seq, hidden
    module = torch.nn.Linear(64, 64)
    module.quantization_status = ct.QuantizationStatus.FROZEN
    theirs = forward_quantize(module, x, "input", ct.QuantizationArgs(**raw))
    args = QuantArgs(**{k: v for k, v in raw.items() if k in QuantArgs.model_fields})
    ours = fake_quantize_dynamic(x, args)
    amax = x.abs().amax(dim=-1, keepdim=True)  # per token
    on_127_5 = torch.round(x / (amax / 127.5)).clamp(-128, 127) * (amax / 127.5)
    assert torch.allclose(theirs, on_127_5, atol=1e-6)
    assert torch.allclose(ours, torch.round(x / (amax / 127)) * (amax / 127), atol=1e-6)
    assert not torch.allclose(theirs, ours, atol=1e-4)


@pytest.mark.parametrize(("scheme", "named"), [("W8A8_DYNAMIC", 14), ("W8A8", 0), ("W8A16", 0)])
def test_dynamic_int_activations_named_for_transformers(tmp_path, scheme, named):
    """Only dynamic int activations; only with --runtime transformers (or the rule's name)."""
    out = _export(tmp_path, scheme)
    refusals = runtime_refusals(out, "transformers")
    assert len(refusals) == named and {r.runtime for r in refusals} <= {CT_NUMERICS}
    if named:
        assert "model.layers.1.mlp.down_proj.weight" in {r.tensor for r in refusals}
        assert "127.5" in refusals[0].reason
    others = runtime_refusals(out) + runtime_refusals(out, "vllm-cpu")
    assert CT_NUMERICS not in {r.runtime for r in others}


@pytest.mark.parametrize("scheme", ["NVFP4A16", "MXFP4A16"])
def test_fp4_float32_load_named(tmp_path, scheme):
    """compressed-tensors decompresses FP4 to bf16: a float32 model fails at its first forward
    (SmolLM2 NVFP4A16 / MXFP4A16); pinned in transformers itself on the tiny export."""
    from transformers import AutoModelForCausalLM

    out = _export(tmp_path, scheme)
    refusals = runtime_refusals(out, "transformers")
    assert len(refusals) == 14 and {r.runtime for r in refusals} == {CT_NUMERICS}
    assert "dtype=torch.bfloat16" in refusals[0].reason
    ids = torch.tensor([[1, 2, 3]])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="same dtype"):
        model(input_ids=ids)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_modelopt_named_for_transformers(tmp_path):
    model = make_tiny_llama(96, 128, 256, torch.bfloat16)
    quantize_model(model, "NVFP4A16", CALIB)
    out = export_model(model, tmp_path / "out", "modelopt")
    refusals = runtime_refusals(out, "transformers")
    assert len(refusals) == 14 and {r.runtime for r in refusals} == {TF_MODELOPT}
    assert TF_MODELOPT not in {r.runtime for r in runtime_refusals(out)}
