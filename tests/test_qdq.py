"""Scheme-generic quantizer: per-strategy shapes, zero inputs, slices, RTN."""

import pytest
import torch

from quantscale.algorithms.rtn import quantize_weight_rtn
from quantscale.formats.fp4 import E2M1_VALUES, fake_quant_nvfp4
from quantscale.formats.mxfp4 import fake_quant_mxfp4
from quantscale.qdq import (
    ACTIVATION,
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_dynamic,
    quantize,
    reduce_minmax,
)
from quantscale.scheme import PRESETS, QuantArgs, preset_scheme

W_SHAPES = {
    "tensor": (1,),
    "channel": (48, 1),
    "group": (48, 3),
    "tensor_group": (48, 12),
    "block": (2, 2),
}


def _args(strategy: str, **kw) -> QuantArgs:
    extra = {
        "group": {"group_size": 64},
        "tensor_group": {"group_size": 16, "type": "float", "num_bits": 4},
        "block": {"block_structure": [32, 128]},
    }.get(strategy, {})
    return QuantArgs(strategy=strategy, **{**extra, **kw})


@pytest.mark.parametrize("strategy", list(W_SHAPES))
def test_weight_scale_shapes(strategy):
    w = torch.randn(48, 192)
    args = _args(strategy)
    mn, mx = reduce_minmax(w, args)
    assert mn.shape == mx.shape == W_SHAPES[strategy]
    qp = compute_qparams(args, mn, mx)
    assert qp.scale.shape == W_SHAPES[strategy] and qp.scale.dtype == torch.float32
    w_hat = fake_quantize(w, args, qp)
    assert w_hat.shape == w.shape and torch.isfinite(w_hat).all()


def test_activation_shapes():
    x = torch.randn(2, 5, 64)
    assert reduce_minmax(x, QuantArgs(strategy="token", dynamic=True), ACTIVATION)[0].shape == (
        2,
        5,
        1,
    )
    assert reduce_minmax(x, QuantArgs(strategy="channel"), ACTIVATION)[0].shape == (64,)
    assert reduce_minmax(x, QuantArgs(strategy="group", group_size=16), ACTIVATION)[0].shape == (
        2,
        5,
        4,
    )
    mn, _ = reduce_minmax(x, QuantArgs(strategy="channel"), ACTIVATION)
    assert torch.equal(mn, x.reshape(-1, 64).amin(0))


@pytest.mark.parametrize("name", list(PRESETS))
def test_all_zero_inputs_give_finite_scales_and_zero_output(name):
    scheme = preset_scheme(name)
    w = torch.zeros(32, 256)
    w_hat, qp = quantize_weight_rtn(w, scheme.weights)
    assert torch.isfinite(qp.scale).all() and (qp.scale > 0).all()
    assert torch.equal(w_hat, w)
    if scheme.input_activations is not None:
        x = torch.zeros(2, 3, 256)
        assert torch.equal(fake_quantize_dynamic(x, scheme.input_activations), x)


def test_int_symmetric_and_asymmetric_scales():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    sym = QuantArgs(num_bits=4, strategy="channel")
    mn, mx = reduce_minmax(w, sym)
    assert float(compute_qparams(sym, mn, mx).scale) == pytest.approx(2.0 / 7)
    asym = QuantArgs(num_bits=4, strategy="channel", symmetric=False)
    qp = compute_qparams(asym, mn, mx)
    assert float(qp.scale) == pytest.approx(3.0 / 15)
    assert float(qp.zero_point) == -3.0  # round(-8 - (-1)/0.2)
    q = quantize(w, asym, qp)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    assert torch.allclose(dequantize(q, asym, qp), w, atol=0.1)


def test_fp8_scale_is_amax_over_448():
    w = torch.randn(8, 16)
    args = preset_scheme("FP8").weights
    _, qp = quantize_weight_rtn(w, args)
    assert float(qp.scale) == pytest.approx(float(w.abs().max()) / 448)
    assert quantize(w, args, qp).dtype == torch.float8_e4m3fn


def test_nvfp4_matches_format_module_and_stores_e4m3_scales():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    args = preset_scheme("NVFP4A16").weights
    w_hat, qp = quantize_weight_rtn(w, args)
    assert qp.global_scale is not None
    assert float(qp.global_scale) == pytest.approx(448 * 6 / float(w.abs().max()))
    assert torch.equal(qp.scale.to(torch.float8_e4m3fn).float(), qp.scale)
    assert (w_hat - fake_quant_nvfp4(w)).abs().max() < 1e-5
    codes = quantize(w, args, qp)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.allclose(dequantize(codes, args, qp), w_hat)
    unit = dequantize(codes, args, QParams(torch.ones(16, 4)))  # scale 1: raw E2M1 values
    assert set(unit.abs().unique().tolist()) <= set(E2M1_VALUES)


def test_mxfp4_matches_format_module():
    w = torch.randn(8, 64)
    w_hat, qp = quantize_weight_rtn(w, preset_scheme("MXFP4A16").weights)
    assert torch.equal(w_hat, fake_quant_mxfp4(w))
    assert torch.equal(torch.log2(qp.scale), torch.log2(qp.scale).round())


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM", "NVFP4A16", "MXFP4A16"])
def test_column_slices_with_group_scales_match_whole_tensor(name):
    """GPTQ quantizes one column (or one group) at a time with the matching group scales."""
    torch.manual_seed(3)
    args = preset_scheme(name).weights
    w = torch.randn(8, 256)
    w_hat, qp = quantize_weight_rtn(w, args)
    g = args.group_size
    cols = []
    for j in range(w.shape[1]):
        k = j // g
        sl = QParams(
            qp.scale[:, k : k + 1],
            None if qp.zero_point is None else qp.zero_point[:, k : k + 1],
            qp.global_scale,
        )
        cols.append(fake_quantize(w[:, j : j + 1], args, sl))
    assert torch.equal(torch.cat(cols, dim=1), w_hat)
    blk = fake_quantize(
        w[:, g : 3 * g],
        args,
        QParams(
            qp.scale[:, 1:3],
            None if qp.zero_point is None else qp.zero_point[:, 1:3],
            qp.global_scale,
        ),
    )
    assert torch.equal(blk, w_hat[:, g : 3 * g])


def test_block_strategy_edge_tiles():
    w = torch.randn(130, 200)
    args = preset_scheme("FP8_BLOCK").weights
    w_hat, qp = quantize_weight_rtn(w, args)
    assert qp.scale.shape == (2, 2)
    assert float(qp.scale[1, 1]) == pytest.approx(float(w[128:, 128:].abs().max()) / 448)
    assert ((w_hat - w).abs() <= w.abs() * 0.07 + 1e-3).all()


def test_rtn_error_ordering():
    torch.manual_seed(0)
    w = torch.randn(64, 256)

    def rel(name):
        w_hat, _ = quantize_weight_rtn(w, preset_scheme(name).weights)
        return float(((w_hat - w) ** 2).sum() / (w**2).sum())

    assert rel("W8A16") < rel("FP8_DYNAMIC") < rel("NVFP4A16") < rel("W4A16")


def test_rtn_with_mse_observer_beats_minmax_at_4_bits():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    base = QuantArgs(num_bits=4, strategy="channel")
    w1, _ = quantize_weight_rtn(w, base)
    w2, _ = quantize_weight_rtn(w, base.model_copy(update={"observer": "mse"}))
    assert ((w2 - w) ** 2).sum() < ((w1 - w) ** 2).sum()
