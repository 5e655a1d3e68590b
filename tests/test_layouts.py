"""The registry of on-disk layouts: each layout our writers produce is detected as itself,
block sizes parse one way everywhere, and the converter refuses what it cannot convert."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_llama

from quantscale.checkpoint.convert import convert_checkpoint, explain
from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
from quantscale.checkpoint.layouts import (
    CT_FP8_LAYOUT,
    CT_INT_LAYOUT,
    CT_MXFP4_LAYOUT,
    CT_NVFP4_LAYOUT,
    FAKE_QUANT,
    HF_FP8,
    LAYOUTS,
    MODELOPT_FP8_LAYOUT,
    MODELOPT_NVFP4_LAYOUT,
    NEURON_FP8,
    PSEUDO,
    QUAMBA,
    config_block,
    detect_layout,
    parse_block,
    scale_name_for,
    weight_of_scale,
)
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.synthetic import write_llama_like
from quantscale.errors import QuantscaleError
from quantscale.export import export_model
from quantscale.export.fake_quant import save_quantized
from quantscale.orchestrator import quantize_model


def _layout(path):
    return detect_layout(Checkpoint(path))


def _with_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    src = write_llama_like(tmp / "bf16", hidden=128, intermediate=256, layers=1)
    hf = quantize_checkpoint_fp8(src, tmp / "hf")
    return {
        "plain": src,
        "hf": hf,
        "compressed-tensors": convert_checkpoint(hf, tmp / "ct", "compressed-tensors"),
        "neuron": convert_checkpoint(hf, tmp / "neuron", "neuron"),
    }


def test_fp8_conventions_detected(fp8_dirs):
    assert _layout(fp8_dirs["plain"]) is None
    assert _layout(fp8_dirs["hf"]) is HF_FP8
    assert _layout(fp8_dirs["compressed-tensors"]) is CT_FP8_LAYOUT
    assert _layout(fp8_dirs["neuron"]) is NEURON_FP8
    for key, layout in (("hf", HF_FP8), ("compressed-tensors", CT_FP8_LAYOUT)):
        ckpt = Checkpoint(fp8_dirs[key])
        weight = next(n for n, i in ckpt.tensors.items() if i.dtype == "F8_E4M3")
        scale = scale_name_for(ckpt.tensors, weight)
        assert scale == weight.removesuffix("weight") + str(layout.weight_scale)
        assert weight_of_scale(scale) == weight


def _tiny(preset: str):
    model = make_tiny_llama(96, 64, 128, torch.bfloat16, max_position_embeddings=64)
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, preset, tokens, method="rtn", batch_size=2)
    return model


@pytest.mark.parametrize(
    ("preset", "fmt", "expected"),
    [
        ("NVFP4A16", "compressed-tensors", CT_NVFP4_LAYOUT),
        ("NVFP4A16", "modelopt", MODELOPT_NVFP4_LAYOUT),
        ("MXFP4A16", "compressed-tensors", CT_MXFP4_LAYOUT),
        ("W4A16", "compressed-tensors", CT_INT_LAYOUT),
        ("FP8_DYNAMIC", "compressed-tensors", CT_FP8_LAYOUT),
        ("W4A16", "pseudo", PSEUDO),
    ],
)
def test_exports_detected_as_their_layout(tmp_path, preset, fmt, expected):
    out = export_model(_tiny(preset), tmp_path / "out", fmt)
    assert _layout(out) is expected


def test_fake_quant_quamba_and_modelopt_fp8(tmp_path):
    assert _layout(save_quantized(_tiny("W8A16"), tmp_path / "fq")) is FAKE_QUANT
    src = write_llama_like(tmp_path / "m", hidden=128, intermediate=256, layers=1)
    assert _layout(_with_config(src, quantization_config={"quant_method": "quamba"})) is QUAMBA
    mo = {"quant_method": "modelopt", "quant_algo": "FP8"}
    assert _layout(_with_config(src, quantization_config=mo)) is MODELOPT_FP8_LAYOUT
    assert list(LAYOUTS)[0] == FAKE_QUANT.name


def test_block_parser():
    assert parse_block([64, 32]) == (64, 32)
    for bad in ([128], [128, 0], [True, 128], "128x128", [128.0, 128], None):
        assert parse_block(bad) is None
    assert config_block({"quantization_config": {"weight_block_size": [64, 128]}}) == (64, 128)
    group = {"weights": {"block_structure": [32, 32]}}
    ct = {"quantization_config": {"config_groups": {"group_0": group}}}
    assert config_block(ct) == (32, 32)
    assert config_block({"neuron_quantization": {"quantization_block_size": [16, 16]}}) == (16, 16)
    assert config_block({"quantization_config": {"weight_block_size": [128]}}) is None
    assert config_block(None) is None


def test_converter_refusals(fp8_dirs, tmp_path):
    with pytest.raises(QuantscaleError, match="--to modelopt converts NVFP4 checkpoints only"):
        convert_checkpoint(fp8_dirs["hf"], tmp_path / "x", "modelopt")
    with pytest.raises(QuantscaleError, match="unknown target"):
        convert_checkpoint(fp8_dirs["hf"], tmp_path / "x", "gguf")
    w4 = export_model(_tiny("W4A16"), tmp_path / "w4", "compressed-tensors")
    with pytest.raises(QuantscaleError, match="not an FP8 block checkpoint"):
        convert_checkpoint(w4, tmp_path / "x", "hf")
    nv = export_model(_tiny("NVFP4A16"), tmp_path / "nv", "compressed-tensors")
    with pytest.raises(QuantscaleError, match="unknown NVFP4 target 'neuron'"):
        convert_checkpoint(nv, tmp_path / "x", "neuron")
    with pytest.raises(QuantscaleError, match="already in compressed-tensors format"):
        convert_checkpoint(nv, tmp_path / "x", "compressed-tensors")
    assert not (tmp_path / "x").exists()


def test_explain_covers_every_target():
    assert "weight_scale_2" in explain("modelopt") and "weight_scale_inv" not in explain("modelopt")
    both = explain("compressed-tensors")
    assert "<module>.weight_scale" in both and "NVFP4" in both
    assert "NVFP4" not in explain("hf")
