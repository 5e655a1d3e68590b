"""Real INT8 x INT8 -> INT32 matmuls (`torch._int_mm`) for W8A8 Linear layers.

On CPU (torch >= 2.4) `torch._int_mm` takes any [M, K] x [K, N] int8 pair. On CUDA it needs
M > 16 and K, N multiples of 8; other shapes (and devices) fall back to an exact float64
matmul of the integer codes, so results never depend on the path taken.
"""

from __future__ import annotations

from typing import TypeGuard

import torch

from quantscale.scheme import QuantArgs, QuantScheme

# Sum of K products of |q| <= 128 stays exact in float64 up to K = 2^53 / 2^14.
_EXACT_K_FLOAT64 = 1 << 39


def int_mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether `torch._int_mm` accepts an [m, k] x [k, n] int8 product on `device`."""
    if not hasattr(torch, "_int_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return False


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [K, N] -> int32 [M, N]."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_matmul needs int8 operands, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[1]
    if int_mm_supported(m, k, n, a.device):
        return torch._int_mm(a.contiguous(), b.contiguous())
    if k > _EXACT_K_FLOAT64:
        raise ValueError(f"int_matmul: reduction size {k} too large for the exact fallback")
    return (a.double() @ b.double()).to(torch.int32)


def _int8_sym(args: QuantArgs | None) -> TypeGuard[QuantArgs]:
    return args is not None and args.type == "int" and args.num_bits == 8 and args.symmetric


def supports_int8(scheme: QuantScheme) -> bool:
    """Weights int8 symmetric per tensor/channel and inputs int8 symmetric per tensor (static
    or dynamic) or per token (dynamic): the scales then factor out of the reduction."""
    w, a = scheme.weights, scheme.input_activations
    if not (_int8_sym(w) and _int8_sym(a)):
        return False
    return w.strategy in ("tensor", "channel") and a.strategy in ("tensor", "token")


def int8_linear(
    q_x: torch.Tensor,
    x_scale: torch.Tensor,
    q_w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 (q_x @ q_w.T) * x_scale * w_scale (+ bias).

    q_x int8 [..., K]; x_scale [1] (per tensor) or [..., 1] (per token); q_w int8 [N, K];
    w_scale [1] or [N, 1].
    """
    lead = q_x.shape[:-1]
    acc = int_matmul(q_x.reshape(-1, q_x.shape[-1]), q_w.t()).float()
    xs = x_scale.float().reshape(-1, 1) if x_scale.numel() > 1 else x_scale.float().reshape(1, 1)
    out = acc * xs * w_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*lead, -1)
