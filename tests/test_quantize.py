"""quantize_model on a tiny Llama: layerwise static scales, algorithms, save/load."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama
from torch import nn

from quantscale.algorithms.base import ALGORITHMS, register_algorithm
from quantscale.errors import QuantscaleError
from quantscale.export.fake_quant import save_quantized
from quantscale.observers import get_observer
from quantscale.orchestrator import load_model, quantize_model
from quantscale.runtime.qlinear import QuantLinear, quant_linears
from quantscale.scheme import preset_recipe


def _batches(n: int = 6, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_w8a8_static_scales_set_and_really_static(tiny_llama, tmp_path):
    ids = _batches(2, 16, seed=5)
    ref = _logits(tiny_llama, ids)
    linears = quantize_model(tiny_llama, "W8A8", _batches(), batch_size=2)
    assert len(linears) == 14
    for ql in linears.values():
        assert ql.weight_scale.shape == (ql.out_features, 1)
        assert ql.input_scale.shape == (1,) and ql.input_scale.item() > 0
    out = _logits(tiny_llama, ids)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items() if "_scale" in k}
    _logits(tiny_llama, _batches(3, 20, seed=9))  # different inputs
    again = _logits(tiny_llama, ids)
    assert torch.equal(again, out)
    assert all(torch.equal(tiny_llama.state_dict()[k], v) for k, v in state.items())
    # save / load reproduces outputs and scales
    save_quantized(tiny_llama, tmp_path / "q")
    loaded, tokenizer = load_model(tmp_path / "q")
    assert tokenizer is None
    assert set(quant_linears(loaded)) == set(linears)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(_logits(loaded, ids), out)


def test_layer_inputs_come_from_quantized_layers(tiny_llama):
    """Layer 1's static input scale equals the range of its inputs in the quantized model."""
    data = _batches()
    quantize_model(tiny_llama, "W8A8", data, batch_size=2)
    q1 = tiny_llama.model.layers[1].self_attn.q_proj
    obs = get_observer("minmax", args=q1.scheme.input_activations)
    handle = q1.register_forward_pre_hook(lambda _m, a: obs.update(a[0]))
    for ids in data.split(2):
        _logits(tiny_llama, ids)
    handle.remove()
    assert q1.input_scale.item() == pytest.approx(float(obs.amax()) / 127, rel=1e-5)


def test_rtn_weight_only_needs_no_data(tiny_llama):
    linears = quantize_model(tiny_llama, "W4A16")
    ql = next(iter(linears.values()))
    assert ql.weight_scale.shape == (
        ql.out_features,
        ql.in_features // 128 + (ql.in_features % 128 > 0),
    )
    assert ql.weight.unique().numel() <= 16 * ql.weight_scale.numel()


def test_static_activations_without_data_refused(tiny_llama):
    with pytest.raises(QuantscaleError, match="calibration batches"):
        quantize_model(tiny_llama, "W8A8")


def test_overrides_keep_first_layer_float(tiny_llama):
    recipe = preset_recipe("FP8")
    recipe = recipe.model_copy(update={"overrides": {r"re:model\.layers\.0\.": None}})
    linears = quantize_model(tiny_llama, recipe, _batches(4), batch_size=2)
    assert all(n.startswith("model.layers.1.") for n in linears)
    assert type(tiny_llama.model.layers[0].mlp.down_proj) is nn.Linear


def test_registered_algorithm_sees_each_layer(tiny_llama):
    calls = []

    @register_algorithm("probe")
    class Probe:
        needs_data = True
        true_sequential = False

        def start_layer(self, linears):
            self.seen = {n: 0 for n in linears}
            self.handles = [
                m.register_forward_pre_hook(
                    lambda _m, a, n=n: self.seen.__setitem__(n, self.seen[n] + 1)
                )
                for n, m in linears.items()
            ]

        def finish_layer(self, linears):
            for h in self.handles:
                h.remove()
            calls.append(dict(self.seen))
            for ql in linears.values():
                assert isinstance(ql, QuantLinear)
                ql.set_weight(torch.zeros_like(ql.weight), ql.weight_qparams() or _unit())

    def _unit():
        from quantscale.qdq import QParams

        return QParams(torch.ones(1))

    try:
        quantize_model(tiny_llama, "W8A16", _batches(4), method="probe", batch_size=2)
    finally:
        ALGORITHMS.pop("probe")
    assert len(calls) == 2
    assert all(set(c.values()) == {2} and len(c) == 7 for c in calls)  # 2 batches per layer
    assert all((ql.weight == 0).all() for ql in quant_linears(tiny_llama).values())


