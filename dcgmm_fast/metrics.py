"""Outlier-detection metrics: ROC curve and AUROC of inlier vs outlier scores (higher score = more inlier)."""
from __future__ import annotations

from typing import Tuple

import torch


def auroc(inlier: torch.Tensor, outlier: torch.Tensor) -> float:
    """Area under the ROC curve: P(inlier score > outlier score) + 1/2 P(equal) (Mann-Whitney U / (n_in n_out)).

    Args:
        inlier: (n_in,) scores of inliers; outlier: (n_out,) scores of outliers (higher = more inlier).
    """
    a, b = torch.as_tensor(inlier).double().reshape(-1), torch.as_tensor(outlier).double().reshape(-1)
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("inlier, outlier: expected at least one score each")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("inlier, outlier: scores must be finite")
    both = torch.cat([a, b])
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, both.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    values, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    sums = torch.zeros(values.numel(), dtype=torch.float64).index_add(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    u = ranks[: a.numel()].sum() - a.numel() * (a.numel() + 1) / 2
    return float(u / (a.numel() * b.numel()))


def roc_curve(inlier: torch.Tensor, outlier: torch.Tensor, n_thresholds: int = 100) -> Tuple[torch.Tensor, ...]:
    """The original's curve (spec 3.5): thresholds evenly spaced between the global min and max score;
    x = fraction of inliers with score > thr ("inliers kept"), y = fraction of outliers with score < thr
    ("outliers rejected").

    Returns:
        (thresholds, inliers_kept, outliers_rejected), each (n_thresholds,) float64.
    """
    a, b = torch.as_tensor(inlier).double().reshape(-1), torch.as_tensor(outlier).double().reshape(-1)
    lo, hi = float(torch.cat([a, b]).min()), float(torch.cat([a, b]).max())
    thr = torch.linspace(lo, hi, n_thresholds, dtype=torch.float64)
    kept = (a[None, :] > thr[:, None]).double().mean(1)
    rejected = (b[None, :] < thr[:, None]).double().mean(1)
    return thr, kept, rejected


def original_auc(inlier: torch.Tensor, outlier: torch.Tensor, n_thresholds: int = 100) -> float:
    """The original code's AUC (spec 3.5): the trapezoid area under ``roc_curve``'s points (inliers kept,
    outliers rejected) sorted by x; it approaches ``auroc`` as the thresholds get finer."""
    _, kept, rejected = roc_curve(inlier, outlier, n_thresholds)
    order = kept.argsort()
    x, y = kept[order], rejected[order]
    return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum())
