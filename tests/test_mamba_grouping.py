"""Head / channel clustering for Quamba2's piecewise scales (quantscale.mamba.grouping)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from quantscale.errors import QuantscaleError
from quantscale.mamba.grouping import (
    group_runs,
    inverse_permutation,
    kmeans_1d_labels,
    plan_channels,
    plan_heads,
    ward_labels,
)


def _head_stats(seed: int = 0) -> torch.Tensor:
    """[2 SSD groups, 8 heads, 16 channels]: in each group, heads 1, 4, 6 are ~10x larger."""
    gen = torch.Generator().manual_seed(seed)
    stats = torch.rand(2, 8, 16, generator=gen) + 0.5
    stats[:, [1, 4, 6]] *= 10
    return stats


def test_group_runs_and_inverse():
    assert group_runs(torch.tensor([0, 0, 1, 1, 1, 0])) == [(0, 2, 0), (2, 5, 1), (5, 6, 0)]
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(perm[inverse_permutation(perm)], torch.arange(10))


def test_kmeans_1d_contiguous_and_ordered():
    values = np.sort(np.concatenate([np.full(5, 1.0), np.full(3, 5.0), np.full(4, 20.0)]))
    labels = kmeans_1d_labels(values, 3)
    assert labels.tolist() == [0] * 5 + [1] * 3 + [2] * 4
    assert kmeans_1d_labels(values, 1).tolist() == [0] * 12
    assert kmeans_1d_labels(np.ones(6), 4).tolist() == [0] * 6  # one distinct value


def test_ward_separates_magnitudes():
    feats = np.array([[1.0], [1.1], [9.0], [0.9], [10.0]])
    labels = ward_labels(feats, 2)
    assert labels.tolist() == [0, 0, 1, 0, 1]  # numbered by ascending magnitude
    assert ward_labels(feats, 9).tolist() == [1, 2, 3, 0, 4]  # clamped: one per row


@pytest.mark.parametrize("hg,cg", [(2, 2), (4, 4), (8, 8)])
def test_plan_heads_structure(hg, cg):
    stats = _head_stats()
    plan = plan_heads(stats, hg, cg)
    n_ssd, n_heads, head_dim = stats.shape
    assert plan.n_groups == n_ssd * hg * cg
    assert sorted(plan.perm.tolist()) == list(range(stats.numel()))
    assert sorted(plan.head_perm.tolist()) == list(range(n_ssd * n_heads))
    # heads stay in their SSD group; channels stay in their head, in head_perm order
    assert torch.equal(plan.head_perm // n_heads, torch.arange(n_ssd * n_heads) // n_heads)
    heads_of_channels = (plan.perm // head_dim).reshape(-1, head_dim)
    assert torch.equal(heads_of_channels, plan.head_perm[:, None].expand(-1, head_dim))
    # group ids: within the SSD group's range, non-decreasing inside each head
    gid = plan.group_id.reshape(n_ssd, n_heads, head_dim)
    per_ssd = hg * cg
    assert (gid // per_ssd == torch.arange(n_ssd)[:, None, None]).all()
    assert (gid.diff(dim=-1) >= 0).all()
    # every run of one group inside a head is contiguous: at most cg runs per head
    for head in gid.reshape(-1, head_dim):
        assert len(group_runs(head)) <= cg


def test_plan_heads_groups_tighten_ranges():
    stats = _head_stats()
    plan = plan_heads(stats, 2, 4)
    flat = stats.reshape(-1)[plan.perm]
    # the large heads (1, 4, 6 of each SSD group) form their own head group
    large = {g * 8 + h for g in range(2) for h in (1, 4, 6)}
    head_group = (plan.group_id.reshape(16, 16)[:, 0] % 8) // 4
    by_head = dict(zip(plan.head_perm.tolist(), head_group.tolist()))
    assert {h for h, grp in by_head.items() if grp == 1} == large
    # each group's max is at most the max of its SSD group, and the mean ratio of a channel's
    # range to its group's max is far closer to 1 than to the per-tensor max
    group_max = torch.zeros(plan.n_groups).scatter_reduce(0, plan.group_id, flat, "amax")
    ratio_group = (flat / group_max[plan.group_id]).mean()
    ratio_tensor = (flat / flat.max()).mean()
    assert ratio_group > 0.7 > 0.4 > ratio_tensor


def test_plan_channels_mamba1():
    stats = torch.cat([torch.full((6,), 1.0), torch.full((4,), 50.0), torch.full((6,), 3.0)])
    plan = plan_channels(stats, 2, 2)
    assert sorted(plan.perm.tolist()) == list(range(16))
    assert plan.n_groups == 4 and plan.head_perm is None
    assert (plan.group_id.diff() >= 0).all()  # contiguous, ascending groups
    assert set(plan.perm[plan.group_id >= 2].tolist()) == set(range(6, 10))  # the 50s


def test_missing_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now fails
    with pytest.raises(QuantscaleError, match=r"scikit-learn: pip install 'quantscale\[mamba\]'"):
        ward_labels(np.random.default_rng(0).random((6, 3)), 2)
    with pytest.raises(QuantscaleError, match="scikit-learn"):
        kmeans_1d_labels(np.arange(8.0), 2)