def test_calibrate_command_recipe_options():
    import argparse

    from quantscale.commands.calibrate import build_recipe

    ns = argparse.Namespace(scheme="FP8", observer="percentile", alpha=0.999, sigma=None)
    acts = build_recipe(ns).scheme_for("model.layers.0.mlp.up_proj").input_activations
    assert acts.observer == "percentile" and acts.observer_kwargs == {"alpha": 0.999}
    assert acts.type == "float" and not acts.dynamic


@pytest.mark.parametrize(("preset", "forwards"), [("W4A16", False), ("W8A8", True)])
def test_weight_only_rtn_runs_no_forward_even_with_batches(tiny_llama, preset, forwards):
    calls = []
    tiny_llama.model.embed_tokens.register_forward_pre_hook(lambda *_a: calls.append(1))
    quantize_model(tiny_llama, preset, _batches(), batch_size=2)
    assert bool(calls) == forwards  # static activations (W8A8) do need the forwards


def test_rtn_shares_fused_nvfp4_global_scales(tiny_llama):
    from quantscale.qdq import nvfp4_global_scale

    attn = tiny_llama.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(3)  # k has the largest amax of q/k/v
    k_amax = attn.k_proj.weight.abs().max()
    linears = quantize_model(tiny_llama, "NVFP4A16")
    for prefix, leaves in (
        ("self_attn.", ("q_proj", "k_proj", "v_proj")),
        ("mlp.", ("gate_proj", "up_proj")),
    ):
        mods = [linears[f"model.layers.0.{prefix}{p}"] for p in leaves]
        for m in mods:
            assert torch.equal(m.weight_global_scale, mods[0].weight_global_scale)
            assert m.weight_scale.shape == (m.out_features, m.in_features // 16)
    torch.testing.assert_close(
        linears["model.layers.0.self_attn.q_proj"].weight_global_scale, nvfp4_global_scale(k_amax)
    )


@pytest.mark.parametrize("preset", ["W4A16", "W4A16_ASYM", "W8A16", "FP8_DYNAMIC"])
def test_rtn_scales_of_a_bf16_model_are_bf16_exact(preset):
    from quantscale.qdq import QParams, fake_quantize

    model = make_tiny_llama(dtype=torch.bfloat16)
    for ql in quantize_model(model, preset).values():
        qp = ql.weight_qparams()
        assert torch.equal(qp.scale.bfloat16().float(), qp.scale)
        bf16 = QParams(qp.scale.bfloat16(), qp.zero_point)  # as runtimes hold them
        assert torch.equal(fake_quantize(ql.weight, ql.scheme.weights, bf16), ql.weight)


def test_symmetric_int_scales_use_the_full_code_range():
    from quantscale.algorithms.rtn import rtn_weight
    from quantscale.qdq import quantize
    from quantscale.scheme import preset_scheme

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    args = preset_scheme("W4A16").weights
    w_hat, qp = rtn_weight(w, args)
    amax = w.reshape(64, 2, 128).abs().amax(-1)
    torch.testing.assert_close(qp.scale, amax / 7.5)  # not amax / 7
    codes = quantize(w_hat, args, qp)
    assert codes.min() == -8 and codes.max() == 7
    assert (w_hat - w).abs().max() <= 0.5 * qp.scale.max() + 1e-6


def test_calibrate_command_smoothing_options_and_alpha_summary():
    import argparse

    from quantscale.commands import calibrate

    parser = argparse.ArgumentParser()
    calibrate.register(parser.add_subparsers())
    args = parser.parse_args(["calibrate", "m", "out", "--smooth", "search"])
    assert args.smooth_objective == "mse"
    args = parser.parse_args(["calibrate", "m", "o", "--smooth-objective", "relative"])
    assert args.smooth_objective == "relative"
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "m", "o", "--smooth-objective", "max"])
    chosen = {"l.0": {"qkv": 0.9, "down": 0.95}, "l.1": {"qkv": 0.8, "down": 0.95}}
    lines = calibrate.alphas_summary(chosen).splitlines()
    assert lines[1:] == ["  qkv: 0.8 x1, 0.9 x1", "  down: 0.95 x2"]
