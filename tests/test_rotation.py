"""Hadamard rotations (algorithms.rotation, runtime.hadamard): the matrices are orthogonal,
the fused R1 / R2 / R4 keep the float model's logits, the online Hadamard reaches every hook,
rotated models reload with it, and an injected massive activation stops hurting W8A8."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import make_tiny_llama
from torch import nn

import quantscale as qs
from quantscale.algorithms.rotation import residual_rotation, rotate_down, rotate_model
from quantscale.algorithms.smoothing import SmoothQuant, smooth_model
from quantscale.calibration.activations import ActivationCalibrator
from quantscale.checkpoint.validate import validate_checkpoint
from quantscale.errors import QuantscaleError
from quantscale.export import export_model
from quantscale.export.fake_quant import save_quantized
from quantscale.models.quantized import load_quantized_checkpoint
from quantscale.orchestrator import load_model, quantize_model
from quantscale.runtime.hadamard import (
    add_online_hadamard,
    apply_hadamard,
    hadamard,
    hadamard_factors,
    has_online_hadamard,
    is_hadamard_size,
)
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import load_recipe, preset_scheme


def _ids(n: int = 4, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.double()


def _llama(dtype: torch.dtype = torch.float64, **config) -> nn.Module:
    """The tiny Llama with non-trivial norm weights (so that folding them matters)."""
    model = make_tiny_llama(dtype=dtype, **config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
    return model


@pytest.mark.parametrize("n", [1, 2, 12, 24, 28, 36, 64, 72, 576, 1536])
def test_hadamard_sizes_are_hadamard(n):
    h = hadamard(n)
    assert is_hadamard_size(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5), atol=1e-12)


@pytest.mark.parametrize("n", [6, 9, 18, 3 * 64])
def test_other_sizes_get_an_orthogonal_kronecker_block(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert is_hadamard_size(n) == (n == 3 * 64)  # 192 = 2^3 x 24 (Paley I, p = 23)
    assert torch.equal(h, hadamard(n))  # deterministic


@pytest.mark.parametrize("n", [1, 6, 64, 96, 576, 1536, 3 * 64 * 5])
def test_factored_online_hadamard_equals_the_dense_matrix(n):
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(apply_hadamard(x), x @ hadamard(n), atol=1e-12)
    assert len(hadamard_factors(1536)) == 2  # 64 x 24: two small matmuls per row


def test_residual_rotation_is_orthogonal_and_seeded():
    q = residual_rotation(576, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(576, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, residual_rotation(576, seed=3))
    assert not torch.equal(q, residual_rotation(576, seed=4))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_rotations_keep_the_float_logits(tied, bias):
    model = _llama(tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    ids = _ids()
    before = _logits(model, ids)
    rotate_model(model)
    after = _logits(model, ids)
    # transformers' RMSNorm computes in float32 internally: ~1e-7 relative is the floor
    assert (after - before).abs().max() < 1e-5 * before.abs().max()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert has_online_hadamard(layer.mlp.down_proj) and not has_online_hadamard(layer.mlp.up_proj)
    assert not torch.allclose(before, _logits(make_tiny_llama(dtype=torch.float64), ids))


def test_float32_rotation_keeps_logits_closely():
    model = _llama(torch.float32)
    ids = _ids()
    before = _logits(model, ids)
    after = _logits(rotate_model(model), ids)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()


def test_online_hadamard_with_offline_weight_keeps_outputs_and_reaches_hooks():
    torch.manual_seed(0)
    linear = nn.Linear(96, 8).double()
    x = torch.randn(5, 96, dtype=torch.float64)
    ref = linear(x)
    rotated = copy.deepcopy(linear)
    with torch.no_grad():
        rotated.weight.copy_(rotated.weight @ hadamard(96))
    assert not torch.allclose(rotated(x), ref)
    add_online_hadamard(rotated)
    add_online_hadamard(rotated)  # idempotent: one rotation, not two
    assert torch.allclose(rotated(x), ref, atol=1e-12)
    ql = QuantLinear.from_linear(rotated, preset_scheme("W8A8"))
    assert has_online_hadamard(ql) and torch.allclose(ql(x), ref, atol=1e-12)
    calibrator = ActivationCalibrator({"m": ql})  # its pre-hook comes after the rotation
    with calibrator:
        ql(x)
    amax = calibrator.observers[("m", "input")].amax().max()
    assert torch.isclose(amax.double(), (x @ hadamard(96)).abs().max(), rtol=1e-6)


def _massive(model: nn.Module, factor: float = 200.0) -> None:
    """A massive down_proj input channel (up_proj row 5 x factor, down_proj column 5 / factor:
    the float function is unchanged), like SmolLM2's layer 11 (3,160 against ~0.1)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[5] *= factor
            layer.mlp.down_proj.weight[:, 5] /= factor


