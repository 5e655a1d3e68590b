"""Observers against closed-form cases."""

import math

import numpy as np
import pytest
import torch

from quantscale.errors import QuantscaleError
from quantscale.observers import (
    OBSERVERS,
    Observer,
    aciq_alpha,
    get_observer,
    kl_threshold_bin,
    register_observer,
    row_quantile,
)
from quantscale.scheme import QuantArgs


def test_registry_names_and_unknown():
    for name in ("minmax", "ema", "percentile", "mse", "aciq", "kl", "static_minmax"):
        assert name in OBSERVERS
    with pytest.raises(QuantscaleError, match="unknown observer"):
        get_observer("nope")

    @register_observer("test_const")
    class Const(Observer):
        def observe(self, rows):
            return -torch.ones(rows.shape[0]), torch.ones(rows.shape[0])

    assert get_observer("TEST_CONST").update(torch.zeros(3)) is None
    OBSERVERS.pop("test_const")


def test_minmax_running_and_per_channel_axis():
    obs = get_observer("minmax")
    obs.update(torch.tensor([-1.0, 2.0]))
    obs.update(torch.tensor([-3.0, 1.0]))
    mn, mx = obs.min_max()
    assert (float(mn), float(mx)) == (-3.0, 2.0)
    assert float(obs.amax()) == 3.0
    per = get_observer("minmax", axis=1)
    per.update(torch.tensor([[1.0, -5.0, 0.5], [2.0, 4.0, -0.5]]))
    assert per.min_max()[1].tolist() == [2.0, 4.0, 0.5]


