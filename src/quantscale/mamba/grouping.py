"""Channel grouping for piecewise activation scales (Quamba2's sort-and-cluster).

Given per-channel statistics of an activation (e.g. the running max of |x| per channel), plan
a permutation of its channels and a group id per (permuted) channel such that each group of
channels with a similar range shares one scale and every group is a contiguous run:

- heads (of a Mamba2 SSD group) are clustered with agglomerative clustering (ward linkage) on
  their channel profiles: the log of their per-channel statistics sorted ascending. (Quamba2
  normalises the profiles, which groups heads by shape; heads that share a scale need similar
  magnitudes too, and the log keeps both.)
- within each head group the sorted channel positions are clustered with 1-D k-means on the
  group's largest statistic at each position; sorted values make every cluster an interval.

A plan says where channels go (`perm`: new position i holds old channel `perm[i]`) and which
scale each new position uses (`group_id`). Models apply `perm` to their weights so that their
float outputs do not change (see `quantscale.mamba.mixers.reorder_mixer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from quantscale.errors import QuantscaleError


@dataclass
class GroupPlan:
    """A channel permutation and the scale group of every permuted channel."""

    perm: torch.Tensor  # long [channels]: new position -> old channel
    group_id: torch.Tensor  # long [channels]: new position -> group index in [0, n_groups)
    n_groups: int
    head_perm: torch.Tensor | None = None  # long [heads]: new head -> old head (Mamba2)

    def runs(self) -> list[tuple[int, int, int]]:
        """(start, end, group) of each contiguous run of one group id."""
        return group_runs(self.group_id)


def group_runs(group_id: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, group) of each maximal run of equal values in a 1-D long tensor."""
    values, counts = torch.unique_consecutive(group_id, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends, values.tolist()))


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The permutation undoing `perm`."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _sklearn_cluster() -> ModuleType:
    """sklearn.cluster, imported on first use (scikit-learn is the `mamba` extra)."""
    try:
        from sklearn import cluster
    except ImportError as err:
        raise QuantscaleError(
            "Quamba2 channel grouping needs scikit-learn: pip install 'quantscale[mamba]' "
            "(or scikit-learn)"
        ) from err
    return cluster


def ward_labels(features: np.ndarray, n_clusters: int, key: np.ndarray | None = None) -> np.ndarray:
    """Agglomerative (ward) cluster labels, numbered by ascending mean `key` per cluster
    (default: the rows' norms). `n_clusters` is clamped to the number of rows."""
    n = features.shape[0]
    k = max(1, min(n_clusters, n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        raw = np.arange(n)
    else:
        ward = _sklearn_cluster().AgglomerativeClustering(n_clusters=k, linkage="ward")
        raw = ward.fit(features).labels_
    return _renumber(raw, np.linalg.norm(features, axis=1) if key is None else key)


def kmeans_1d_labels(values: np.ndarray, n_clusters: int) -> np.ndarray:
    """1-D k-means labels (Lloyd, quantile initialisation), numbered by ascending center.

    Clusters of 1-D k-means are intervals, so sorted input gives contiguous runs of labels.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    k = max(1, min(n_clusters, len(np.unique(v))))
    if k == 1:
        return np.zeros(len(v), dtype=np.int64)
    init = np.quantile(v[:, 0], (np.arange(k) + 0.5) / k).reshape(-1, 1)
    init = np.unique(init, axis=0)
    if len(init) < k:  # ties in the quantiles: spread the centers over the distinct values
        distinct = np.unique(v[:, 0])
        init = distinct[np.linspace(0, len(distinct) - 1, k).round().astype(int)].reshape(-1, 1)
    kmeans = _sklearn_cluster().KMeans(n_clusters=k, init=init, n_init=1, random_state=0)
    raw = kmeans.fit(v).labels_
    return _renumber(raw, v[:, 0])


def _renumber(labels: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Relabel clusters 0..k-1 by ascending mean `key` (ties: lowest first member)."""
    uniq = np.unique(labels)
    order = sorted(
        uniq, key=lambda c: (float(key[labels == c].mean()), int(np.argmax(labels == c)))
    )
    mapping = {int(c): i for i, c in enumerate(order)}
    return np.array([mapping[int(c)] for c in labels], dtype=np.int64)


def plan_heads(stats: torch.Tensor, head_groups: int, channel_groups: int) -> GroupPlan:
    """Plan for Mamba2's x: `stats` [ssd_groups, heads_per_group, head_dim] per-channel ranges.

    Per head, channels are sorted ascending; per SSD group, heads are clustered (ward) into
    `head_groups` and laid out cluster by cluster; per head group, sorted channel positions
    are clustered (1-D k-means) into `channel_groups`. Group ids are numbered
    ssd_group * head_groups * channel_groups + head_group * channel_groups + channel_group.
    Heads never leave their SSD group and channels never leave their head.
    """
    n_ssd, n_heads, head_dim = stats.shape
    s = stats.detach().float().cpu()
    sorted_vals, chan_order = torch.sort(s, dim=-1, stable=True)
    per_ssd = head_groups * channel_groups
    perm, group_id, head_perm = [], [], []
    for g in range(n_ssd):
        profiles = torch.log(sorted_vals[g].clamp_min(1e-8))
        magnitude = sorted_vals[g].amax(dim=-1).numpy()
        head_labels = ward_labels(profiles.numpy(), head_groups, key=magnitude)
        for hg in range(int(head_labels.max()) + 1):
            heads = np.flatnonzero(head_labels == hg)
            envelope = sorted_vals[g, heads].amax(dim=0).numpy()
            chan_labels = torch.from_numpy(kmeans_1d_labels(envelope, channel_groups))
            for h in heads.tolist():
                head = g * n_heads + h
                head_perm.append(head)
                perm.append(head * head_dim + chan_order[g, h])
                group_id.append(g * per_ssd + hg * channel_groups + chan_labels)
    return GroupPlan(
        perm=torch.cat(perm).long(),
        group_id=torch.cat(group_id).long(),
        n_groups=n_ssd * per_ssd,
        head_perm=torch.tensor(head_perm, dtype=torch.long),
    )


def plan_channels(stats: torch.Tensor, head_groups: int, channel_groups: int) -> GroupPlan:
    """Plan for Mamba1's x (`stats` [channels]): every channel is its own head.

    Channels are clustered (ward, on their range) into `head_groups`, and each of those into
    `channel_groups` with 1-D k-means; channels are laid out group by group, ascending.
    """
    s = stats.detach().float().cpu()
    order = torch.sort(s, stable=True).indices
    head_labels = ward_labels(s[order].numpy().reshape(-1, 1), head_groups)
    perm, group_id = [], []
    for hg in range(int(head_labels.max()) + 1):
        members = order[torch.from_numpy(head_labels == hg)]
        chan_labels = torch.from_numpy(kmeans_1d_labels(s[members].numpy(), channel_groups))
        perm.append(members)
        group_id.append(hg * channel_groups + chan_labels)
    return GroupPlan(
        perm=torch.cat(perm).long(),
        group_id=torch.cat(group_id).long(),
        n_groups=head_groups * channel_groups,
    )
