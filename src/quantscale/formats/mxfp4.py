"""MXFP4 (OCP MX): E2M1 elements with one shared E8M0 (power-of-two) scale per 32.

Scale rule as compressed-tensors (after vLLM's reference_mxfp4): round the group amax to a
power of two, rounding up when its mantissa is >= 1.75 (i.e. where E2M1 rounding of the max
would reach 8), then subtract floor(log2(6)) = 2. The scale is stored as a uint8 biased
exponent `e`, value 2^(e-127); 255 (NaN in E8M0) is never produced. All-zero groups get the
smallest scale, 2^-127, and decode to zeros.
"""

from __future__ import annotations

import torch

from quantscale.formats.fp4 import e2m1_decode, e2m1_encode

MX_GROUP = 32
E8M0_BIAS = 127
_E2M1_EMAX = 2  # floor(log2(6))


def mx_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponent (uint8) of the MXFP4 scale for each group amax."""
    a = amax.float()
    safe = torch.where(a > 0, a, torch.ones_like(a))
    mant, exp = torch.frexp(safe)  # safe = mant * 2^exp, mant in [0.5, 1)
    e = (exp - 1) + (mant >= 0.875).to(exp.dtype)  # mantissa (2*mant) >= 1.75 rounds up
    biased = (e - _E2M1_EMAX + E8M0_BIAS).clamp(0, 254)
    biased = torch.where(a > 0, biased, torch.zeros_like(biased))
    return biased.to(torch.uint8)


def mx_scale_value(exponent: torch.Tensor) -> torch.Tensor:
    """Float32 scale 2^(e-127) of uint8 E8M0 exponents."""
    return torch.exp2(exponent.to(torch.float32) - E8M0_BIAS)


def mx_scale_to_exponent(scale: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 exponent of power-of-two float scales (inverse of `mx_scale_value`)."""
    return (torch.log2(scale.float()).round() + E8M0_BIAS).clamp(0, 254).to(torch.uint8)


def quantize_mxfp4(w: torch.Tensor, group: int = MX_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., in] (in % 32 == 0) -> (E2M1 codes uint8 [..., in], E8M0 exponents [..., in/32])."""
    if w.shape[-1] % group:
        raise ValueError(
            f"MXFP4 needs the last dimension divisible by {group}, got {tuple(w.shape)}"
        )
    g = w.float().unflatten(-1, (w.shape[-1] // group, group))
    exp = mx_scale_exponent(g.abs().amax(dim=-1))
    codes = e2m1_encode(g / mx_scale_value(exp).unsqueeze(-1)).flatten(-2)
    return codes, exp


def dequantize_mxfp4(
    codes: torch.Tensor,
    exponent: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    group: int = MX_GROUP,
) -> torch.Tensor:
    """Inverse of `quantize_mxfp4`."""
    vals = e2m1_decode(codes).unflatten(-1, (codes.shape[-1] // group, group))
    return (vals * mx_scale_value(exponent).unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quant_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize through MXFP4 in w's dtype."""
    codes, exp = quantize_mxfp4(w)
    return dequantize_mxfp4(codes, exp, w.dtype)
