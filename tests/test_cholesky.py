"""GPTQ's in-place factor of the inverse Hessian (algorithms/cholesky.py) against the
textbook chain in float64, across block boundaries, and its retry state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantscale.algorithms import cholesky
from quantscale.algorithms.gptq import inverse_hessian_factors


def _spd(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64)
    x = x @ (torch.randn(n, n, generator=g, dtype=torch.float64) * 0.3 + torch.eye(n))
    h = x.t() @ x / x.shape[0]
    h.diagonal().add_(0.01 * h.diagonal().mean())
    return h.to(dtype)


def _textbook(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), block=st.integers(1, 16), seed=st.integers(0, 1000))
def test_factor_is_the_textbook_one_for_any_blocking(n, block, seed):
    h = _spd(n, seed)
    a = h.clone()
    assert cholesky.upper_inverse_factor_(a, block)
    torch.testing.assert_close(a, _textbook(h), rtol=1e-9, atol=1e-9)
    assert torch.equal(a, a.triu()), "the strict lower triangle is zeroed"


@pytest.mark.parametrize("n", [511, 512, 513, 1100])
def test_float32_factor_at_the_default_block(n):
    """Float32, as GPTQ runs it, past one and two 512-column blocks: U^T U H = I as closely
    as the textbook chain gets it."""
    h = _spd(n, n, torch.float32)
    a = h.clone()
    assert cholesky.upper_inverse_factor_(a)
    eye = torch.eye(n, dtype=torch.float64)
    ours = (a.double().t() @ a.double() @ h.double() - eye).abs().max()
    ref = _textbook(h)
    theirs = (ref.double().t() @ ref.double() @ h.double() - eye).abs().max()
    assert ours < 2 * theirs + 1e-6
    torch.testing.assert_close(a, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_not_positive_definite_keeps_the_lower_triangle_for_a_retry():
    h = _spd(37, 1)
    h[30, 30] = -1.0  # fails in the last block (factored first)
    h[2, 2] = -1.0  # and in the first
    for block in (8, 64):
        a = h.clone()
        assert not cholesky.upper_inverse_factor_(a, block)
        assert torch.equal(a.tril(-1), h.tril(-1))
        cholesky.restore_upper(a, block)
        a.diagonal().copy_(h.diagonal())
        assert torch.equal(a, h)


def test_owned_hessians_become_their_factors_in_their_own_storage():
    """No second n x n matrix: an owned batch is returned as itself, overwritten."""
    h = torch.stack([_spd(24, s, torch.float32) for s in range(3)])
    before = h.clone()
    want = inverse_hessian_factors(h, 0.01)
    owned = h.clone()
    got = inverse_hessian_factors(owned, 0.01, owned=True)
    assert got.data_ptr() == owned.data_ptr()
    assert torch.equal(got, want)
    assert torch.equal(h, before), "a Hessian not owned is left as it was"


def test_in_place_permutation_is_the_copying_one():
    from quantscale.algorithms.gptq import _permute_, _permuted

    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 50, 50, generator=g)
    perm = torch.stack([torch.randperm(50, generator=g) for _ in range(3)])
    perm[1] = torch.arange(50)  # the identity: nothing moves
    want = _permuted(h, perm, chunk=7)
    got = h.clone()
    assert _permute_(got, perm, chunk=7) is got
    assert torch.equal(got, want)
