"""`validate` on every layout we write: our own exports are clean, a broken one is named.

Before, validate held every checkpoint to the HF FP8 block rules: each compressed-tensors and
ModelOpt export got "quant_method is 'compressed-tensors'; FP8 block checkpoints need 'fp8'"
and "scale tensors have no weight next to them" errors.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_llama

from quantscale.checkpoint.validate import validate_checkpoint
from quantscale.cli import main
from quantscale.export import export_model
from quantscale.orchestrator import quantize_model

LAYOUTS = (
    [
        ("compressed-tensors", s)
        for s in ("W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16", "W4A16_ASYM", "FP8", "FP8_DYNAMIC")
    ]
    + [("compressed-tensors", s) for s in ("FP8_BLOCK", "NVFP4", "NVFP4A16", "MXFP4", "MXFP4A16")]
    + [("modelopt", "NVFP4"), ("modelopt", "NVFP4A16"), ("pseudo", "NVFP4A16")]
)


def _export(tmp_path, fmt: str, scheme: str, **config):
    model = make_tiny_llama(96, 128, 256, torch.bfloat16, **config)
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize_model(model, scheme, calib)
    return export_model(model, tmp_path / f"{scheme}-{fmt}", fmt)


@pytest.mark.parametrize(("fmt", "scheme"), LAYOUTS, ids=[f"{f}-{s}" for f, s in LAYOUTS])
def test_our_exports_validate_clean(tmp_path, fmt, scheme):
    # 4 KV heads: k_proj 128 rows, so vLLM's fused qkv_proj takes FP8_BLOCK's 128-row blocks
    # (2 heads' 64 rows are the merged-shard rule's case, tests/test_runtimes_vllm.py)
    report = validate_checkpoint(_export(tmp_path, fmt, scheme, num_key_value_heads=4))
    assert report.findings == [], [f.message for f in report.findings]


def _rewrite(path, edit) -> None:
    shard = path / "model.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)


def test_a_missing_scale_is_an_error_naming_the_tensor(tmp_path, capsys):
    out = _export(tmp_path, "compressed-tensors", "W4A16")
    _rewrite(out, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    report = validate_checkpoint(out)
    assert [f.code for f in report.errors] == ["layout"]
    assert "model.layers.1.mlp.up_proj" in report.errors[0].message
    assert main(["validate", str(out)]) == 1
    assert "model.layers.1.mlp.up_proj" in capsys.readouterr().out


def test_a_wrong_scale_shape_is_an_error_naming_the_tensor(tmp_path):
    out = _export(tmp_path, "modelopt", "NVFP4A16")
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    _rewrite(out, lambda t: t.__setitem__(name, t[name][:, :4].contiguous()))
    report = validate_checkpoint(out)
    assert [f.code for f in report.errors] == ["layout"]
    assert "k_proj" in report.errors[0].message


def test_a_config_without_quantized_tensors_is_an_error(tmp_path):
    import json

    plain = make_tiny_llama(96, 128, 256)
    path = tmp_path / "plain"
    plain.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    (path / "config.json").write_text(json.dumps(config))
    report = validate_checkpoint(path)
    assert [f.code for f in report.errors] == ["no-quantized-weights"]


def _fp8_codes(tensors, module: str, packed: bool = True) -> None:
    """Replace `module`'s stored weight by FP8 codes + a per-channel scale (as an FP8 export
    would store it), leaving the config as it was."""
    from quantscale.formats.fp8 import E4M3_MAX

    leaf = "weight_packed" if packed else "weight"
    rows = tensors.pop(f"{module}.{leaf}").shape[0]
    for extra in ("weight_scale", "weight_global_scale", "weight_scale_2", "weight_shape"):
        tensors.pop(f"{module}.{extra}", None)
    cols = 128 if "down_proj" not in module else 256
    w = torch.randn(rows, cols) * 0.02
    scale = w.abs().amax(1, keepdim=True) / E4M3_MAX
    tensors[f"{module}.weight"] = (w / scale).to(torch.float8_e4m3fn)
    tensors[f"{module}.weight_scale"] = scale.float()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_config_nvfp4_but_fp8_tensors_is_a_mismatch(tmp_path, fmt):
    out = _export(tmp_path, fmt, "NVFP4A16")
    module = "model.layers.1.mlp.down_proj"
    _rewrite(out, lambda t: _fp8_codes(t, module, packed=fmt == "compressed-tensors"))
    report = validate_checkpoint(out)
    found = [f for f in report.errors if f.code == "config-mismatch"]
    assert len(found) == 1 and found[0].tensors == [f"{module}.weight"]
    assert "stored as FP8" in found[0].message and "nvfp4" in found[0].message


def test_config_quantized_but_bf16_tensors_is_a_mismatch(tmp_path):
    out = _export(tmp_path, "compressed-tensors", "NVFP4A16")
    module = "model.layers.0.self_attn.v_proj"

    def to_bf16(tensors):
        rows = tensors.pop(f"{module}.weight_packed").shape[0]
        for extra in ("weight_scale", "weight_global_scale"):
            tensors.pop(f"{module}.{extra}")
        tensors[f"{module}.weight"] = torch.zeros(rows, 128, dtype=torch.bfloat16)

    _rewrite(out, to_bf16)
    found = [f for f in validate_checkpoint(out).errors if f.code == "config-mismatch"]
    assert len(found) == 1 and found[0].tensors == [f"{module}.weight"]
    assert "stored as BF16" in found[0].message
