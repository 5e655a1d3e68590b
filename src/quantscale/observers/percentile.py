"""Percentile observer (Quamba): per-batch alpha-percentile of |x|, EMA across batches.

Exact for any size: the order statistics come from `topk` (few outliers) or `kthvalue`,
with torch.quantile's linear interpolation, so it works past torch.quantile's 16M limit.
"""

from __future__ import annotations

import math

import torch

from quantscale.observers.base import Observer, register_observer

_TOPK_LIMIT = 1 << 20


def row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile of [R, N] rows, linear interpolation (as torch.quantile)."""
    n = rows.shape[1]
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    k = n - lo  # lo-th smallest is the k-th largest
    if k <= _TOPK_LIMIT:
        top = rows.topk(min(k, n), dim=1).values  # descending
        v_lo, v_hi = top[:, k - 1], top[:, max(k - 2, 0)]
    else:
        v_lo = rows.kthvalue(lo + 1, dim=1).values
        v_hi = rows.kthvalue(hi + 1, dim=1).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


@register_observer("percentile")
class PercentileObserver(Observer):
    """Symmetric: range +-percentile(|x|, alpha); asymmetric: [q(1-alpha), q(alpha)]."""

    default_combine = "ema"

    def __init__(self, args=None, *, alpha: float = 0.9995, **kwargs) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"percentile alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        super().__init__(args, **kwargs)

    def observe(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.symmetric:
            top = row_quantile(rows.abs(), self.alpha)
            return -top, top
        return row_quantile(rows, 1.0 - self.alpha), row_quantile(rows, self.alpha)
