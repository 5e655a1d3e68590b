"""Synthetic checkpoints: real names and shapes, deterministic, loadable."""

from __future__ import annotations

import json

import pytest
import torch

from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.synthetic import write_llama_like, write_minimax_like
from quantscale.formats.fp8 import dequantize_fp8_block, quantize_fp8_block


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    return Checkpoint(write_minimax_like(tmp_path_factory.mktemp("mm") / "ckpt", 1, 2, 1))


def test_minimax_names_shapes_dtypes(minimax):
    t = minimax.tensors
    p = "model.layers.0"
    expect = {
        f"{p}.self_attn.q_proj.weight": ("F8_E4M3", (6144, 3072)),
        f"{p}.self_attn.q_proj.weight_scale_inv": ("F32", (48, 24)),
        f"{p}.self_attn.k_proj.weight_scale_inv": ("F32", (8, 24)),
        f"{p}.self_attn.v_proj.weight": ("F8_E4M3", (1024, 3072)),
        f"{p}.self_attn.o_proj.weight_scale_inv": ("F32", (24, 48)),
        f"{p}.block_sparse_moe.experts.1.w1.weight_scale_inv": ("F32", (12, 24)),
        f"{p}.block_sparse_moe.experts.1.w2.weight": ("F8_E4M3", (3072, 1536)),
        f"{p}.block_sparse_moe.experts.1.w2.weight_scale_inv": ("F32", (24, 12)),
        f"{p}.block_sparse_moe.gate.weight": ("F32", (2, 3072)),
        f"{p}.block_sparse_moe.e_score_correction_bias": ("F32", (2,)),
        f"{p}.input_layernorm.weight": ("BF16", (3072,)),
        "model.embed_tokens.weight": ("BF16", (512, 3072)),
        "lm_head.weight": ("BF16", (512, 3072)),
    }
    for name, (dtype, shape) in expect.items():
        assert (t[name].dtype, t[name].shape) == (dtype, shape), name
    qc = minimax.quantization_config
    assert qc["modules_to_not_convert"] == ["gate", "e_score_correction_bias", "lm_head"]
    assert qc["weight_block_size"] == [128, 128] and qc["fmt"] == "float8_e4m3fn"


def test_minimax_fp8_matches_bf16_version(minimax, tmp_path):
    """The FP8 file is the block quantization of the bf16 file with the same seed."""
    bf16 = Checkpoint(write_minimax_like(tmp_path / "bf", 1, 2, 1, fp8=False))
    assert bf16.quantization_config is None
    name = "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    ref = bf16.get(name)
    q, scale = quantize_fp8_block(ref)
    assert torch.equal(minimax.get(name).view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(minimax.get(name + "_scale_inv"), scale)
    deq = dequantize_fp8_block(q, scale, dtype=torch.float32)
    assert (deq - ref.float()).abs().max() < 0.1 * ref.float().abs().max()
    assert 0.018 < ref.float().std().item() < 0.022


def test_deterministic_and_shard_independent(tmp_path):
    a = Checkpoint(write_llama_like(tmp_path / "a", 128, 256, 3, 64, shards=1, seed=5))
    b = Checkpoint(write_llama_like(tmp_path / "b", 128, 256, 3, 64, shards=3, seed=5))
    c = Checkpoint(write_llama_like(tmp_path / "c", 128, 256, 3, 64, shards=1, seed=6))
    assert len(b.shards) == 3 and len(a.shards) == 1
    assert set(a.tensors) == set(b.tensors)
    name = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(a.get(name), b.get(name))
    assert not torch.equal(a.get(name), c.get(name))
    assert b.tensors["model.embed_tokens.weight"].shard == b.shards[0]
    assert b.tensors["lm_head.weight"].shard == b.shards[-1]


def test_llama_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_llama_like(tmp_path / "llama", 128, 256, 2, 64, shards=2, seed=1)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ckpt = Checkpoint(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(model.state_dict()[name], ckpt.get(name))
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
