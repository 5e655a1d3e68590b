"""The fused NVFP4 quantize + pack (C++) equals `quantize_nvfp4` + `pack_fp4` bit for bit."""

from __future__ import annotations

import pytest
import torch

from quantscale.formats import fp8_fast
from quantscale.formats.fp4 import (
    E2M1_BOUNDARIES,
    E2M1_VALUES,
    nvfp4_scale_2,
    pack_fp4,
    quantize_nvfp4,
    quantize_nvfp4_packed,
)


@pytest.fixture(scope="module")
def native():
    if fp8_fast.native_op("nvfp4_quantize") is None:
        pytest.skip("the C++ kernel cannot be built here (see the logged warning)")


def _reference(w, scale_2=None):
    codes, bscale, s2 = quantize_nvfp4(w, scale_2)
    return pack_fp4(codes), bscale, s2


def _same(a, b):
    assert a[0].dtype == b[0].dtype == torch.uint8 and a[0].shape == b[0].shape
    assert torch.equal(a[0], b[0])
    assert a[1].dtype == b[1].dtype == torch.float8_e4m3fn
    assert torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))
    assert torch.equal(a[2], b[2])


@pytest.mark.parametrize("scale_2", [None, 1.0, 3e-5, 0.37])
def test_every_bf16_pattern(native, scale_2):
    """All 65536 bf16 patterns (NaN, inf, subnormals, -0.0) shuffled into groups of 16."""
    order = torch.randperm(65536, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    w = order.to(torch.int16).view(torch.bfloat16).reshape(1024, 64)
    s2 = None if scale_2 is None else torch.tensor(scale_2)
    _same(quantize_nvfp4_packed(w, s2), _reference(w, s2))
    finite = w[torch.isfinite(w.float()).all(dim=1)]  # a finite per-tensor amax
    assert finite.shape[0] > 500
    _same(quantize_nvfp4_packed(finite, s2), _reference(finite, s2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_on_and_beside_every_boundary_and_value(native, dtype):
    """Scaled inputs whose quotient lands on, or a few float32 steps beside, every E2M1
    boundary (the ties) and value, under block scales of every size class."""
    points = torch.tensor([b for b, _ in E2M1_BOUNDARIES] + list(E2M1_VALUES))
    near = [points]
    lo, hi = points, points
    for _ in range(3):
        lo, hi = torch.nextafter(lo, lo - 1), torch.nextafter(hi, hi + 1)
        near += [lo, hi]
    y = torch.cat(near)
    y = torch.cat([y, -y])
    groups = []
    scale_2 = torch.tensor(0.011)
    gen = torch.Generator().manual_seed(1)
    for amax in torch.exp(torch.empty(40).uniform_(-9, 4, generator=gen)):
        bscale = quantize_nvfp4(torch.full((16,), float(amax)), scale_2)[1].float()[0]
        x = y * (bscale * scale_2)
        x = torch.cat([x, torch.zeros(-x.numel() % 15)]).reshape(-1, 15)
        groups.append(torch.cat([x, torch.full((x.shape[0], 1), float(amax))], dim=1))
    w = torch.cat(groups).reshape(-1, 64).to(dtype)
    _same(quantize_nvfp4_packed(w, scale_2), _reference(w, scale_2))
    ties = quantize_nvfp4_packed(torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2]))
    assert ties[0][0, :4].tolist() == [0x20, 0x42, 0x64, 0x76]  # ties to the even index


def test_random_shapes_dtypes_and_fallback(native, monkeypatch):
    """Leading dimensions, all-zero groups, given and computed scale_2; the torch path (no
    kernel, or a group size it does not take) gives the same bytes."""
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = (torch.randn(3, 40, 96, generator=gen) * 0.05).to(dtype)
        w[0, :5] = 0
        w[1, 3, :16] *= 300
        for s2 in (None, nvfp4_scale_2(w.float().abs().amax() * 2)):
            _same(quantize_nvfp4_packed(w, s2), _reference(w, s2))
    packed, bscale, _ = quantize_nvfp4_packed(torch.zeros(2, 32))
    assert not packed.any() and torch.all(bscale.float() == 2.0**-9)
    ref = _reference(w)
    monkeypatch.setattr(fp8_fast, "native_op", lambda name: None)
    _same(quantize_nvfp4_packed(w), ref)
