"""Real INT8 x INT8 -> INT32 matmul and its agreement with fake-quant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantscale.algorithms.rtn import quantize_weight_rtn
from quantscale.errors import QuantscaleError
from quantscale.qdq import QParams
from quantscale.runtime.int8 import int_matmul, supports_int8
from quantscale.runtime.qlinear import QuantLinear
from quantscale.scheme import preset_scheme


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (5, 64, 33), (17, 576, 64)])
def test_int_matmul_exact(m, k, n):
    torch.manual_seed(m)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    out = int_matmul(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ b.long())


def test_supports_int8():
    assert supports_int8(preset_scheme("W8A8"))
    assert supports_int8(preset_scheme("W8A8_DYNAMIC"))
    for name in ("FP8", "W4A16", "W8A16", "NVFP4"):
        assert not supports_int8(preset_scheme(name))


@pytest.mark.parametrize("preset", ["W8A8", "W8A8_DYNAMIC"])
def test_int8_path_matches_fake_quant(preset):
    torch.manual_seed(1)
    ql = QuantLinear.from_linear(nn.Linear(96, 40), preset_scheme(preset))
    w_hat, qp = quantize_weight_rtn(ql.weight.detach(), ql.scheme.weights)
    ql.set_weight(w_hat, qp)
    x = torch.randn(3, 11, 96)
    if preset == "W8A8":
        ql.set_input_qparams(QParams(x.abs().amax().reshape(1) / 127 * 0.8))  # some clipping
    fake = ql(x)
    ql.use_int8 = True
    real = ql(x)
    assert ql._w_int8 is not None and ql._w_int8.dtype == torch.int8
    assert torch.allclose(real, fake, rtol=1e-5, atol=1e-5)
    assert not torch.equal(real, nn.functional.linear(x, ql.weight, ql.bias))


def _rtn_quant_linear(preset: str) -> QuantLinear:
    torch.manual_seed(2)
    ql = QuantLinear.from_linear(nn.Linear(64, 24), preset_scheme(preset))
    w_hat, qp = quantize_weight_rtn(ql.weight.detach(), ql.scheme.weights)
    ql.set_weight(w_hat, qp)
    return ql


@pytest.mark.parametrize("preset", ["W8A16", "W8A8"])
def test_use_int8_falls_back_where_the_int8_matmul_does_not_apply(preset):
    """Weight-only schemes, and static W8A8 before calibration, keep the fake-quant path."""
    ql = _rtn_quant_linear(preset)
    x = torch.randn(2, 5, 64)
    fake = ql(x)
    ql.use_int8 = True
    assert torch.equal(ql(x), fake)
    assert ql._w_int8 is None


def test_int8_weight_needs_a_quantized_weight():
    ql = QuantLinear.from_linear(nn.Linear(64, 24), preset_scheme("W8A8"))
    with pytest.raises(QuantscaleError, match="not quantized"):
        ql.int8_weight()
