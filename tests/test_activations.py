"""Static activation calibration: closed-form scales, shared observers, degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantscale.algorithms.rtn import quantize_weight_rtn
from quantscale.calibration.activations import ActivationCalibrator
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import QuantArgs, QuantScheme, preset_scheme


def _ql(scheme: QuantScheme, inp: int = 16, out: int = 8) -> QuantLinear:
    torch.manual_seed(0)
    ql = QuantLinear.from_linear(nn.Linear(inp, out), scheme)
    w_hat, qp = quantize_weight_rtn(ql.weight.detach(), scheme.weights)
    ql.set_weight(w_hat, qp)
    return ql


def _w8a8(observer: str, strategy: str = "tensor", **kw) -> QuantScheme:
    scheme = preset_scheme("W8A8")
    act = QuantArgs(num_bits=8, strategy=strategy, observer=observer, observer_kwargs=kw)
    return scheme.model_copy(update={"input_activations": act})


def test_minmax_input_scale_closed_form():
    ql = _ql(_w8a8("minmax"))
    xs = [torch.randn(2, 5, 16), 3 * torch.randn(4, 16)]
    with ActivationCalibrator({"l": ql}) as cal:
        for x in xs:
            ql(x)
    cal.apply()
    amax = max(float(x.abs().max()) for x in xs)
    assert ql.input_scale.item() == pytest.approx(amax / 127, rel=1e-6)
    assert not cal._handles


def test_output_activations_observed_after_the_layer():
    scheme = _w8a8("minmax").model_copy(update={"output_activations": QuantArgs(num_bits=8)})
    ql = _ql(scheme)
    x = torch.randn(6, 16)
    with ActivationCalibrator({"l": ql}) as cal:
        y = ql(x).detach()
    cal.apply()
    assert ql.output_scale.item() == pytest.approx(float(y.abs().max()) / 127, rel=1e-6)


def test_modules_sharing_an_input_share_one_observer():
    scheme = _w8a8("percentile", alpha=0.99)
    mods = {n: _ql(scheme) for n in ("q", "k", "v")}
    with ActivationCalibrator(mods) as cal:
        for _ in range(2):
            x = torch.randn(32, 16)
            for m in mods.values():
                m(x)
    qps = cal.apply()
    counts = sorted(o.count for o in cal.observers.values())
    assert counts == [0, 0, 2]
    scales = {float(qps[(n, "input")].scale) for n in mods}
    assert len(scales) == 1 and all(m.input_scale.item() in scales for m in mods.values())


@pytest.mark.parametrize(
    "observer",
    ["minmax", "ema", "percentile", "mse", "aciq", "kl", "max_entropy", "percentile_mse"],
)
@pytest.mark.parametrize("value", [0.0, 2.5])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_zero_and_constant_activations_give_finite_scales(observer, value, strategy):
    if observer in ("kl", "max_entropy") and strategy == "channel":
        pytest.skip("the histogram observers are per-tensor only")
    ql = _ql(_w8a8(observer, strategy))
    x = torch.full((4, 16), value)
    x[:, 3] = 0.0  # an all-zero channel
    with ActivationCalibrator({"l": ql}) as cal:
        ql(x)
        ql(x)
    cal.apply()
    scale = ql.input_scale
    assert scale.shape == ((16,) if strategy == "channel" else (1,))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    out = ql(x)
    assert torch.isfinite(out).all()


def test_nvfp4_inputs_get_a_static_global_scale():
    ql = _ql(preset_scheme("NVFP4"), inp=32)
    x = torch.randn(4, 32)
    with ActivationCalibrator({"l": ql}) as cal:
        ql(x)
    cal.apply()
    assert ql.input_qparams() is None
    assert ql.input_global_scale.item() == pytest.approx(448 * 6 / float(x.abs().max()), rel=1e-5)


def test_static_scales_do_not_move_at_run_time():
    ql = _ql(_w8a8("minmax"))
    with ActivationCalibrator({"l": ql}) as cal:
        ql(torch.randn(8, 16))
    cal.apply()
    before = {k: v.clone() for k, v in ql.state_dict().items()}
    big = 100 * torch.randn(8, 16)
    out1 = ql(big)
    ql(torch.randn(3, 16))
    after = ql.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # outliers far beyond the calibrated range are clipped to it
    assert torch.equal(ql(big), out1)
    clip = 128 * ql.input_scale  # int8 grid [-128, 127]
    assert (ql._act(big, ql.scheme.input_activations, "input").abs() <= clip + 1e-6).all()


def test_mse_observer_sees_a_token_budget():
    ql = _ql(_w8a8("mse"))
    x = torch.randn(64, 16)
    with ActivationCalibrator({"l": ql}, token_budget={"mse": 8}) as cal:
        seen = []
        obs = cal.observers[("l", "input")]
        update = obs.update
        obs.update = lambda t: (seen.append(t.shape), update(t))
        ql(x)
        ql(x[:5])
    assert seen == [(8, 16), (5, 16)]
    assert cal.qparams()[("l", "input")].scale.item() <= float(x.abs().max()) / 127
