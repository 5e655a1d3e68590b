"""`--format gguf`: GGML Q8_0 / Q4_0 blocks hold exactly our codes, and transformers' GGUF
reader loads the SmolLM2 file we write with our fake-quant model's weights and perplexity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantscale.checkpoint.gguf import gguf_tensor_name, rotary_permute
from quantscale.errors import QuantscaleError
from quantscale.export.gguf import ggml_type
from quantscale.formats.ggml import (
    ggml_blocks,
    pack_q4_nibbles,
    superblock_factors,
    unpack_blocks,
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


def _rtn_codes(kind: str, w: torch.Tensor):
    from quantscale.algorithms.rtn import rtn_weight
    from quantscale.qdq import quantize
    from quantscale.scheme import preset_scheme

    args = preset_scheme(kind).weights
    assert args is not None
    w_hat, qp = rtn_weight(w, args)
    return args, w_hat, quantize(w_hat, args, qp), qp


# bytes per 256 weights: llama.cpp's sizeof(block_q4_K) = 144, sizeof(block_q6_K) = 210
KQUANT_BYTES = {"Q4_K": 144, "Q6_K": 210, "Q5_0": 8 * 22}


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["Q4_K", "Q6_K", "Q5_0"]),
    rows=st.integers(1, 3),
    blocks=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(1e-3, 10.0),
    offset=st.floats(-2.0, 2.0),
)
def test_new_blocks_round_trip_and_dequantize_as_the_gguf_package_does(
    kind, rows, blocks, seed, spread, offset
):
    """RTN onto the k-quant / Q5_0 grid, packed: our unpack gives the codes and scales back
    bit for bit, and gguf's own dequantizer gives our fake-quant weights (Q6_K / Q5_0
    exactly; Q4_K up to the float32 rounding of its offsets)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 256 * blocks, generator=g) * spread + offset * spread
    w[:, :16] *= 40  # one group far wider than the rest: small groups use small integer scales
    args, w_hat, codes, qp = _rtn_codes(kind, w)
    raw = ggml_blocks(codes, qp.scale, kind, qp.zero_point)
    assert raw.shape == (rows, KQUANT_BYTES[kind] * blocks)
    back, scale_back, zp_back = unpack_blocks(raw, kind, w.shape[1])
    assert torch.equal(back, codes)
    assert torch.equal(scale_back, qp.scale.float())
    theirs = torch.from_numpy(
        gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).copy()
    )
    if kind == "Q4_K":
        assert qp.zero_point is not None and zp_back is not None
        assert torch.allclose(zp_back, qp.zero_point, atol=1e-5)
        step = qp.scale.float().repeat_interleave(32, dim=1)
        assert ((theirs - w_hat).abs() <= step * 1e-5).all()
    else:
        assert torch.equal(theirs, w_hat)


@pytest.mark.parametrize(("kind", "top"), [("Q4_K", 63), ("Q6_K", 127)])
def test_kquant_scales_are_float16_d_times_small_integers(kind, top):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 512, generator=g) * torch.linspace(0.01, 1, 512)
    args, _w_hat, _codes, qp = _rtn_codes(kind, w)
    per = 256 // (args.group_size or 1)
    runs = qp.scale.reshape(4, -1, per)
    d, k = superblock_factors(runs, top)
    assert torch.equal(d.to(torch.float16).float(), d)
    assert torch.equal(d * k.float(), runs) and int(k.max()) <= top and int(k.min()) >= 1
    with pytest.raises(QuantscaleError, match="superblock grid"):
        superblock_factors(runs * 1.0001, top)  # not on any float16 d's grid


def test_unpack_refuses_types_it_does_not_write():
    with pytest.raises(QuantscaleError, match="GGUF type Q3_K"):
        unpack_blocks(np.zeros((1, 110), dtype=np.uint8), "Q3_K", 256)


def test_q4_k_m_places_llama_cpp_types():
    """llama.cpp's Q4_K_M on 30 layers: attn_v / ffn_down at Q6_K on use_more_bits layers
    (0-2, 5, 8, ..., 23, 26-29); rows not a multiple of 256 at its fallback (Q4_K -> Q5_0,
    Q6_K -> Q8_0)."""
    from quantscale.scheme import load_recipe

    widths = {}
    for i in range(30):
        for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"):
            widths[f"model.layers.{i}.{name}"] = 576
        widths[f"model.layers.{i}.mlp.down_proj"] = 1536
    widths["lm_head"] = 576
    recipe = load_recipe("q4_k_m").place_ggml_blocks(widths)

    def kind(name):
        scheme = recipe.scheme_for(name)
        if scheme is None or scheme.weights is None:
            return None
        return ggml_type(scheme.weights)

    more = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    for i in range(30):
        assert kind(f"model.layers.{i}.mlp.down_proj") == ("Q6_K" if i in more else "Q4_K")
        assert kind(f"model.layers.{i}.self_attn.v_proj") == ("Q8_0" if i in more else "Q5_0")
        assert kind(f"model.layers.{i}.self_attn.q_proj") == "Q5_0"
    assert kind("lm_head") is None  # the default ignore list keeps the head float
    again = recipe.to_quantization_config()  # the saved recipe says every placed type
    from quantscale.scheme import Recipe

    reread = Recipe.from_quantization_config(again)
    assert reread.scheme_for("model.layers.5.mlp.down_proj") == recipe.scheme_for(
        "model.layers.5.mlp.down_proj"
    )


