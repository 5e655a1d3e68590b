"""E2M1 code points and rounding, FP4 nibble packing, NVFP4 and MXFP4."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantscale.formats.fp4 import (
    E2M1_BOUNDARIES,
    E2M1_VALUES,
    dequantize_nvfp4,
    e2m1_decode,
    e2m1_encode,
    e2m1_round,
    fake_quant_nvfp4,
    nvfp4_scale_2,
    pack_fp4,
    quantize_nvfp4,
    unpack_fp4,
)
from quantscale.formats.mxfp4 import (
    dequantize_mxfp4,
    mx_scale_exponent,
    mx_scale_value,
    quantize_mxfp4,
)


def test_every_code_point_decodes_and_re_encodes():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_decode(codes)
    assert vals[:8].tolist() == list(E2M1_VALUES)
    assert vals[8:].tolist() == [-v for v in E2M1_VALUES]
    assert torch.equal(e2m1_encode(vals), codes)  # -0.0 keeps code 8


@pytest.mark.parametrize("bound,tie_up", E2M1_BOUNDARIES)
def test_rounding_at_each_boundary(bound, tie_up):
    vals = list(E2M1_VALUES)
    lo = max(v for v in vals if v < bound)
    hi = min(v for v in vals if v > bound)
    eps = 1e-3
    x = torch.tensor([bound - eps, bound, bound + eps])
    assert e2m1_round(x).tolist() == [lo, hi if tie_up else lo, hi]
    assert e2m1_round(-x).tolist() == [-lo, -(hi if tie_up else lo), -hi]
    # ties go to the even index (even mantissa)
    tie = e2m1_encode(torch.tensor([bound]))
    assert int(tie) % 2 == 0


def test_rounding_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.quantization.utils.fp4_utils")
    x = torch.linspace(-8, 8, 6401)  # step 0.0025 hits every boundary exactly
    assert torch.equal(e2m1_round(x), ct.cast_to_fp4(x.clone()))


def test_saturates_at_six():
    assert e2m1_round(torch.tensor([7.0, -100.0, 5.01])).tolist() == [6.0, -6.0, 6.0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 15), min_size=1, max_size=40).map(lambda v: v + v[:1] * (len(v) % 2))
)
def test_pack_unpack_round_trip_and_nibble_order(codes):
    c = torch.tensor(codes, dtype=torch.uint8).reshape(1, -1)
    packed = pack_fp4(c)
    assert packed.shape == (1, c.shape[1] // 2)
    assert torch.equal(unpack_fp4(packed), c)
    assert int(packed[0, 0]) == codes[0] | (codes[1] << 4)  # element 0 in the low nibble


def test_pack_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    torch.manual_seed(0)
    vals = e2m1_round(torch.randn(8, 32) * 3)
    ours = pack_fp4(e2m1_encode(vals))
    assert torch.equal(ours, helpers.pack_fp4_to_uint8(vals))
    back = helpers.unpack_fp4_from_uint8(ours, 8, 32, dtype=torch.float32)
    assert torch.equal(back, vals)


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))


def test_nvfp4_shapes_dtypes_and_scale_rule():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    codes, bscale, s2 = quantize_nvfp4(w)
    assert codes.dtype == torch.uint8 and codes.shape == (32, 64)
    assert bscale.dtype == torch.float8_e4m3fn and bscale.shape == (32, 4)
    assert s2.dtype == torch.float32 and s2.ndim == 0
    assert float(s2) == pytest.approx(float(w.abs().max()) / (6 * 448))
    # the block holding the tensor max gets scale ~448 (exactly representable)
    assert float(bscale.float().max()) == 448.0
    ref = w.reshape(32, 4, 16).abs().amax(-1) / (6 * s2)
    assert torch.allclose(bscale.float(), ref, rtol=0.07)
    w_hat = dequantize_nvfp4(codes, bscale, s2, torch.float32)
    assert ((w_hat - w) ** 2).mean() / (w**2).mean() < 0.02
    assert torch.equal(fake_quant_nvfp4(w), w_hat)


def test_nvfp4_zero_tensor_and_zero_blocks_are_finite():
    w = torch.zeros(4, 32)
    w[0, :16] = torch.linspace(-1, 1, 16)
    codes, bscale, s2 = quantize_nvfp4(w)
    assert torch.isfinite(bscale.float()).all() and (bscale.float() > 0).all()
    out = dequantize_nvfp4(codes, bscale, s2, torch.float32)
    assert torch.isfinite(out).all() and (out[1:] == 0).all()
    z = torch.zeros(2, 16)
    assert float(nvfp4_scale_2(torch.tensor(0.0))) == 1.0
    assert torch.equal(fake_quant_nvfp4(z), z)


def test_nvfp4_matches_compressed_tensors_fake_quant():
    fwd = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    qa = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    torch.manual_seed(1)
    w = torch.randn(16, 64)
    args = qa.QuantizationArgs(
        num_bits=4, type="float", strategy="tensor_group", group_size=16,
        scale_dtype=torch.float8_e4m3fn,
    )  # fmt: skip
    g = w.reshape(16, 4, 16)
    gs = generate_gparam(w.min().reshape(1), w.max().reshape(1))
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
    ct = fwd.fake_quantize(w, scale, zp, args, global_scale=gs)
    ours = fake_quant_nvfp4(w)
    assert (ours - ct).abs().max() < 1e-5


def test_mx_scale_rule_matches_compressed_tensors():
    mx = pytest.importorskip("compressed_tensors.quantization.utils.mxfp_utils")
    amax = torch.tensor([0.1, 1.0, 1.5, 1.74, 1.75, 1.9, 6.0, 7.0, 100.0, 3e-20])
    assert torch.equal(mx_scale_exponent(amax).float(), mx.generate_mx_scales(amax))


def test_mxfp4_round_trip_and_storage():
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    w[1, :32] = 0
    codes, exp = quantize_mxfp4(w)
    assert exp.dtype == torch.uint8 and exp.shape == (8, 2)
    scale = mx_scale_value(exp)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # powers of two
    out = dequantize_mxfp4(codes, exp, torch.float32)
    assert torch.isfinite(out).all() and (out[1, :32] == 0).all()
    assert ((out - w) ** 2).mean() / (w**2).mean() < 0.03
    # the group max never exceeds 6 * scale by more than E2M1 rounding allows
    g = w.reshape(8, 2, 32).abs().amax(-1)
    assert (g <= 7 * scale + 1e-6).all()


def test_fast_round_agrees_with_encode_decode():
    x = torch.cat([torch.linspace(-8, 8, 6401), torch.randn(10000) * 3, torch.tensor([-0.0, 0.0])])
    assert torch.equal(e2m1_round(x), e2m1_decode(e2m1_encode(x)))
    assert torch.equal(torch.signbit(e2m1_round(x)), torch.signbit(e2m1_decode(e2m1_encode(x))))
