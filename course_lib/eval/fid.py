"""Frechet distance between two sets of features (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule", eq. 6):

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

The course measures it in the 128-d feature space of its own Fashion-MNIST classifier (not
Inception: 28x28 grey garments are far from ImageNet), against the 10,000 test images, and
always reports beside it the FID of the same number of *real* training images: FID is biased
upwards at small sample counts, so that number is the floor a perfect model would reach.
"""
from __future__ import annotations

import torch


def statistics(features: torch.Tensor):
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64."""
    if not isinstance(features, torch.Tensor) or features.dtype.is_complex or features.dtype == torch.bool:
        raise TypeError(f"features must be a real tensor (N, D), got {getattr(features, 'dtype', type(features).__name__)}")
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {tuple(features.shape)}")
    bad = ~torch.isfinite(features.double()).all(1)
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} of {features.shape[0]} feature vectors hold NaN or inf (from NaN or "
                         "inf images?); FID needs finite samples")
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    w, q = torch.linalg.eigh(s)
    return (q * w.clamp(min=0).sqrt()) @ q.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance of N(mu1, sigma1) and N(mu2, sigma2).

    Tr((S1 S2)^(1/2)) is computed as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), which has the same
    eigenvalues and stays symmetric, so eigh is stable."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(z).double() for z in (mu1, mu2, sigma1, sigma2))
    D = mu1.shape[0] if mu1.dim() == 1 else -1
    if D < 1 or mu2.shape != (D,) or sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(f"need means of one length D and (D, D) covariances, got {tuple(mu1.shape)}, "
                         f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)} (features of different sizes?)")
    if not all(bool(torch.isfinite(z).all()) for z in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("the means and covariances must be finite (NaN or inf in the features?)")
    r1 = _sqrtm_psd(sigma1)
    cross = torch.linalg.eigvalsh(r1 @ sigma2 @ r1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * cross)


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*statistics(a), *statistics(b))
