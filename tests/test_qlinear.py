"""QuantLinear: fake-quant forward, qparam buffers, save/load, dtype moves, replace_linears."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from quantscale.algorithms.rtn import quantize_weight_rtn
from quantscale.errors import QuantscaleError
from quantscale.qdq import QParams, dequantize, fake_quantize, quantize
from quantscale.runtime.qlinear import (
    QuantLinear,
    compute_dtype,
    matmul_kernel,
    quant_linears,
    replace_linears,
)
from quantscale.scheme import preset_recipe, preset_scheme


def _linear(inp: int = 32, out: int = 16, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(inp, out, bias=bias)


def _rtn(ql: QuantLinear) -> None:
    w_hat, qp = quantize_weight_rtn(ql.weight.detach(), ql.scheme.weights)
    ql.set_weight(w_hat, qp)


def test_set_weight_keeps_exact_codes():
    ql = QuantLinear.from_linear(_linear(), preset_scheme("W8A8"))
    assert ql.weight_qparams() is None
    _rtn(ql)
    args, qp = ql.scheme.weights, ql.weight_qparams()
    assert qp.scale.shape == (16, 1) and qp.scale.dtype == torch.float32
    codes = quantize(ql.weight, args, qp)
    assert torch.equal(dequantize(codes, args, qp), ql.weight.detach())


def test_static_input_scale_applied_only_once_calibrated():
    ql = QuantLinear.from_linear(_linear(), preset_scheme("W8A8"))
    _rtn(ql)
    x = torch.randn(3, 5, 32)
    plain = nn.functional.linear(x, ql.weight, ql.bias)
    assert torch.equal(ql(x), plain)  # not calibrated: inputs pass through
    qp = QParams(torch.tensor([0.02]))
    ql.set_input_qparams(qp)
    expected = nn.functional.linear(
        fake_quantize(x, ql.scheme.input_activations, qp), ql.weight, ql.bias
    )
    assert torch.equal(ql(x), expected)
    assert not torch.equal(ql(x), plain)


def test_state_dict_roundtrip_creates_buffers():
    scheme = preset_scheme("W4A16_ASYM")
    ql = QuantLinear.from_linear(_linear(256, 8), scheme)
    w_hat, qp = quantize_weight_rtn(ql.weight.detach(), scheme.weights)
    ql.set_weight(w_hat, qp, g_idx=torch.arange(256) // 128)
    buf = io.BytesIO()
    torch.save(ql.state_dict(), buf)
    buf.seek(0)
    fresh = QuantLinear(256, 8, True, scheme)
    fresh.load_state_dict(torch.load(buf))
    assert set(fresh.state_dict()) == set(ql.state_dict())
    assert torch.equal(fresh.weight_zero_point, qp.zero_point)
    assert fresh.weight_g_idx.dtype == torch.int32
    x = torch.randn(4, 256)
    assert torch.equal(fresh(x), ql(x))


def test_dtype_move_keeps_float32_scales():
    ql = QuantLinear.from_linear(_linear(), preset_scheme("W8A8"))
    _rtn(ql)
    ql.set_input_qparams(QParams(torch.tensor([1 / 3])))
    ql.to(torch.bfloat16)
    assert ql.weight.dtype == torch.bfloat16
    assert ql.weight_scale.dtype == torch.float32
    assert ql.input_scale.item() == pytest.approx(1 / 3, rel=1e-7)
    assert ql(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "NVFP4", "FP8_BLOCK", "W8A8_DYNAMIC"])
def test_dynamic_schemes_quantize_inputs(preset):
    ql = QuantLinear.from_linear(_linear(128, 128, bias=False), preset_scheme(preset))
    _rtn(ql)
    x = torch.randn(2, 7, 128)
    out = ql(x)
    plain = nn.functional.linear(x, ql.weight)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, plain)
    assert (out - plain).abs().max() < 0.2 * plain.abs().max()


def test_replace_linears_on_tiny_llama(tiny_llama):
    ids = torch.randint(0, 128, (1, 9))
    before = tiny_llama(input_ids=ids).logits
    replaced = replace_linears(tiny_llama, preset_recipe("W8A8"))
    assert len(replaced) == 2 * 7
    assert "lm_head" not in replaced and set(quant_linears(tiny_llama)) == set(replaced)
    assert all(type(m) is not nn.Linear for n, m in tiny_llama.named_modules() if n in replaced)
    # nothing quantized yet: same outputs
    assert torch.allclose(tiny_llama(input_ids=ids).logits, before)


def test_compute_dtype_context_runs_the_matmul_in_bf16():
    ql = QuantLinear.from_linear(_linear(64, 32), preset_scheme("W8A8"))
    _rtn(ql)
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = ql(x)
        with compute_dtype(torch.bfloat16):
            fast = ql(x)
    bf16 = nn.functional.linear(x.bfloat16(), ql.weight.bfloat16(), ql.bias.bfloat16()).float()
    assert fast.dtype == torch.float32 and torch.equal(fast, bf16)
    assert not torch.equal(fast, ref)
    assert float((fast - ref).abs().max()) < 0.02 * float(ref.abs().max())
    assert torch.equal(ql(x).detach(), ref)  # the context is left


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
def test_onednn_matmul_kernel_within_float32_rounding():
    ql = QuantLinear.from_linear(_linear(64, 32), preset_scheme("W8A8"))
    _rtn(ql)
    x = torch.randn(2, 4, 64)
    with torch.no_grad():
        ref = ql(x)
        with matmul_kernel("onednn"):
            fast = ql(x)
    assert fast.shape == ref.shape and fast.dtype == torch.float32
    assert float((fast - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    with matmul_kernel("onednn"):  # a gradient wanted: F.linear
        x.requires_grad_(True)
        ql(x).sum().backward()
    assert x.grad is not None
    with pytest.raises(QuantscaleError, match="matmul kernel"):
        with matmul_kernel("blas"):
            pass
