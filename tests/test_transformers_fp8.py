"""Our FP8 block checkpoints in transformers (FineGrainedFP8 dequantizes on load on CPU)."""

from __future__ import annotations

import pytest
import torch

from quantscale.checkpoint.dequantize import dequantize_checkpoint
from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
from quantscale.checkpoint.runtimes import TRANSFORMERS, runtime_refusals
from quantscale.checkpoint.synthetic import write_llama_like

transformers = pytest.importorskip("transformers")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _make(tmp_path, hidden, intermediate, heads, kv_heads):
    bf16 = write_llama_like(
        tmp_path / "bf16",
        hidden=hidden,
        intermediate=intermediate,
        layers=1,
        vocab=256,
        heads=heads,
        kv_heads=kv_heads,
    )
    fp8 = quantize_checkpoint_fp8(bf16, tmp_path / "fp8")
    deq = dequantize_checkpoint(fp8, tmp_path / "deq")
    return fp8, deq


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(24)[None]).logits.float()


def test_divisible_llama_loads_and_matches_our_dequantized(tmp_path):
    fp8, deq = _make(tmp_path, hidden=256, intermediate=512, heads=4, kv_heads=2)
    assert runtime_refusals(fp8) == []
    theirs, ours = _logits(_load(fp8)), _logits(_load(deq))
    rel = (theirs - ours).abs().max() / ours.abs().max()
    assert rel <= 1e-3


def test_smollm2_widths_are_refused_and_predicted(tmp_path):
    """576-wide layers: ceil grid of 5 tiles does not divide 576, transformers refuses."""
    fp8, _ = _make(tmp_path, hidden=576, intermediate=1536, heads=9, kv_heads=3)
    with pytest.raises(Exception) as err:
        _load(fp8)
    found = runtime_refusals(fp8)  # also vLLM's merged-shard rule (k / v after q's 576 rows)
    refusals = [r for r in found if r.runtime == TRANSFORMERS]
    assert {r.tensor.split(".")[-2] for r in refusals} == set(PROJ)
    assert all("refuses" in r.reason for r in refusals)
    assert "q_proj" in [r.tensor.split(".")[-2] for r in refusals]
    message = str(err.value) + repr(err.value.__cause__) + repr(err.value.__context__)
    assert "automatic conversion" in message or "not divisible by scale grid" in message
    q = next(r for r in refusals if r.tensor.endswith("q_proj.weight"))
    assert "Weight shape (576, 576) not divisible by scale grid (5, 5)" in q.reason


def test_divisible_grid_with_wrong_block_loads_silently_wrong(tmp_path):
    """130 x 1000: grids (2, 8) divide, so transformers uses 65x125 tiles and mis-scales."""
    fp8, deq = _make(tmp_path, hidden=130, intermediate=1000, heads=1, kv_heads=1)
    theirs, ours = _load(fp8), _load(deq)
    name = "model.layers.0.mlp.gate_proj.weight"
    a = dict(theirs.named_parameters())[name].float()
    b = dict(ours.named_parameters())[name].float()
    assert not torch.equal(a, b)
    assert (a - b).abs().max() > 1e-3 * b.abs().max()
    refusals = {r.tensor: r.reason for r in runtime_refusals(fp8)}
    assert "silently wrong" in refusals[name] and "125x65" in refusals[name]
    assert len(refusals) == len(PROJ)
