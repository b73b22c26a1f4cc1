"""Metrics of generative quality computed from features: FID, KID, precision/recall and the
Inception (or classifier) score. All in float64; random subsets are drawn from seeded generators."""

from __future__ import annotations

import numpy as np
import torch

from ditlab.evaluation.fid import fid_from_features


def check_features(name: str, feats: np.ndarray) -> np.ndarray:
    if feats.ndim != 2 or len(feats) == 0:
        raise ValueError(f"{name}: expected features [N, D], got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name}: features contain NaN or Inf")
    return feats.astype(np.float64, copy=False)


def fid(fake: np.ndarray, real: np.ndarray) -> float:
    return fid_from_features(check_features("fake", fake), check_features("real", real))


def kid_subset_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018)."""
    m, d = len(x), x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kid(fake: np.ndarray, real: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation of the MMD^2 over random subsets.

    Each subset draws `subset_size` real rows, then as many fake rows, without replacement, from
    `np.random.RandomState(seed)` (the draw order clean-fid uses, so seeded runs match it).
    Fewer images than `subset_size` on either side is an error, not a quietly smaller subset."""
    fake, real = check_features("fake", fake), check_features("real", real)
    n = min(len(fake), len(real))
    if n < subset_size:
        raise ValueError(f"KID subset_size {subset_size} exceeds the smaller set ({n} images); "
                         f"lower kid.subset_size or add images")
    if subset_size < 2:
        raise ValueError("KID subset_size must be at least 2")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        r = real[rng.choice(len(real), subset_size, replace=False)]
        f = fake[rng.choice(len(fake), subset_size, replace=False)]
        values.append(kid_subset_mmd(r, f))
    return float(np.mean(values)), float(np.std(values))


def _kth_neighbour_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row."""
    radii = []
    for start in range(0, len(feats), chunk):
        d = torch.cdist(feats[start : start + chunk], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(radii)


def _inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     chunk: int = 1024) -> torch.Tensor:
    inside = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk], centres)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside)


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls reaching each sample's k-th nearest neighbour. Precision: fraction of fake samples
    inside the real manifold; recall: fraction of real samples inside the fake manifold."""
    fake_t = torch.from_numpy(check_features("fake", fake))
    real_t = torch.from_numpy(check_features("real", real))
    if min(len(fake_t), len(real_t)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images on each side")
    precision = _inside_any_ball(fake_t, real_t, _kth_neighbour_radii(real_t, k)).double().mean()
    recall = _inside_any_ball(real_t, fake_t, _kth_neighbour_radii(fake_t, k)).double().mean()
    return float(precision), float(recall)


def score_from_probabilities(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal parts (Salimans et al. 2016).
    With Inception's class probabilities this is the Inception Score; with another classifier's,
    the classifier score."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < splits:
        raise ValueError(f"need at least {splits} probability rows, got shape {probs.shape}")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