def _w8a8_error(rotate: str | None) -> float:
    model = _llama(torch.float32)
    _massive(model)
    ids, calib = _ids(seed=1), _ids(8, seed=2)
    ref = _logits(model, ids)
    recipe = load_recipe("W8A8")
    recipe.rotate = rotate  # type: ignore[assignment]
    quantize_model(model, recipe, calib, "rtn")
    return float(((_logits(model, ids) - ref) ** 2).mean() / (ref**2).mean())


def test_rotation_lowers_w8a8_static_error_with_a_massive_channel():
    plain, rotated = _w8a8_error(None), _w8a8_error("hadamard")
    assert rotated < 0.5 * plain, (plain, rotated)


def _rotated_w8a8(kind: str = "hadamard") -> tuple[nn.Module, torch.Tensor]:
    model = _llama(torch.float32)
    recipe = load_recipe("W8A8")
    recipe.rotate = kind  # type: ignore[assignment]
    quantize_model(model, recipe, _ids(8, seed=2), "rtn")
    return model, _ids(seed=1)


def test_fake_quant_save_reloads_with_the_online_hadamard(tmp_path):
    model, ids = _rotated_w8a8()
    save_quantized(model, tmp_path / "q")
    loaded, _tok = load_model(tmp_path / "q")
    assert has_online_hadamard(loaded.model.layers[1].mlp.down_proj)
    assert loaded.quantscale_recipe.rotate == "hadamard"
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-5)


def test_compressed_tensors_export_records_the_transform_and_reloads(tmp_path):
    model, ids = _rotated_w8a8()
    out = export_model(model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    r4 = qc["transform_config"]["config_groups"]["R4"]
    assert r4["apply"] == [
        {"targets": ["re:.*mlp.down_proj$"], "location": "input", "inverse": False}
    ]
    transform = pytest.importorskip("compressed_tensors.transform")
    transform.TransformConfig.model_validate(qc["transform_config"])
    loaded = load_quantized_checkpoint(out)
    assert has_online_hadamard(loaded.model.layers[0].mlp.down_proj)
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-4)


def test_smoothing_a_down_proj_already_rotated_online_is_refused():
    model = rotate_model(_llama(torch.float32))
    with pytest.raises(QuantscaleError, match="rotated online"):
        smooth_model(model, "down=0.5", [_ids(4)])


def test_r4_after_down_smoothing_keeps_the_float_logits():
    """R1 + R2, then up_proj -> down_proj smoothing, then R4 per layer (`rotate_for`'s order):
    down_proj's weight is W diag(s) H and the logits stay the float model's."""
    model = _llama()
    _massive(model)
    ids = _ids()
    before = _logits(model, ids)
    rotate_model(model, online=False)
    assert not has_online_hadamard(model.model.layers[0].mlp.down_proj)
    smooth_model(model, "down=0.85", [_ids(4, seed=3)])
    for layer in model.model.layers:
        rotate_down(layer)
        rotate_down(layer)  # idempotent
    assert all(has_online_hadamard(layer.mlp.down_proj) for layer in model.model.layers)
    assert (_logits(model, ids) - before).abs().max() < 1e-5 * before.abs().max()


@pytest.mark.parametrize("given", [False, True])
def test_rotation_composes_with_smoothing_transforms(given):
    """`--rotate hadamard` with a down smoothing transform, or `--rotate hadamard-smooth`: the
    smoothing runs before R4 instead of being refused, and the online Hadamard is kept."""
    model = _llama(torch.float32)
    recipe = load_recipe("W8A8")
    recipe.rotate = "hadamard" if given else "hadamard-smooth"
    smooth = SmoothQuant("down=0.5") if given else SmoothQuant("qkv=0.5")
    quantize_model(model, recipe, _ids(4), "rtn", transforms=[smooth])
    assert len(smooth.scales) == 2
    assert all(has_online_hadamard(layer.mlp.down_proj) for layer in model.model.layers)
    assert model.quantscale_recipe.rotate == recipe.rotate


def test_hadamard_smooth_refuses_a_second_down_smoothing():
    recipe = load_recipe("W8A8")
    recipe.rotate = "hadamard-smooth"
    with pytest.raises(QuantscaleError, match="drop 'down'"):
        quantize_model(_llama(torch.float32), recipe, _ids(4), "rtn", 4, [SmoothQuant(0.5)])


