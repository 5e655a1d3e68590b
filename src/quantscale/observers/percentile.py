"""Percentile observer (Quamba): per-batch alpha-percentile of |x|, EMA across batches; and
`percentile_mse`, which picks the alpha per range element by quantization MSE.

Exact for any size: the order statistics come from `topk` (few outliers) or `kthvalue`,
with torch.quantile's linear interpolation, so it works past torch.quantile's 16M limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from quantscale import distributed
from quantscale.errors import QuantscaleError
from quantscale.observers.base import Observer, register_observer
from quantscale.observers.mse import row_qparams
from quantscale.qdq import compute_qparams, fake_quantize

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


ALPHA_CANDIDATES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
SAMPLE_PER_BATCH = 1 << 16


@register_observer("percentile_mse")
class PercentileMSEObserver(Observer):
    """The percentile alpha of each range element chosen from `alphas` by quantization MSE.

    Every candidate keeps its own percentile + EMA range (as `PercentileObserver`); a seeded
    sample of `sample` values per row of every batch scores each candidate's final range by
    sum |x - qdq(x)|^2, and the lowest wins (`chosen_alpha` [R] says which). One observer per
    module or Mamba layer makes this a per-layer alpha.
    """

    default_combine = "ema"

    def __init__(
        self,
        args=None,
        *,
        alphas: Sequence[float] = ALPHA_CANDIDATES,
        sample: int = SAMPLE_PER_BATCH,
        **kwargs,
    ) -> None:
        if not alphas:
            raise QuantscaleError("percentile_mse observer needs at least one candidate alpha")
        self.alphas = tuple(float(a) for a in alphas)
        self.sample = sample
        self.candidates = [PercentileObserver(args, alpha=a, **kwargs) for a in self.alphas]
        super().__init__(args, **kwargs)
        self.chosen_alpha: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self._samples: list[torch.Tensor] = []
        for cand in self.candidates:
            cand.reset()

    def update(self, x: torch.Tensor) -> None:
        rows, self._shape = self.rows(x)
        for cand in self.candidates:
            cand.update(x)
        gen = torch.Generator().manual_seed(self.count)
        keep = torch.randperm(rows.shape[1], generator=gen)[: self.sample]
        self._samples.append(rows[:, keep])
        self.count += 1

    def reduce(self) -> None:
        """Refused with several ranks: each rank scores the candidates on its own sample."""
        if distributed.active():
            raise QuantscaleError(
                "percentile_mse observer: the candidates' EMA ranges and samples cannot be "
                "merged across ranks exactly; use percentile with one alpha or one process"
            )

    def min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._samples:
            raise QuantscaleError(f"{self.name} observer has seen no data")
        data = torch.cat(self._samples, dim=1)
        best = torch.full((data.shape[0],), float("inf"))
        lo = hi = None
        chosen = torch.empty(data.shape[0], dtype=torch.float64)
        for alpha, cand in zip(self.alphas, self.candidates):
            mn, mx = (t.reshape(-1) for t in cand.min_max())
            qp = row_qparams(compute_qparams(self.args, mn, mx))
            err = (fake_quantize(data, self.args, qp) - data).pow(2).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            chosen = torch.where(better, torch.full_like(chosen, alpha), chosen)
            lo = mn if lo is None else torch.where(better, mn, lo)
            hi = mx if hi is None else torch.where(better, mx, hi)
        assert lo is not None and hi is not None
        self.chosen_alpha = chosen.reshape(self._shape)
        return lo.reshape(self._shape), hi.reshape(self._shape)