def test_per_tensor_range_is_the_per_row_one():
    """The one-row fast path (a full aminmax) gives what the per-row reduction gives."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16) * 5
    obs = get_observer("minmax", args=QuantArgs(strategy="tensor"))
    obs.update(x)
    mn, mx = torch.aminmax(x.reshape(1, -1), dim=1)
    assert obs.min_max()[0].shape == (1,)
    assert torch.equal(obs.min_max()[0], mn) and torch.equal(obs.min_max()[1], mx)


def test_ema_formula():
    obs = get_observer("ema", sigma=0.1)
    obs.update(torch.tensor([-1.0, 1.0]))
    obs.update(torch.tensor([-1.0, 3.0]))
    obs.update(torch.tensor([-1.0, 0.0]))
    w = 1.0
    for cur in (3.0, 0.0):
        w += 0.1 * (cur - w)
    assert float(obs.min_max()[1]) == pytest.approx(w)


def test_percentile_equals_order_statistic_and_torch_quantile():
    x = torch.arange(1, 10001, dtype=torch.float32)[torch.randperm(10000)]
    obs = get_observer("percentile", alpha=0.999)
    obs.update(x)
    # position 0.999 * 9999 = 9989.001 between the 9990th and 9991st values (9990, 9991)
    assert float(obs.amax()) == pytest.approx(9990.001, abs=1e-3)
    rows = torch.randn(3, 5000)
    for q in (0.5, 0.9, 0.9995, 1.0):
        assert torch.allclose(row_quantile(rows, q), torch.quantile(rows, q, dim=1))


def test_percentile_uses_kthvalue_path_and_ema(monkeypatch):
    import quantscale.observers.percentile as pct

    monkeypatch.setattr(pct, "_TOPK_LIMIT", 4)
    rows = torch.randn(2, 3000)
    assert torch.allclose(row_quantile(rows, 0.7), torch.quantile(rows, 0.7, dim=1))
    obs = get_observer("percentile", alpha=1.0, sigma=0.5)
    obs.update(torch.tensor([2.0, -1.0]))
    obs.update(torch.tensor([4.0]))
    assert float(obs.amax()) == 3.0


def test_percentile_handles_large_activation_without_quantile_limit():
    x = torch.randn(17_000_000)  # above torch.quantile's 16M-element limit
    obs = get_observer("percentile", alpha=0.9995)
    obs.update(x)
    # |N(0,1)| 0.9995 quantile is 3.48
    assert float(obs.amax()) == pytest.approx(3.48, abs=0.03)


def test_aciq_constants_and_clipping_on_gaussian():
    assert aciq_alpha(4, "laplace") == pytest.approx(5.03, abs=0.01)
    assert aciq_alpha(2, "laplace") == pytest.approx(2.83, abs=0.01)
    assert aciq_alpha(4, "gauss") == pytest.approx(2.55, abs=0.01)
    assert aciq_alpha(8, "gauss") == pytest.approx(3.92, abs=0.01)
    torch.manual_seed(0)
    x = torch.randn(200_000)
    obs = get_observer("aciq", args=QuantArgs(num_bits=4), dist="gauss")
    obs.update(x)
    assert float(obs.amax()) == pytest.approx(2.55, abs=0.05)
    assert float(obs.amax()) < float(x.abs().max())


def test_mse_clips_gaussian_below_max_and_lowers_error():
    torch.manual_seed(0)
    x = torch.randn(50_000)
    args = QuantArgs(num_bits=4)
    obs = get_observer("mse", args=args)
    obs.update(x)
    clip = float(obs.amax())
    assert clip < 0.9 * float(x.abs().max())

    def err(a):
        s = a / 7
        return float(((torch.clamp(torch.round(x / s), -8, 7) * s - x) ** 2).mean())

    assert err(clip) < err(float(x.abs().max()))


def test_kl_clips_a_long_tail():
    hist = np.floor(1e6 * np.exp(-np.arange(2048) / 40.0))  # Laplace-like body
    hist[2047] = 1.0  # one far outlier
    last_body_bin = int(np.nonzero(hist[:2047])[0].max())
    i = kl_threshold_bin(hist, 128)
    assert 128 <= i <= last_body_bin  # clips the outlier and part of the tail
    torch.manual_seed(0)
    x = torch.cat([torch.randn(100_000), torch.tensor([60.0])])
    obs = get_observer("kl", args=QuantArgs(num_bits=8))
    obs.update(x[:50_001])
    obs.update(x[50_001:])  # the outlier grows the histogram range
    t = float(obs.amax())
    assert 3.0 < t < 20.0


def test_kl_uniform_keeps_full_range():
    hist = np.ones(512)
    assert kl_threshold_bin(hist, 128) >= 500


def test_observer_errors():
    with pytest.raises(QuantscaleError, match="no data"):
        get_observer("minmax").min_max()
    with pytest.raises(QuantscaleError):
        get_observer("kl", axis=0).update(torch.randn(4, 4))
    obs = get_observer("minmax", args=QuantArgs(strategy="channel"), role="weight")
    obs.update(torch.randn(4, 8))
    with pytest.raises(QuantscaleError, match="shape changed"):
        obs.update(torch.randn(5, 8))


def test_weight_group_observer_shape():
    args = QuantArgs(num_bits=4, strategy="group", group_size=32, observer="mse")
    obs = get_observer("mse", args=args, role="weight", grid=10)
    obs.update(torch.randn(6, 64))
    mn, mx = obs.min_max()
    assert mn.shape == mx.shape == (6, 2)
    assert math.isfinite(float(mx.sum()))


def test_local_dynamic_args_observe_a_per_tensor_range():
    from quantscale.qdq import nvfp4_global_scale
    from quantscale.scheme import preset_scheme

    args = preset_scheme("NVFP4").input_activations
    obs = get_observer("minmax", args=args)
    obs.update(torch.tensor([[1.0, -2.0] * 16]))
    obs.update(torch.tensor([[3.0, 0.0] * 8, [0.5, 0.5] * 8]))  # other batch shape
    assert obs.amax().shape == (1,) and float(obs.amax()) == 3.0
    assert float(nvfp4_global_scale(obs.amax())) == pytest.approx(448 * 6 / 3.0)