def test_kquant_gptq_rounds_onto_the_fixed_superblock_grid():
    """GPTQ with a k-quant scheme: scales fixed first on the superblock grid, every weight on
    it (the export recovers d / dmin), and less output error than RTN on the same grid."""
    from quantscale.algorithms.gptq import gptq_quantize, output_error
    from quantscale.qdq import quantize

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(64, 256, generator=g) * 0.05
    for kind in ("Q4_K", "Q6_K"):
        args, w_rtn, _codes, _qp = _rtn_codes(kind, w)
        res = gptq_quantize(w, h, args)
        codes = quantize(res.weight, args, res.qparams)
        raw = ggml_blocks(codes, res.qparams.scale, kind, res.qparams.zero_point)
        theirs = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind))
        assert torch.allclose(torch.from_numpy(theirs.copy()), res.weight, atol=1e-6)
        assert output_error(w, res.weight, h) < output_error(w, w_rtn, h)


def test_hf_names_and_row_order_invert_the_writer():
    from quantscale.checkpoint.gguf import hf_tensor_name

    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.7.self_attn.v_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ):
        back = gguf_tensor_name(name)
        assert back is not None and hf_tensor_name(back) == name
    assert hf_tensor_name("blk.0.attn_qkv.weight") is None
    w = torch.randn(4 * 16, 5)
    assert torch.equal(rotary_permute(rotary_permute(w, 4), 4, inverse=True), w)


def _write_gguf(path, arch: str, raw_type, data):
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (("embedding_length", 256), ("block_count", 1), ("feed_forward_length", 256)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_uint32(f"{arch}.attention.head_count", 4)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reader_refuses_types_and_architectures_it_does_not_read_by_name(tmp_path):
    from quantscale.checkpoint.gguf import read_gguf
    from quantscale.errors import CheckpointError

    q3 = np.zeros((256, 110), dtype=np.uint8)  # one Q3_K superblock per row
    _write_gguf(tmp_path / "q3.gguf", "llama", gguf.GGMLQuantizationType.Q3_K, q3)
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_down\.weight is GGML type Q3_K"):
        read_gguf(tmp_path / "q3.gguf")
    f32 = np.zeros((256, 256), dtype=np.float32)
    _write_gguf(tmp_path / "gemma.gguf", "gemma", None, f32)
    with pytest.raises(CheckpointError, match="architecture 'gemma'"):
        read_gguf(tmp_path / "gemma.gguf")


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
@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q4_K_M"])
def test_smollm2_gguf_reads_back_as_our_fake_quant_model(tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    from quantscale import cli
    from quantscale.checkpoint.gguf import load_gguf_model
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
    for layer in (4, 5):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
            full = f"model.layers.{layer}.{name}"
            ql = model.get_submodule(full)
            diff = (state[f"{full}.weight"] - ql.weight.float()).abs().max()
            kind = ggml_type(ql.scheme.weights)
            # Q8_0 / Q5_0 / Q4_0 / Q6_K bit for bit; Q4_1's float16 m: under 15 * s * 2^-11;
            # Q4_K's offsets: float32 rounding
            bound = {"Q4_1": 15 * 2**-11, "Q4_K": 1e-5}.get(kind, 0.0)
            assert diff <= bound * ql.weight_scale.float().max() + (1e-6 if bound else 0), full
    theirs = perplexity(loaded, tokens, 512)
    print(f"{scheme}: perplexity ours {ours:.4f}, transformers' GGUF reader {theirs:.4f}")
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)
    # our own reader (`quantscale eval FILE.gguf`) reads the file as transformers' does
    read_back = load_gguf_model(out / "model.gguf", torch.float32, "quantscale")
    mine = read_back.state_dict()
    for name, value in state.items():
        assert torch.allclose(mine[name], value, atol=1e-6), name
    assert abs(perplexity(read_back, tokens, 512) / theirs - 1) < 1e-5
