"""ModelOpt NVFP4 export and the compressed-tensors <-> ModelOpt converter: layout, values,
and round trips that change no byte."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_llama

from quantscale.checkpoint.convert import SIDECAR, convert_checkpoint
from quantscale.errors import QuantscaleError
from quantscale.export.compressed_tensors import read_compressed_tensors, save_compressed_tensors
from quantscale.export.modelopt import read_modelopt, save_modelopt
from quantscale.orchestrator import quantize_model
from quantscale.runtime.qlinear import quant_linears


def _model(preset: str):
    model = make_tiny_llama(
        96, 64, 128, torch.bfloat16, max_position_embeddings=64, tie_word_embeddings=False
    )
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, preset, tokens, method="gptq", batch_size=2)
    return model


@pytest.fixture(scope="module")
def w4a4(tmp_path_factory):
    model = _model("NVFP4")
    return model, save_modelopt(model, tmp_path_factory.mktemp("mo") / "w4a4")


def _files(path):
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    cfg = json.loads((path / "config.json").read_text())
    hf = path / "hf_quant_config.json"
    return tensors, cfg, json.loads(hf.read_text()) if hf.exists() else None


def test_layout_and_configs(w4a4):
    model, out = w4a4
    tensors, cfg, hf = _files(out)
    q = "model.layers.0.self_attn.q_proj."
    assert tensors[q + "weight"].dtype == torch.uint8 and tensors[q + "weight"].shape == (64, 32)
    assert tensors[q + "weight_scale"].dtype == torch.float8_e4m3fn
    assert tensors[q + "weight_scale"].shape == (64, 4)
    assert tensors[q + "weight_scale_2"].shape == () and tensors[q + "input_scale"].shape == ()
    ql = quant_linears(model)["model.layers.0.self_attn.q_proj"]
    s2 = tensors[q + "weight_scale_2"]
    assert abs(s2.item() * ql.weight_global_scale.item() - 1) < 1e-6
    assert abs(s2.item() - ql.weight.float().abs().max().item() / 2688) < 0.3 * s2.item()
    assert hf["quantization"]["quant_algo"] == "NVFP4"
    assert hf["quantization"]["group_size"] == 16
    assert hf["quantization"]["exclude_modules"] == ["lm_head"]
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert "lm_head.weight" in tensors and tensors["lm_head.weight"].dtype == torch.bfloat16
    # fused projections share weight_scale_2
    names = [f"model.layers.1.self_attn.{m}_proj.weight_scale_2" for m in "qkv"]
    assert all(torch.equal(tensors[n], tensors[names[0]]) for n in names)


def test_reader_matches_the_model(w4a4):
    model, out = w4a4
    dense = read_modelopt(out, dtype=torch.float32)
    for name, ql in quant_linears(model).items():
        # e2m1 * scale * scale_2 vs the model's e2m1 * (scale / global_scale): equal up to
        # the rounding of the reciprocal and of bfloat16
        torch.testing.assert_close(dense[f"{name}.weight"], ql.weight.float(), rtol=2**-7, atol=0)


def test_weight_only_algo_name(tmp_path):
    out = save_modelopt(_model("NVFP4A16"), tmp_path / "w4a16")
    assert _files(out)[2]["quantization"]["quant_algo"] == "W4A16_NVFP4"


def test_refuses_non_nvfp4(tmp_path):
    with pytest.raises(QuantscaleError, match="NVFP4 only"):
        save_modelopt(_model("W4A16"), tmp_path / "int4")


def _non_invertible() -> torch.Tensor:
    """A float32 x with float32(1/float32(1/x)) != x."""
    xs = torch.linspace(1e-3, 2e-3, 4096, dtype=torch.float32)
    bad = xs[(1 / (1 / xs)) != xs]
    assert len(bad) > 0
    return bad[0].clone()


def test_modelopt_to_ct_and_back_unchanged(w4a4, tmp_path):
    _, out = w4a4
    # make one scale_2 a value whose float32 reciprocal does not invert
    shard = out / "model.safetensors"
    tensors = load_file(shard)
    key = "model.layers.1.mlp.down_proj.weight_scale_2"
    tensors[key] = _non_invertible()
    src = tmp_path / "src"
    src.mkdir()
    for f in out.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    ct = convert_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    ct_tensors, ct_cfg, ct_hf = _files(ct)
    assert ct_hf is None and ct_cfg["quantization_config"]["format"] == "nvfp4-pack-quantized"
    gs = ct_tensors["model.layers.1.mlp.down_proj.weight_global_scale"]
    assert gs.shape == (1,) and gs.item() == pytest.approx(1 / tensors[key].item(), rel=1e-6)
    assert "model.layers.1.mlp.down_proj.weight_packed" in ct_tensors
    back = convert_checkpoint(ct, tmp_path / "back", "modelopt")
    a, b = _files(src), _files(back)
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1] == b[1] and a[2] == b[2]
    assert not (back / SIDECAR).exists()


def test_ct_to_modelopt_and_back_unchanged(tmp_path):
    model = _model("NVFP4")
    ct = save_compressed_tensors(model, tmp_path / "ct")
    mo = convert_checkpoint(ct, tmp_path / "mo", "modelopt")
    dense_ct = read_compressed_tensors(ct)
    dense_mo = read_modelopt(mo)
    for name in quant_linears(model):
        w = f"{name}.weight"
        torch.testing.assert_close(dense_mo[w], dense_ct[w], rtol=2**-20, atol=0)
    back = convert_checkpoint(mo, tmp_path / "back", "compressed-tensors")
    a, b = _files(ct), _files(back)
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[0].keys() == b[0].keys()
    assert a[1] == b[1]
