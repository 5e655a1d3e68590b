"""Pseudo-quantized export (fp16 weights + scales file) loads as a plain fp16 model; the HF
fine-grained FP8 export holds FP8 block weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_llama

from quantscale.errors import QuantscaleError
from quantscale.export import EXPORTERS, export_model
from quantscale.export.base import quantized_modules
from quantscale.export.pseudo import dense_weight
from quantscale.formats.fp8 import E4M3
from quantscale.orchestrator import quantize_model


def _model(preset: str, **kw):
    model = make_tiny_llama(96, 128, 256, max_position_embeddings=64)
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, preset, tokens, method="gptq", batch_size=2, **kw)
    return model, tokens


@pytest.mark.parametrize(
    ("preset", "stem", "actorder"),
    [
        ("NVFP4A16", "pseudo_quantized_model-4bit-16g", None),
        ("W4A16", "pseudo_quantized_model-4bit-128g", "group"),
    ],
)
def test_pseudo_quantized_loads_as_plain_fp16(tmp_path, preset, stem, actorder):
    from transformers import AutoModelForCausalLM

    model, tokens = _model(preset, actorder=actorder)
    out = export_model(model, tmp_path / "pq", "pseudo", quantize_info={"quant_method": "gptq"})
    names = {p.name for p in out.iterdir()}
    assert {f"{stem}.safetensors", f"{stem}_scales.safetensors", "quantize_config.json"} <= names
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["bits"] == 4 and qcfg["quant_method"] == "gptq"
    assert qcfg["group_size"] == (16 if preset == "NVFP4A16" else 128)
    assert qcfg["desc_act"] == (actorder is not None)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float16
    params = dict(loaded.named_parameters())
    mods = quantized_modules(model)
    for name, mc in mods.items():
        assert torch.equal(params[f"{name}.weight"], dense_weight(mc))
        torch.testing.assert_close(
            params[f"{name}.weight"].float(), mc.module.weight, rtol=1e-3, atol=1e-5
        )
    scales = load_file(out / f"{stem}_scales.safetensors")
    q = "model.layers.0.self_attn.q_proj."
    if preset == "NVFP4A16":
        assert scales[q + "per_block_scale"].shape == (128, 8)
        assert torch.equal(
            scales[q + "per_block_scale"].to(E4M3).float(), scales[q + "per_block_scale"]
        )
        assert scales[q + "scale_2"].shape == ()
        assert scales[q + "scale_2"].item() * mods[
            q[:-1]
        ].qparams.global_scale.item() == pytest.approx(1)
    else:
        g_idx = scales[q + "g_idx"]
        assert torch.equal(g_idx, mods[q[:-1]].g_idx) and "scale_2" not in {
            k[len(q) :] for k in scales if k.startswith(q)
        }
    with torch.inference_mode():
        ref = model(input_ids=tokens).logits
        got = loaded(input_ids=tokens).logits.float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


def test_hf_fp8_block_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokens = _model("FP8_BLOCK")
    out = export_model(model, tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert qc["modules_to_not_convert"] == ["lm_head"]
    t = load_file(out / "model.safetensors")
    q = "model.layers.0.mlp.up_proj."
    assert t[q + "weight"].dtype == E4M3 and t[q + "weight_scale_inv"].shape == (2, 1)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.inference_mode():
        ref = model(input_ids=tokens).logits
        got = loaded(input_ids=tokens).logits.float()
    assert ((got - ref).norm() / ref.norm()).item() < 5e-2


def test_registry_and_refusals(tmp_path):
    assert set(EXPORTERS) == {"compressed-tensors", "modelopt", "pseudo", "hf", "gguf"}
    model, _ = _model("W4A16")
    with pytest.raises(QuantscaleError, match="FP8 block"):
        export_model(model, tmp_path / "x", "hf")
    with pytest.raises(QuantscaleError, match="unknown export format"):
        export_model(model, tmp_path / "y", "onnx")
    with pytest.raises(QuantscaleError, match="groups of 32"):
        export_model(model, tmp_path / "z", "gguf")
