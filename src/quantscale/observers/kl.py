"""KL (entropy) observer, TensorRT style: a histogram of |x| across batches, then the clip
threshold whose 2^(bits-1)-level quantized distribution is closest (KL) to the clipped
reference distribution; and the max-entropy observer: on the same histogram, the threshold
whose 2^(bits-1) codes carry the most information (the entropy of the code frequencies, the
clipped mass in the top code). Per-tensor only; the resulting range is symmetric. (The
registered alias "entropy" is the KL search, as TensorRT names it.)"""

from __future__ import annotations

import numpy as np
import torch

from quantscale import distributed
from quantscale.errors import QuantscaleError
from quantscale.observers.base import Observer, register_observer


def _expand_quantized(h: np.ndarray, levels: int) -> np.ndarray:
    """Merge h into `levels` chunks and spread each chunk's mass over its non-empty bins."""
    i = len(h)
    edges = (np.arange(levels) * i) // levels  # chunk starts; the last takes the remainder
    nz = h > 0
    sums = np.add.reduceat(h, edges)
    counts = np.add.reduceat(nz.astype(np.float64), edges)
    chunk = np.repeat(np.arange(levels), np.diff(np.append(edges, i)))
    return np.where(nz, (sums / np.maximum(counts, 1))[chunk], 0.0)


def kl_threshold_bin(hist: np.ndarray, levels: int, stride: int = 1) -> int:
    """Number of leading bins i (>= levels) minimizing KL(P_i || Q_i); outliers go to bin i-1."""
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels:
        return n
    best_i, best_kl = n, np.inf
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    for i in range(levels, n + 1, stride):
        p = hist[:i].copy()
        p[-1] += suffix[i]  # clipped mass lands in the last kept bin
        q = _expand_quantized(hist[:i], levels)  # built without the clipped mass
        nz = p > 0
        ps = p[nz] / p.sum()
        qs = np.maximum(q[nz] / max(q.sum(), 1e-300), 1e-12)
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def entropy_threshold_bin(hist: np.ndarray, levels: int, stride: int = 1) -> int:
    """Number of leading bins i (>= levels) maximizing the entropy of the `levels` codes'
    frequencies when |x| is clipped at bin i (codes: i bins in `levels` chunks, as
    `kl_threshold_bin` chunks them; the clipped mass counts in the top code)."""
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels:
        return n
    best_i, best_h = n, -np.inf
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    total = max(float(hist.sum()), 1e-300)
    for i in range(levels, n + 1, stride):
        codes = np.add.reduceat(hist[:i], (np.arange(levels) * i) // levels)
        codes[-1] += suffix[i]
        p = codes[codes > 0] / total
        h = float(-np.sum(p * np.log(p)))
        if h > best_h:
            best_i, best_h = i, h
    return best_i


@register_observer("kl", "entropy")
class KLObserver(Observer):
    """Histogram (num_bins of fixed width, grown as the range grows) + KL threshold search."""

    def __init__(self, args=None, *, num_bins: int = 2048, stride: int = 1, **kw) -> None:
        self.num_bins, self.stride = num_bins, stride
        super().__init__(args, **kw)

    def reset(self) -> None:
        super().reset()
        self.hist: torch.Tensor | None = None
        self.width = 0.0

    def update(self, x: torch.Tensor) -> None:
        rows, shape = self.rows(x)
        if rows.shape[0] != 1:
            raise QuantscaleError("kl observer supports per-tensor ranges only")
        a = rows.abs().reshape(-1)
        amax = float(a.max()) if a.numel() else 0.0
        self.count += 1
        if self.hist is None:
            self.width = amax / self.num_bins if amax > 0 else 0.0
            self.hist = torch.zeros(self.num_bins, dtype=torch.float64)
        if self.width == 0.0:
            if amax == 0.0:
                return
            self.width = amax / self.num_bins
        need = int(np.ceil(amax / self.width)) if amax > 0 else 0
        if need > len(self.hist):
            self.hist = torch.cat([self.hist, self.hist.new_zeros(need - len(self.hist))])
        while len(self.hist) > 4 * self.num_bins:  # merge pairs: keep the histogram small
            h = torch.nn.functional.pad(self.hist, (0, len(self.hist) % 2))
            self.hist, self.width = h.reshape(-1, 2).sum(dim=1), self.width * 2
        n = len(self.hist)
        self.hist += torch.histc(a.double(), bins=n, min=0.0, max=n * self.width)

    def reduce(self) -> None:
        """Refused with several ranks: each rank's bin width follows its own first batch
        and growth, so the histograms do not merge exactly."""
        if distributed.active():
            raise QuantscaleError(
                "kl observer: its histogram bins follow each rank's own data and cannot be "
                "merged across ranks exactly; use minmax / mse / aciq or run on one process"
            )

    def min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hist is None:
            raise QuantscaleError(f"{self.name} observer has seen no data")
        levels = 1 << (self.args.num_bits - 1)
        i = kl_threshold_bin(self.hist.numpy(), levels, self.stride)
        t = torch.tensor([i * self.width], dtype=torch.float32)
        return -t, t


@register_observer("max_entropy")
class MaxEntropyObserver(KLObserver):
    """The KL observer's histogram, with the max-entropy threshold search."""

    def min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hist is None:
            raise QuantscaleError(f"{self.name} observer has seen no data")
        levels = 1 << (self.args.num_bits - 1)
        i = entropy_threshold_bin(self.hist.numpy(), levels, self.stride)
        t = torch.tensor([i * self.width], dtype=torch.float32)
        return -t, t
