"""Quantization error measures shared by sensitivity scans and model diagnostics."""

from __future__ import annotations

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(|ref|^2 / |approx - ref|^2), in dB."""
    noise = (approx.float() - reference.float()).pow(2).sum()
    return float(10 * torch.log10(reference.float().pow(2).sum() / noise.clamp_min(1e-30)))
