"""The fast FP8 block quantizer equals the reference bit for bit."""

from __future__ import annotations

import pytest
import torch

from quantscale.formats import fp8_fast
from quantscale.formats.fp8 import E4M3, E5M2, all_codes, quantize_fp8_block

SHAPES = [(256, 384), (576, 1536), (1000, 130), (1, 1), (129, 257), (128, 128)]


def _weight(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * 0.02
    w[: shape[0] // 3] *= 1e3  # tiles with very different ranges
    if shape[0] > 2 and shape[1] > 2:
        w[1] = 0
        w[:, 1] *= 1e-6  # values that land on E4M3 subnormals
    return w.to(dtype)


def _same(a, b):
    qa, sa = a
    qb, sb = b
    assert qa.dtype == qb.dtype and qa.shape == qb.shape
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8))
    assert sa.dtype == sb.dtype == torch.float32
    assert torch.equal(sa, sb)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_eager_matches_reference(shape, dtype, scale_fmt):
    w = _weight(shape, dtype, seed=shape[0] + shape[1])
    _same(
        fp8_fast.quantize_fp8_block_fast(w, scale_fmt=scale_fmt, backend="eager"),
        quantize_fp8_block(w, scale_fmt=scale_fmt),
    )


def test_other_blocks_e5m2_and_noncontiguous():
    w = _weight((300, 200), torch.bfloat16, 7)
    for block in [(64, 64), (1, 128), (128, 32)]:
        _same(fp8_fast.quantize_fp8_block_fast(w, block), quantize_fp8_block(w, block))
    _same(
        fp8_fast.quantize_fp8_block_fast(w, dtype=E5M2),
        quantize_fp8_block(w, dtype=E5M2),
    )
    wt = _weight((256, 512), torch.bfloat16, 8).t()
    assert not wt.is_contiguous()
    _same(fp8_fast.quantize_fp8_block_fast(wt), quantize_fp8_block(wt))


def test_every_e4m3_value_and_every_midpoint():
    """All 256 codes and the midpoints between neighbours round the same way."""
    codes = all_codes(E4M3).float()
    finite = codes[torch.isfinite(codes)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    values = torch.cat([finite, mids, torch.tensor([448.0, -448.0])])
    w = torch.zeros(128, 128)
    w.view(-1)[: values.numel()] = values
    _same(fp8_fast.quantize_fp8_block_fast(w), quantize_fp8_block(w))
    q, scale = fp8_fast.quantize_fp8_block_fast(w)
    assert scale.item() == 1.0  # amax 448: the codes themselves are the quantized values
    assert torch.equal(q.float().view(-1)[: finite.numel()], finite)


def test_compiled_matches_reference():
    if not fp8_fast.compile_available():
        pytest.skip("torch.compile does not work on this machine")
    for shape in [(576, 1536), (256, 384), (1000, 130)]:
        w = _weight(shape, torch.bfloat16, 3)
        for scale_fmt in (None, "ue8m0"):
            _same(
                fp8_fast.quantize_fp8_block_fast(w, scale_fmt=scale_fmt, backend="compile"),
                quantize_fp8_block(w, scale_fmt=scale_fmt),
            )


def test_backend_choice(monkeypatch):
    assert fp8_fast.choose_backend(10) == "eager"
    monkeypatch.setattr(fp8_fast, "compile_available", lambda: False)
    assert fp8_fast.choose_backend(10**12) == "eager"
    monkeypatch.setattr(fp8_fast, "compile_available", lambda: True)
    assert fp8_fast.choose_backend(10**12) == "compile"
    with pytest.raises(ValueError, match="backend"):
        fp8_fast.quantize_fp8_block_fast(torch.ones(4, 4), backend="numba")
