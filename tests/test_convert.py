"""Converting FP8 block checkpoints between HF, compressed-tensors and Neuron conventions."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from quantscale import cli
from quantscale.checkpoint.convert import convert_checkpoint, explain
from quantscale.checkpoint.dequantize import dequantize_checkpoint
from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
from quantscale.checkpoint.layouts import from_neuron_name, to_neuron_name
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.synthetic import write_llama_like, write_minimax_like
from quantscale.errors import QuantscaleError


def _tensors(path):
    ckpt = Checkpoint(path)
    return {n: ckpt.get(n) for n in ckpt.names()}


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.fixture
def hf_fp8(tmp_path):
    src = write_llama_like(tmp_path / "bf16", hidden=256, intermediate=384, layers=2, shards=2)
    return quantize_checkpoint_fp8(src, tmp_path / "hf")


def test_neuron_names():
    name = "model.layers.3.self_attn.k_proj.weight_scale_inv"
    assert to_neuron_name(name, "weight_scale_inv") == "layers.3.self_attn.qkv_proj.k_proj.scale"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert to_neuron_name(o, "weight_scale_inv") == "layers.0.self_attn.o_proj.o_proj.weight"
    mlp = "model.layers.0.mlp.down_proj.weight"
    assert to_neuron_name(mlp, "weight_scale_inv") == "layers.0.mlp.down_proj.weight"
    for hf in (name, o, mlp, "lm_head.weight", "model.norm.weight"):
        back = from_neuron_name(
            to_neuron_name(hf, "weight_scale_inv"), "weight_scale_inv", ["lm_head"]
        )
        assert back == hf


@pytest.mark.parametrize("via", ["compressed-tensors", "neuron"])
def test_round_trip_is_bit_exact_and_input_untouched(hf_fp8, tmp_path, via):
    before = _digest(hf_fp8)
    mid = convert_checkpoint(hf_fp8, tmp_path / via, via)
    back = convert_checkpoint(mid, tmp_path / f"{via}-hf", "hf")
    assert _digest(hf_fp8) == before
    _bit_equal(_tensors(back), _tensors(hf_fp8))
    assert Checkpoint(back).shards == Checkpoint(hf_fp8).shards
    assert Checkpoint(back).quantization_config == Checkpoint(hf_fp8).quantization_config


def test_no_reciprocal_dequantized_weights_equal(hf_fp8, tmp_path):
    """Converted scales are the same multipliers: 1/scale would corrupt by ~(amax/448)^-2."""
    reference = _tensors(dequantize_checkpoint(hf_fp8, tmp_path / "ref", dtype="fp32"))
    original = _tensors(hf_fp8)
    for via in ("compressed-tensors", "neuron"):
        converted = convert_checkpoint(hf_fp8, tmp_path / via, via)
        tensors = _tensors(converted)
        scale_leaf = "weight_scale" if via == "compressed-tensors" else "scale"
        assert not any(n.endswith("weight_scale_inv") for n in tensors)
        scales = {n: t for n, t in tensors.items() if n.endswith("." + scale_leaf)}
        assert len(scales) == sum(n.endswith("_scale_inv") for n in original)
        deq = _tensors(dequantize_checkpoint(converted, tmp_path / f"{via}-deq", dtype="fp32"))
        back = {from_neuron_name(n, "", ["lm_head"]): t for n, t in deq.items()}
        deq = back if via == "neuron" else deq
        _bit_equal(deq, reference)
    # the reciprocal claim, for contrast: off by a factor of about (amax/448)^-2
    name = "model.layers.0.mlp.up_proj.weight"
    q, s = original[name].float(), original[name + "_scale_inv"]
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
    wrong, right = q / full, reference[name]
    nonzero = right != 0
    ratio = wrong[nonzero] / right[nonzero]
    torch.testing.assert_close(ratio, full[nonzero] ** -2, rtol=1e-5, atol=0)
    assert ratio.min() > 1e4


def test_compressed_tensors_config(hf_fp8, tmp_path):
    out = convert_checkpoint(hf_fp8, tmp_path / "ct", "compressed-tensors")
    qc = Checkpoint(out).quantization_config
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "block"
    assert group["weights"]["block_structure"] == [128, 128]
    acts = group["input_activations"]
    assert acts["dynamic"] is True and acts["strategy"] == "group" and acts["group_size"] == 128
    assert "lm_head" in qc["ignore"]
    ct = pytest.importorskip("compressed_tensors.quantization")
    parsed = ct.QuantizationConfig.model_validate(qc)
    preset = ct.preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    assert parsed.config_groups["group_0"].weights == preset.weights
    assert parsed.config_groups["group_0"].input_activations == preset.input_activations


def test_neuron_layout_and_config(hf_fp8, tmp_path):
    out = convert_checkpoint(hf_fp8, tmp_path / "neuron", "neuron")
    names = set(Checkpoint(out).names())
    assert "layers.0.self_attn.qkv_proj.q_proj.weight" in names
    assert "layers.0.self_attn.qkv_proj.v_proj.scale" in names
    assert "layers.1.self_attn.o_proj.o_proj.scale" in names
    assert "lm_head.weight" in names and "embed_tokens.weight" in names
    assert not any(n.startswith("model.") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    neuron = config["neuron_quantization"]
    assert neuron["quantization_type"] == "blockwise_symmetric"
    assert neuron["quantization_dtype"] == "f8e4m3"
    assert neuron["quantization_block_size"] == [128, 128]
    assert neuron["quantized"] is True and neuron["quantized_mlp_kernel_enabled"] is True
    assert neuron["activation_quantization_type"] is None and neuron["kv_cache_quant"] is False


def test_cli_reports_converted_scale_count(hf_fp8, tmp_path, capsys):
    scales = [n for n in Checkpoint(hf_fp8).names() if n.endswith(".weight_scale_inv")]
    assert cli.main(["convert", str(hf_fp8), str(tmp_path / "n"), "--to", "neuron"]) == 0
    err = capsys.readouterr().err
    assert f"converted {len(scales)} FP8 scale parameters" in err and "no reciprocal" in err
    written = [n for n in Checkpoint(tmp_path / "n").names() if n.endswith(".scale")]
    assert len(written) == len(scales) > 0
    assert cli.main(["-q", "convert", str(hf_fp8), str(tmp_path / "q"), "--to", "neuron"]) == 0
    assert "converted" not in capsys.readouterr().err


def test_minimax_shapes_convert_and_back(tmp_path):
    src = write_minimax_like(tmp_path / "mm", layers=1, experts=2, shards=2, fp8=True)
    for via in ("neuron", "compressed-tensors"):
        mid = convert_checkpoint(src, tmp_path / via, via)
        _bit_equal(_tensors(convert_checkpoint(mid, tmp_path / f"{via}-back", "hf")), _tensors(src))
    neuron = _tensors(tmp_path / "neuron")
    assert neuron["layers.0.self_attn.qkv_proj.q_proj.scale"].shape == (48, 24)
    assert neuron["layers.0.block_sparse_moe.experts.0.w2.scale"].shape == (24, 12)
    assert neuron["layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32


def test_cli_explain_and_errors(hf_fp8, tmp_path, capsys):
    assert cli.main(["convert", "--to", "neuron", "--explain"]) == 0
    text = capsys.readouterr().out
    assert "no reciprocal" in text and "<module>.scale" in text
    assert "qkv_proj" in explain("neuron")
    out = tmp_path / "ct"
    assert cli.main(["convert", str(hf_fp8), str(out), "--to", "compressed-tensors"]) == 0
    assert cli.main(["convert", str(hf_fp8), str(out), "--to", "compressed-tensors"]) == 2
    plain = write_llama_like(tmp_path / "plain", hidden=128, intermediate=256, layers=1)
    with pytest.raises(QuantscaleError, match="not an FP8 block checkpoint"):
        convert_checkpoint(plain, tmp_path / "x", "neuron")
