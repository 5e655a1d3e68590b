"""Pseudo-quantized checkpoints (fp16 + `_scales`) read back and repacked into packed NVFP4 /
INT4: the codes and block scales equal those of a direct export of the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_llama

from quantscale import cli
from quantscale.checkpoint.read import Checkpoint
from quantscale.errors import CheckpointError
from quantscale.export import export_model
from quantscale.export.repack import load_pseudo_checkpoint
from quantscale.orchestrator import quantize_model


def _exports(tmp_path, preset: str, direct: str, **kw):
    model = make_tiny_llama(96, 128, 256, max_position_embeddings=64)
    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, preset, tokens, method="gptq", batch_size=2, **kw)
    pseudo = export_model(model, tmp_path / "pseudo", "pseudo")
    ref = export_model(model, tmp_path / "direct", direct)
    return model, tokens, pseudo, ref


def _tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {n: ckpt.get(n) for n in ckpt.names()}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.float().view(torch.int32) - b.float().view(torch.int32)).abs().max())


@pytest.mark.parametrize("to", ["compressed-tensors", "modelopt"])
def test_nvfp4_repack_matches_direct_export(tmp_path, to):
    model, tokens, pseudo, ref = _exports(tmp_path, "NVFP4A16", to)
    assert json.loads((pseudo / "quantize_config.json").read_text())["format"] == "nvfp4"
    assert cli.main(["convert", str(pseudo), str(tmp_path / "re"), "--to", to]) == 0
    got, want = _tensors(tmp_path / "re"), _tensors(ref)
    assert set(got) == set(want)
    scales = {"weight_global_scale", "weight_scale_2"}
    for name, t in want.items():
        if name.rpartition(".")[2] in scales:
            assert _ulps(got[name], t) <= 1, name  # 1/(1/g) in float32
        elif name.endswith((".weight_packed", ".weight_scale")) or "layers" in name:
            assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
    cfg = json.loads((tmp_path / "re" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == ("modelopt" if to == "modelopt" else to)


def test_int4_act_order_repack_matches_direct_export(tmp_path):
    _, _, pseudo, ref = _exports(tmp_path, "W4A16", "compressed-tensors", actorder="group")
    model = load_pseudo_checkpoint(pseudo)
    assert "lm_head" in model.quantscale_recipe.ignore
    out = export_model(model, tmp_path / "re", "compressed-tensors", recipe=model.quantscale_recipe)
    got, want = _tensors(out), _tensors(ref)
    for name in [n for n in want if n.endswith((".weight_packed", ".weight_g_idx"))]:
        assert torch.equal(got[name], want[name]), name
    for name in [n for n in want if n.endswith(".weight_scale")]:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_weights_off_their_grid_are_refused(tmp_path):
    _, _, pseudo, _ = _exports(tmp_path, "NVFP4A16", "compressed-tensors")
    scales_file = next(pseudo.glob("*_scales.safetensors"))
    scales = load_file(scales_file)
    name = "model.layers.0.mlp.up_proj.per_block_scale"
    scales[name] = scales[name] * 2  # the dense weight no longer matches its codes' grid
    save_file(scales, scales_file)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj: the dense weight"):
        load_pseudo_checkpoint(pseudo)
    (pseudo / "quantize_config.json").write_text(json.dumps({"checkpoint_format": "x"}))
    with pytest.raises(CheckpointError, match="not a pseudo-quantized checkpoint"):
        load_pseudo_checkpoint(pseudo)


def test_a_foreign_quantize_config_does_not_divert_convert(tmp_path):
    from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
    from quantscale.checkpoint.synthetic import write_llama_like

    src = write_llama_like(tmp_path / "bf16", hidden=128, intermediate=256, layers=1)
    fp8 = quantize_checkpoint_fp8(src, tmp_path / "fp8")
    (fp8 / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    assert cli.main(["convert", str(fp8), str(tmp_path / "ct"), "--to", "compressed-tensors"]) == 0
    assert Checkpoint(tmp_path / "ct").quantization_config["quant_method"] == "compressed-tensors"
