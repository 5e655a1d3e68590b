"""MSE observer: grid search of a clipping ratio minimizing the quantization error
sum |x - fq(x)|^norm of the target QuantArgs, per range element. The search stops early once
no element has improved for `patience` consecutive ratios (None: full grid)."""

from __future__ import annotations

import torch

from quantscale.observers.base import Observer, register_observer
from quantscale.qdq import QParams, compute_qparams, fake_quantize, nvfp4_global_scale


def row_qparams(qp: QParams) -> QParams:
    """Per-row qparams [R] shaped [R, 1] to broadcast over rows [R, N]."""
    zp = qp.zero_point[:, None] if qp.zero_point is not None else None
    return QParams(qp.scale[:, None], zp, qp.global_scale)


@register_observer("mse", "memoryless_mse")
class MSEObserver(Observer):
    """Shrinks the min-max range by factors 1 .. 1-maxshrink (grid steps)."""

    default_combine = "mean"

    def __init__(
        self,
        args=None,
        *,
        grid: int = 100,
        maxshrink: float = 0.2,
        norm: float = 2.0,
        patience: int | None = 10,
        **kw,
    ) -> None:
        self.grid, self.maxshrink, self.norm, self.patience = grid, maxshrink, norm, patience
        super().__init__(args, **kw)

    def observe(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mn, mx = rows.amin(dim=1), rows.amax(dim=1)
        gs = nvfp4_global_scale(rows.abs().amax()) if self.args.is_nvfp4 else None
        best = torch.full_like(mn, float("inf"))
        best_p = torch.ones_like(mn)
        stale = 0
        for i in range(self.grid):
            p = 1.0 - self.maxshrink * i / max(self.grid - 1, 1)
            qp = row_qparams(compute_qparams(self.args, mn * p, mx * p, gs))
            err = (fake_quantize(rows, self.args, qp) - rows).abs().pow(self.norm).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            best_p = torch.where(better, torch.full_like(best_p, p), best_p)
            stale = 0 if bool(better.any()) else stale + 1
            if self.patience is not None and stale >= self.patience:
                break
        return mn * best_p, mx * best_p
