"""`--format gguf`: GGML Q8_0 / Q4_0 blocks hold exactly our codes, and transformers' GGUF
reader loads the SmolLM2 file we write with our fake-quant model's weights and perplexity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantscale.errors import QuantscaleError
from quantscale.export.gguf import (
    ggml_blocks,
    gguf_tensor_name,
    pack_q4_nibbles,
    rotary_permute,
    unpack_q4_nibbles,
)

gguf = pytest.importorskip("gguf")


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 4),
    blocks=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_q4_nibbles_round_trip_and_match_ggml_layout(rows, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (rows, 32 * blocks), generator=g, dtype=torch.int8)
    packed = pack_q4_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 16 * blocks)
    assert torch.equal(unpack_q4_nibbles(packed), codes)
    # ggml: byte j of a block = element j (low nibble) | element j + 16 (high nibble), + 8
    first = (codes[:, :16].to(torch.int16) + 8) | ((codes[:, 16:32].to(torch.int16) + 8) << 4)
    assert torch.equal(packed[:, :16].to(torch.int16), first)


@pytest.mark.parametrize(("kind", "bits"), [("Q8_0", 8), ("Q4_0", 4)])
def test_blocks_dequantize_in_the_gguf_package_to_our_values(kind, bits):
    g = torch.Generator().manual_seed(0)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (6, 96), generator=g, dtype=torch.int8)
    scale = (torch.rand(6, 3, generator=g) + 0.01).to(torch.float16)
    raw = ggml_blocks(codes, scale, kind)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())
    ours = codes.float() * scale.float().repeat_interleave(32, dim=1)
    assert torch.equal(theirs.float(), ours)


def test_q4_1_blocks_dequantize_in_the_gguf_package_to_our_values():
    """(q - z) * s as nibble * d + m: equal up to m's float16 rounding (<= 15 * s * 2^-11)."""
    from quantscale.qdq import compute_qparams, dequantize, quantize
    from quantscale.scheme import preset_scheme

    args = preset_scheme("Q4_1").weights
    assert args is not None
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 96, generator=g) + torch.linspace(-1, 2, 96)
    groups = w.reshape(6, 3, 32)
    qp = compute_qparams(args, groups.amin(-1), groups.amax(-1))
    qp.scale = qp.scale.to(torch.float16)
    codes = quantize(w, args, qp)
    raw = ggml_blocks(codes, qp.scale, "Q4_1", qp.zero_point)
    assert raw.shape == (6, 3 * 20)  # d, m (2 bytes each) + 16 bytes of nibbles per block
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).copy())
    ours = dequantize(codes, args, qp)
    bound = (15 * qp.scale.float() * 2**-11).repeat_interleave(32, dim=1) + 1e-6
    assert ((theirs.float() - ours).abs() <= bound).all()
    with pytest.raises(QuantscaleError, match="zero points"):
        ggml_blocks(codes, qp.scale, "Q4_1")


def test_rotary_permutation_is_undone_by_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(8 * 64 * 3, dtype=torch.float32).reshape(8 * 64, 3)
    permuted = rotary_permute(w, 8)
    assert not torch.equal(permuted, w)
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), 8)
    assert torch.equal(torch.from_numpy(back), w)


def test_tensor_names():
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"
    assert gguf_tensor_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_tensor_name("model.layers.2.post_attention_layernorm.weight") == (
        "blk.2.ffn_norm.weight"
    )
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_0", "Q4_1"])
def test_smollm2_gguf_reads_back_as_our_fake_quant_model(tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    from quantscale import cli
    from quantscale.data import assets
    from quantscale.data.calibration import eval_tokens
    from quantscale.eval.perplexity import perplexity
    from quantscale.models.loader import load_pretrained, load_tokenizer
    from quantscale.orchestrator import quantize_model

    path = assets.smollm2_checkpoint()
    out = tmp_path / scheme
    argv = ["quantize", str(path), str(out), "--scheme", scheme, "--method", "rtn"]
    assert cli.main([*argv, "--format", "gguf", "--dtype", "float32"]) == 0
    assert (out / "model.gguf").is_file()
    # only the tensors llama.cpp's Llama creates (it refuses any other: "wrong number of
    # tensors"): 9 per layer, token_embd, output_norm, output; no scale buffers
    names = [t.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors]
    assert len(names) == 9 * 30 + 3 and all(n.endswith(".weight") for n in names), names[:12]

    tokens = eval_tokens(load_tokenizer(path), 2048)
    model = load_pretrained(path, torch.float32)
    quantize_model(model, scheme, None, method="rtn")
    ours = perplexity(model, tokens, 512)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    state = loaded.state_dict()
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
        full = f"model.layers.5.{name}"
        ql = model.get_submodule(full)
        diff = (state[f"{full}.weight"] - ql.weight.float()).abs().max()
        # Q8_0 / Q4_0 bit for bit; Q4_1's float16 m: under 15 * s * 2^-11
        assert diff <= (
            15 * ql.weight_scale.float().max() * 2**-11 + 1e-6 if scheme == "Q4_1" else 0
        )
    theirs = perplexity(loaded, tokens, 512)
    print(f"{scheme}: perplexity ours {ours:.4f}, transformers' GGUF reader {theirs:.4f}")
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)
