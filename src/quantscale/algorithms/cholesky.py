"""GPTQ's factor of the inverse Hessian, computed in the Hessian's own storage.

GPTQ needs U, upper triangular, with (H + damp I)^-1 = U^T U. The textbook chain (Cholesky,
`cholesky_inverse`, Cholesky again) holds two n x n matrices at a time, and torch's
factorizations copy their input even when given `out=`: for Llama-3-8B's down_proj (14,336
input columns) that is 822 MB on top of the Hessian. Here instead, one matrix and a few
n x `BLOCK` panels:

1. H = V V^T with V upper triangular (the Cholesky factorization run from the bottom-right
   corner; a block's own factor is the ordinary Cholesky of the block with its rows and
   columns reversed), V written over H's upper triangle;
2. U = V^-1, inverted in place one block column at a time.

U is the unique upper factor with positive diagonal, so this is the textbook chain's U up to
rounding (with less of it: no explicit inverse is formed). Step 1 reads and writes only the
upper triangle, so a Hessian that turns out not positive definite still has its strict lower
triangle, from which `restore_upper` rebuilds it for a retry with more dampening.
"""

from __future__ import annotations

import torch

BLOCK = 512


def upper_inverse_factor_(a: torch.Tensor, block: int = BLOCK) -> bool:
    """In place: symmetric a [n, n] (read from its upper triangle) -> U, upper triangular
    with a^-1 = U^T U, its strict lower triangle zeroed. False if a is not positive definite:
    then its upper triangle is overwritten and its strict lower triangle is the input's."""
    starts = list(range(0, a.shape[0], block))
    if not _upper_lower_factor_(a, starts, block):
        return False
    for s in starts:  # rows s:s+block keep columns >= their own index
        a[s : s + block].triu_(s)
    _invert_upper_(a, starts, block)
    return True


def restore_upper(a: torch.Tensor, block: int = BLOCK) -> None:
    """The upper triangle of a [n, n] copied back from its strict lower one (the diagonal is
    left as it is: the caller sets it)."""
    n = a.shape[0]
    for s in range(0, n, block):
        e = min(s + block, n)
        d = a[s:e, s:e]
        d.copy_(d.tril() + d.tril(-1).t())
        a[s:e, e:].copy_(a[e:, s:e].t())


def _upper_lower_factor_(a: torch.Tensor, starts: list[int], block: int) -> bool:
    """a = V V^T, V upper triangular over a's upper triangle, the last block first."""
    n = a.shape[0]
    for k in reversed(range(len(starts))):
        s, e = starts[k], min(starts[k] + block, n)
        d = a[s:e, s:e]
        low, info = torch.linalg.cholesky_ex((d.triu() + d.triu(1).t()).flip(0, 1))
        if int(info):
            return False
        v = low.flip(0, 1)  # upper, with d = v v^T
        d.copy_(v + d.tril(-1))
        if s == 0:
            return True
        x = torch.linalg.solve_triangular(v.t(), a[:s, s:e], upper=False, left=False)
        a[:s, s:e].copy_(x)  # the panel of V above the block: a[:s, s:e] = x v^T
        for j in range(k):  # the Schur complement: a[:s, :s] -= x x^T, upper triangle only
            sj, ej = starts[j], starts[j] + block
            if sj:
                a[:sj, sj:ej].addmm_(x[:sj], x[sj:ej].t(), alpha=-1.0)
            a[sj:ej, sj:ej].sub_((x[sj:ej] @ x[sj:ej].t()).triu())
    return True


def _invert_upper_(a: torch.Tensor, starts: list[int], block: int) -> None:
    """Upper triangular a (strict lower triangle zero) -> a^-1 in place, block column by
    block column: with a's leading s x s part already inverted (U11),
    U12 = -U11 V12 V22^-1."""
    n = a.shape[0]
    for s in starts:
        e = min(s + block, n)
        eye = torch.eye(e - s, dtype=a.dtype, device=a.device)
        inverse = torch.linalg.solve_triangular(a[s:e, s:e], eye, upper=True)
        if s:
            a[:s, s:e].copy_(((a[:s, :s] @ a[:s, s:e]) @ inverse).neg_())
        a[s:e, s:e].copy_(inverse)
