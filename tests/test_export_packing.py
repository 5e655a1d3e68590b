"""Property tests: whole weights through the exporters' pack -> unpack paths come back exact,
with element 2k in the low nibble (FP4) and element 0 in the lowest bits (int32 words)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantscale.algorithms.rtn import quantize_weight_rtn
from quantscale.checkpoint.dequantize import dequantize_module
from quantscale.checkpoint.layouts import CT_FLOAT, CT_MXFP4, CT_NVFP4, CT_PACKED
from quantscale.export.base import ModuleCodes, per_column_qparams
from quantscale.export.compressed_tensors import weight_tensors
from quantscale.formats.intq import unpack_int32
from quantscale.qdq import dequantize, quantize
from quantscale.scheme import QuantArgs, preset_scheme

CASES = {
    "NVFP4A16": (CT_NVFP4, 16),
    "MXFP4A16": (CT_MXFP4, 32),
    "W4A16": (CT_PACKED, 8),
    "W4A16_ASYM": (CT_PACKED, 8),
    "W8A16": (CT_PACKED, 4),
    "FP8_DYNAMIC": (CT_FLOAT, 1),
}


def _codes(w: torch.Tensor, args: QuantArgs, g_idx=None) -> ModuleCodes:
    _, qp = quantize_weight_rtn(w, args)
    grid = per_column_qparams(qp, g_idx) if g_idx is not None else qp
    return ModuleCodes("m", args, quantize(w, args, grid), qp, g_idx, None)


@settings(max_examples=40, deadline=None)
@given(
    preset=st.sampled_from(sorted(CASES)),
    rows=st.integers(1, 9),
    units=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    spread=st.floats(1e-3, 1e3),
)
def test_whole_tensor_round_trip(preset, rows, units, seed, spread):
    fmt, unit = CASES[preset]
    args = preset_scheme(preset).weights
    if args.strategy == "group":
        args = args.model_copy(update={"group_size": 32})
        unit = max(unit, 32)
    w = torch.randn(rows, unit * units, generator=torch.Generator().manual_seed(seed)) * spread
    mc = _codes(w, args)
    stored = weight_tensors(mc, fmt)
    back = dequantize_module(stored, args, fmt)
    assert torch.equal(back, dequantize(mc.codes, args, mc.qparams))
    if fmt in (CT_NVFP4, CT_MXFP4):
        packed = stored["weight_packed"]
        assert packed.shape == (rows, w.shape[1] // 2) and packed.dtype == torch.uint8
        assert torch.equal(packed & 0xF, mc.codes[:, 0::2]) and torch.equal(
            packed >> 4, mc.codes[:, 1::2]
        )
    if fmt == CT_PACKED:
        bits = args.num_bits
        words = stored["weight_packed"]
        low = (words[:, 0] & ((1 << bits) - 1)) - (1 << (bits - 1))
        assert torch.equal(low.to(torch.int8), mc.codes[:, 0])  # element 0 in the lowest bits
        assert torch.equal(unpack_int32(words, bits, w.shape[1]), mc.codes)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 12), groups=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_act_order_g_idx_and_asym_zero_points_round_trip(rows, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    args = QuantArgs(num_bits=4, group_size=8, symmetric=False, actorder="group")
    w = torch.randn(rows, 8 * groups, generator=gen)
    g_idx = (torch.randperm(8 * groups, generator=gen) // 8).to(torch.int32)
    mc = _codes(w, args.model_copy(update={"actorder": None}), None)
    mc = ModuleCodes("m", args, mc.codes, mc.qparams, g_idx, None)
    stored = weight_tensors(mc, CT_PACKED)
    assert torch.equal(stored["weight_g_idx"], g_idx)
    zp = unpack_int32(stored["weight_zero_point"], 4, rows, dim=0)
    assert torch.equal(zp.float(), mc.qparams.zero_point)
    expect = dequantize(mc.codes, args, per_column_qparams(mc.qparams, g_idx))
    assert torch.equal(dequantize_module(stored, args, CT_PACKED), expect)
