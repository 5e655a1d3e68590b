"""Orthogonal Hadamard matrices of any size, and the online Hadamard a runtime applies.

`hadamard(n)` is the normalized Hadamard H / sqrt(n) (H H^T = n I), built from three known
constructions, recursively: Sylvester (H_2n = [[H, H], [H, -H]]), Paley I (order p + 1 for a
prime p = 3 mod 4) and Paley II (order 2 (p + 1) for a prime p = 1 mod 4), and Kronecker
products of orders that have one. SmolLM2's sizes all have one: 576 = 2^3 x 72 (Paley I,
p = 71), 1536 = 2^6 x 24 (Paley I, p = 23), head 64 = 2^6. A size with no such construction
(e.g. an odd factor > 1, or 2 x odd) is the Kronecker product of the largest Hadamard order
that divides it with a random orthogonal block (QR of a Gaussian, fixed seed): still exactly
orthogonal and deterministic, no longer +-1 / sqrt(n) (`is_hadamard_size` says which).

`add_online_hadamard(module)`: the module's input is multiplied by `hadamard(in_features)` at
run time, before anything else sees it (a forward pre-hook put first, so activation
observers, GPTQ's Hessian hooks and the matmul all see the rotated input); the weight must
have been rotated offline (W @ H) for the output to stay the same (QuaRot / SpinQuant R4).
"""

from __future__ import annotations

import functools
from functools import cache
from typing import Any

import torch
from torch import nn

from quantscale.errors import QuantscaleError
from quantscale.scheme import ONLINE_HADAMARD_TARGETS, Recipe, match_pattern

ONLINE_ATTR = "quantscale_online_hadamard"  # set on modules whose input is rotated at run time


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p**0.5) + 1))


def _jacobsthal(p: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime p."""
    squares = {(x * x) % p for x in range(1, p)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, p)])
    idx = (torch.arange(p)[None, :] - torch.arange(p)[:, None]) % p
    return chi.to(torch.float64)[idx]


def _paley1(p: int) -> torch.Tensor:
    """Order p + 1 (p prime, p = 3 mod 4): I + [[0, 1^T], [-1, Q]]."""
    n = p + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(p)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(p: int) -> torch.Tensor:
    """Order 2 (p + 1) (p prime, p = 1 mod 4): the symmetric conference matrix with 0 ->
    [[1, -1], [-1, -1]] and +-1 -> +-[[1, 1], [1, -1]]."""
    n = p + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(p)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(eye, zero)


_H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
_MERGE = 128  # adjacent Kronecker factors are multiplied out up to this size


@cache
def _pm1_factors(n: int) -> tuple[torch.Tensor, ...] | None:
    """+-1 Hadamard matrices whose Kronecker product is a Hadamard matrix of order n, from
    the constructions above (Sylvester: H_2n = H_2 (x) H_n), or None."""
    if n == 1:
        return (torch.ones(1, 1, dtype=torch.float64),)
    if n % 2:
        return None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return (_paley1(n - 1),)
    if n % 4 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return (_paley2(n // 2 - 1),)
    half = _pm1_factors(n // 2)
    if half is not None:
        return (_H2, *half)
    for a in range(4, int(n**0.5) + 1, 4):
        if n % a == 0:
            left, right = _pm1_factors(a), _pm1_factors(n // a)
            if left is not None and right is not None:
                return (*left, *right)
    return None


def is_hadamard_size(n: int) -> bool:
    """Whether `hadamard(n)` is a true (+-1 / sqrt(n)) Hadamard matrix."""
    return _pm1_factors(n) is not None


def _merged(factors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Adjacent factors multiplied out while the product stays within `_MERGE` rows."""
    out = [factors[0]]
    for f in factors[1:]:
        if out[-1].shape[0] * f.shape[0] <= _MERGE:
            out[-1] = torch.kron(out[-1], f)
        else:
            out.append(f)
    return tuple(out)


@cache
def hadamard_factors(n: int) -> tuple[torch.Tensor, ...]:
    """Orthogonal float64 blocks whose Kronecker product is `hadamard(n)` (see the module
    docstring); `apply_hadamard` rotates with them without forming the n x n matrix."""
    if n <= 0:
        raise QuantscaleError(f"a Hadamard rotation needs a positive size, not {n}")
    pm1 = _pm1_factors(n)
    if pm1 is not None:
        return _merged([f / f.shape[0] ** 0.5 for f in pm1 if f.shape[0] > 1] or [pm1[0]])
    a = max(d for d in range(1, n) if n % d == 0 and _pm1_factors(d) is not None)
    gen = torch.Generator().manual_seed(n)
    q, r = torch.linalg.qr(torch.randn(n // a, n // a, generator=gen, dtype=torch.float64))
    q = (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()
    return (*hadamard_factors(a), q) if a > 1 else (q,)


@cache
def _orthogonal(n: int) -> torch.Tensor:
    return functools.reduce(torch.kron, hadamard_factors(n))


def hadamard(
    n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """The orthogonal n x n rotation (see the module docstring); H @ H.T = I."""
    return _orthogonal(n).to(device=device, dtype=dtype)


def apply_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard(x.shape[-1]), one Kronecker factor at a time: for n = a * b,
    x (A (x) B) = A^T X B with X the [a, b] view of x (1536 = 64 x 24: 88k multiply-adds per
    row instead of 2.4M)."""
    factors = hadamard_factors(x.shape[-1])
    if len(factors) == 1:
        return x @ factors[0].to(device=x.device, dtype=x.dtype)
    lead = x.dim() - 1
    y = x.reshape(*x.shape[:-1], *(f.shape[0] for f in factors))
    for i, f in enumerate(factors):
        y = torch.movedim(torch.movedim(y, lead + i, -1) @ f.to(x.device, x.dtype), -1, lead + i)
    return y.reshape(x.shape)


def _rotate_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (apply_hadamard(args[0]), *args[1:])


def add_online_hadamard(module: nn.Module) -> None:
    """Rotate `module`'s input by `hadamard(in_features)` at run time, before every other
    forward pre-hook (idempotent)."""
    if getattr(module, ONLINE_ATTR, False):
        return
    size = getattr(module, "in_features", None)
    if not isinstance(size, int):
        raise QuantscaleError(f"an online Hadamard needs a Linear, not {type(module).__name__}")
    module.register_forward_pre_hook(_rotate_input, prepend=True)
    setattr(module, ONLINE_ATTR, True)


def has_online_hadamard(module: nn.Module) -> bool:
    """Whether `add_online_hadamard` was applied to `module`."""
    return bool(getattr(module, ONLINE_ATTR, False))


def add_online_hadamards(model: nn.Module, recipe: Recipe | None) -> int:
    """Put the online Hadamard back on every module a rotated recipe names
    (`scheme.ONLINE_HADAMARD_TARGETS`: the down_proj inputs) of a reloaded model; how many."""
    if recipe is None or not recipe.rotate:
        return 0
    names = [
        n
        for n, _m in model.named_modules()
        if any(match_pattern(n, p) for p in ONLINE_HADAMARD_TARGETS)
    ]
    for name in names:
        add_online_hadamard(model.get_submodule(name))
    return len(names)
