"""`validate --runtime transformers` (named-only rules of checkpoint.runtimes) on Llama exports.

transformers runs a compressed-tensors file's dynamic int8 activations on compressed-tensors'
absmax / 127.5 grid (SmolLM2 W8A8 dynamic: 23.177 there, 23.205 ours, `make interop`; the grid
is pinned in tests/test_mamba_export.py), decompresses FP4 to bf16 (a float32 model fails), and
has no ModelOpt reader.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

from quantscale.checkpoint.runtimes import (
    CT_DYNAMIC_INT8,
    CT_NUMERICS,
    TF_MODELOPT,
    runtime_refusals,
)
from quantscale.export import export_model
from quantscale.orchestrator import quantize_model

CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))


def _export(tmp_path, scheme: str):
    model = make_tiny_llama(96, 128, 256, torch.bfloat16)
    quantize_model(model, scheme, CALIB)
    return export_model(model, tmp_path / "out", "compressed-tensors")


@pytest.mark.parametrize(("scheme", "named"), [("W8A8_DYNAMIC", 14), ("W8A8", 0), ("W8A16", 0)])
def test_dynamic_int_activations_named_for_transformers(tmp_path, scheme, named):
    """Only dynamic int activations; only with --runtime transformers (or the rule's name)."""
    out = _export(tmp_path, scheme)
    refusals = [r for r in runtime_refusals(out, "transformers") if r.runtime == CT_DYNAMIC_INT8]
    assert len(refusals) == named
    if named:
        assert "model.layers.1.mlp.down_proj.weight" in {r.tensor for r in refusals}
        assert "127.5" in refusals[0].reason
    others = runtime_refusals(out) + runtime_refusals(out, "vllm-cpu")
    assert CT_DYNAMIC_INT8 not in {r.runtime for r in others}


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