def test_hadamard_smooth_lowers_w8a8_static_error_with_a_massive_channel():
    plain, rotated = _w8a8_error(None), _w8a8_error("hadamard")
    smoothed = _w8a8_error("hadamard-smooth")
    assert smoothed < 0.5 * plain and smoothed < 0.5 * rotated, (plain, rotated, smoothed)


def test_hadamard_smooth_exports_the_online_transform(tmp_path):
    model, ids = _rotated_w8a8("hadamard-smooth")
    out = export_model(model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["transform_config"]["config_groups"]) == {"R4"}
    loaded = load_quantized_checkpoint(out)
    assert loaded.quantscale_recipe.rotate == "hadamard"  # the same online transform
    assert has_online_hadamard(loaded.model.layers[1].mlp.down_proj)
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-4)


def test_quantized_or_unsupported_models_are_refused():
    model = _llama(torch.float32)
    quantize_model(model, "W8A16", None, "rtn")
    with pytest.raises(QuantscaleError, match="expected an nn.Linear"):
        rotate_model(model)
    with pytest.raises(QuantscaleError, match="--rotate"):
        from quantscale.algorithms.rotation import check_rotation

        check_rotation("spin")


def test_validate_names_the_runtimes_that_skip_the_online_hadamard(tmp_path):
    model, _ids_ = _rotated_w8a8()
    out = export_model(model, tmp_path / "ct", "compressed-tensors")
    report = validate_checkpoint(out, runtime="transformers")
    flagged = [f for f in report.errors if "transform_config" in f.message]
    assert [f.tensors for f in flagged] == [
        [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    ]
    assert not any("transform_config" in f.message for f in validate_checkpoint(out).errors)
    assert [f for f in validate_checkpoint(out).warnings if "transform_config" in f.message]
    vllm = validate_checkpoint(out, runtime="vllm")
    assert any("stores none" in f.message for f in vllm.errors)


def test_transformers_ignores_the_transform_config(tmp_path):
    """Pins the rule above: transformers + compressed-tensors attach no online Hadamard, so
    the rotated file runs wrongly there (unlike the same scheme without rotation)."""
    pytest.importorskip("compressed_tensors.transform")
    from transformers import AutoModelForCausalLM

    gaps = []
    for rotate in (False, True):
        model = _llama(torch.float32)
        recipe = load_recipe("W8A16")
        recipe.rotate = "hadamard" if rotate else None
        quantize_model(model, recipe, None, "rtn")
        out = export_model(model, tmp_path / f"ct{rotate}", "compressed-tensors")
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert not theirs.model.layers[0].mlp.down_proj._forward_pre_hooks
        ids = _ids(seed=1)
        gaps.append(float((_logits(theirs, ids) - _logits(model, ids)).abs().max()))
    assert gaps[1] > 10 * gaps[0], gaps


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mamba_out_proj_hadamard_keeps_float_outputs(kind):
    from test_mamba_quant import MAKERS
    from test_mamba_quant import _ids as mamba_ids
    from test_mamba_quant import _logits as mamba_logits

    from quantscale.mamba.mixers import MambaRecipe, resolve_points
    from quantscale.mamba.quamba import quantized_mixer

    model = MAKERS[kind]()
    ids = mamba_ids(0)
    ref = mamba_logits(model, ids)
    specs = resolve_points(kind, MambaRecipe(), 10**6)
    for layer in model.backbone.layers:
        layer.mixer = quantized_mixer(layer.mixer, kind, specs)
        layer.mixer.add_out_hadamard()
        layer.mixer.add_out_hadamard()  # idempotent
    assert model.backbone.layers[0].mixer.rotate
    torch.testing.assert_close(mamba_logits(model, ids), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["quamba1", "quamba2"])
def test_mamba_rotated_quamba_reloads_equal(method, tmp_path):
    from test_mamba_quant import _ids as mamba_ids
    from test_mamba_quant import _logits as mamba_logits
    from test_mamba_quant import _quantized

    from quantscale.mamba.quantize import load_quantized, save_quantized

    model = _quantized("mamba2", method=method, rotate="hadamard")
    assert all(layer.mixer.rotate for layer in model.backbone.layers)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert all(layer.mixer.rotate for layer in loaded.backbone.layers)
    ids = mamba_ids(5)
    torch.testing.assert_close(mamba_logits(loaded, ids), mamba_logits(model, ids))


def test_mamba_out_proj_hadamard_lowers_error_with_a_massive_channel():
    """An out_proj input channel made huge (D[3] x 20: the skip path of y's channel 3):
    the static INT8 error of that point (the only one quantized) falls once the Hadamard
    spreads it."""
    from test_mamba_quant import _batches, _mamba1
    from test_mamba_quant import _ids as mamba_ids
    from test_mamba_quant import _logits as mamba_logits

    from quantscale.mamba.mixers import ACTIVATION_POINTS, WEIGHT_POINTS, MambaRecipe, PointRule
    from quantscale.mamba.quantize import quantize_mamba

    points = [*ACTIVATION_POINTS["mamba"], *WEIGHT_POINTS["mamba"]]
    only_out = {p: PointRule(quantize=False) for p in points if p != "out_proj.input"}
    only_out["out_proj.input"] = PointRule(observer="minmax")
    errors = []
    for rotate in (None, "hadamard"):
        model = _mamba1()
        with torch.no_grad():
            for layer in model.backbone.layers:
                layer.mixer.D[3] *= 20.0
        ids = mamba_ids(9)
        ref = mamba_logits(model, ids)
        recipe = MambaRecipe(points=only_out, rotate=rotate)
        quantize_mamba(model, _batches(), recipe)
        errors.append(float(((mamba_logits(model, ids) - ref) ** 2).mean()))
    assert errors[1] < 0.2 * errors[0], errors


def test_quantize_command_rotates_a_mamba_model(tmp_path):
    """`quantscale quantize MAMBA OUT --rotate hadamard` records and reloads the Hadamard."""
    from test_mamba_quant import _tiny_checkpoint

    from quantscale import cli
    from quantscale.mamba.quantize import load_quantized

    model_dir, calib, _ = _tiny_checkpoint(tmp_path)
    calib_args = ["--calib-samples", "4", "--calib-seq-len", "32", "--calib-data", str(calib)]
    out = tmp_path / "q"
    argv = ["quantize", str(model_dir), str(out), "--scheme", "W8A8", "--rotate", "hadamard"]
    assert cli.main([*argv, *calib_args]) == 0
    loaded = load_quantized(out)
    assert loaded.config.quantization_config["recipe"]["rotate"] == "hadamard"
    assert all(layer.mixer.rotate for layer in loaded.backbone.layers)


def test_formats_that_cannot_record_the_online_hadamard_are_refused(tmp_path):
    model, _ids_ = _rotated_w8a8()
    with pytest.raises(QuantscaleError, match="not --format modelopt"):
        export_model(model, tmp_path / "mo", "modelopt")
    with pytest.raises(QuantscaleError, match="not --format pseudo"):
        qs.quantize(
            _llama(torch.float32),
            tmp_path / "p",
            "W8A16",
            "rtn",
            format="pseudo",
            rotate="hadamard",
        )
    with pytest.raises(QuantscaleError, match="omit --stream"):
        qs.quantize("smollm2", tmp_path / "s", "W8A16", "rtn", rotate="hadamard", stream=True)


def test_api_rotates_an_in_memory_model():
    model = _llama(torch.float32)
    ids = _ids(seed=1)
    ref = _logits(model, ids)
    qs.quantize(model, scheme="W8A16", method="rtn", rotate="hadamard")
    assert model.quantscale_recipe.rotate == "hadamard"
    assert has_online_hadamard(model.model.layers[0].mlp.down_proj)
    assert (_logits(model, ids) - ref).abs().max() < 0.05 * ref.abs().max()


def test_api_rotates_with_down_smoothing_and_refuses_it_for_mamba(tmp_path):
    from test_mamba_quant import _tiny_checkpoint

    model = _llama(torch.float32)
    ids = _ids(seed=1)
    ref = _logits(model, ids)
    qs.quantize(model, scheme="W8A8", method="rtn", rotate="hadamard-smooth", calibration=_ids(4))
    assert model.quantscale_recipe.rotate == "hadamard-smooth"
    assert has_online_hadamard(model.model.layers[0].mlp.down_proj)
    assert (_logits(model, ids) - ref).abs().max() < 0.05 * ref.abs().max()
    model_dir, calib, _ = _tiny_checkpoint(tmp_path)
    with pytest.raises(QuantscaleError, match="takes --rotate hadamard"):
        qs.quantize(model_dir, tmp_path / "q", "W8A8", rotate="hadamard-smooth", calibration=calib)
