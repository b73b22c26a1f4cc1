"""Frechet Inception Distance (Heusel et al. 2017), in float64."""

from __future__ import annotations

import numpy as np
from scipy import linalg


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [N, D]."""
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(features)}")
    features = features.astype(np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two Gaussians."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product (few samples): regularize both covariances slightly.
        eye = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eye) @ (sigma2 + eye))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets [N, D]. With fewer images than feature dimensions (a few hundred
    samples against Inception's 2048) the trace term comes from an N_a x N_b matrix instead of the
    D x D square root; both give the same number (see `trace_sqrt_product`)."""
    if len(a) + len(b) >= a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    (mu1, _), (mu2, _) = feature_statistics(a), feature_statistics(b)  # also checks N >= 2
    a_c, b_c = a.astype(np.float64) - mu1, b.astype(np.float64) - mu2
    trace1, trace2 = (a_c**2).sum() / (len(a) - 1), (b_c**2).sum() / (len(b) - 1)
    diff = mu1 - mu2
    return float(diff @ diff + trace1 + trace2 - 2.0 * trace_sqrt_product(a_c, b_c))


def trace_sqrt_product(a_c: np.ndarray, b_c: np.ndarray) -> float:
    """Tr (S1 S2)^{1/2} for the covariances S1 = A A^T, S2 = B B^T of centred features, with
    A = a_c^T / sqrt(N_a - 1) and B likewise. S1 S2 = A (A^T B) B^T has the nonzero eigenvalues of
    (A^T B)(A^T B)^T, which are real and non-negative, so the trace of the square root is the sum of
    the singular values of A^T B: an N_a x N_b SVD in place of a D x D sqrtm (about 20-40 s on two
    cores for D = 2048), and exact where sqrtm of a singular product is not."""
    m = (a_c @ b_c.T) / np.sqrt((len(a_c) - 1) * (len(b_c) - 1))
    return float(np.linalg.svd(m, compute_uv=False).sum())
