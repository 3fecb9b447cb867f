"""Frechet distance between two sets of features (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule", eq. 6):

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

The course measures it in the 128-d feature space of its own Fashion-MNIST classifier (not
Inception: 28x28 grey garments are far from ImageNet), against the 10,000 test images, and
always reports beside it the FID of the same number of *real* training images: FID is biased
upwards at small sample counts, so that number is the floor a perfect model would reach.

`fid_interval` and `paired_fid_difference` add intervals (by half-sampling), for one FID and for the
difference of two rows sampled from the same x_T (lessons 02-05 word each comparison by them);
`noise_word` turns a difference's interval into "outside the noise" or "within the noise".
"""
from __future__ import annotations

from typing import NamedTuple

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


# ---- confidence intervals: FIDs of random halves --------------------------------------------------
#
# An FID measured on a few hundred samples moves by several points with the draw of samples (the
# real-vs-real FID of two splits of 250 moves by ~9): a difference between two rows means something
# only when it is outside that noise. The noise is estimated by half-sampling (McCarthy 1969; the
# delete-d jackknife with d = N/2, Shao and Wu 1989): the FID of a random half of the samples
# against a random half of the reference, many times. For a mean, the spread of half-sample means
# around the full mean is exactly the spread of the full mean over fresh draws (variance
# s^2 (2/N - 1/N) = s^2 / N), and every half holds each row at most once.
#
# Why not the bootstrap (rows drawn with replacement)? Its resamples repeat rows, by chance more or
# fewer each time, and in D = 128 features at N = 250 the repeats move a resample's covariance
# spectrum, and so its FID, more than the draw of samples does: on Gaussian features its intervals
# came out 2-5 times wider than the spread of FID over fresh samples (2 times for a paired
# difference), depending on the spectrum. Half-samples all hold the same number of distinct rows,
# and match that spread: within ~15% for paired differences, and about 1.5 times too wide
# (conservative) for one FID at D >= N/4, on Gaussian features (see
# test_interval_width_matches_fresh_draws in tests/eval/test_fid.py, at D = N/2).
#
# Rows sampled from the same x_T are paired sample by sample: the same half of a and of b, against
# the same half of the reference, cancels most of the noise they share.

class Estimate(NamedTuple):
    value: float      # the FID (or FID difference) of the features as given
    interval: tuple   # (lo, hi): the half-sampling interval at the requested level


_BLOCK_BYTES = 64 * 2**20  # memory for the per-unit outer products of one feature set...
_MIN_UNITS = 256           # ...but at least this many resampling units (128 MB at D = 256)


class _Moments(NamedTuple):
    mean: torch.Tensor    # (D,) mean of all rows
    sizes: torch.Tensor   # (G,) rows in each block
    sums: torch.Tensor    # (G, D) sum of the centred rows of each block
    outer: torch.Tensor   # (G, D * D) sum of their outer products


def _blocks(n: int, d: int, g: torch.Generator):
    """The units halves are drawn from, for n rows: None when every row is its own unit (up to 512
    rows at D = 128, 256 at D = 256), else the rows shuffled into that many equal blocks of indices.
    The rows are iid, so the blocks are too, and halves of the blocks have the spread of halves of
    the rows; it is only estimated from fewer units."""
    units = max(_MIN_UNITS, _BLOCK_BYTES // (8 * d * d))
    return None if n <= units else list(torch.tensor_split(torch.randperm(n, generator=g), units))


def _moments(x: torch.Tensor, blocks) -> _Moments:
    f = x.double()
    mean = f.mean(0)
    c = f - mean                                                   # centred: no cancellation later
    if blocks is None:                                             # one unit per row
        return _Moments(mean, torch.ones(len(c), dtype=c.dtype, device=c.device), c,
                        (c[:, :, None] * c[:, None, :]).flatten(1))
    parts = [c[i.to(c.device)] for i in blocks]
    sums = torch.stack([p.sum(0) for p in parts])                  # (G, D)
    outer = torch.stack([(p.T @ p).flatten() for p in parts])      # (G, D * D)
    sizes = torch.tensor([len(i) for i in blocks], dtype=c.dtype, device=c.device)
    return _Moments(mean, sizes, sums, outer)


def _resampled(mom: _Moments, counts: torch.Tensor):
    """Means (B, D) and covariances (B, D, D) of B weighted resamples; counts (B, G): how often each
    unit is taken (1 for the units of a half, 0 for the rest)."""
    n = counts @ mom.sizes                                         # (B,) rows in each resample
    s = counts @ mom.sums                                          # (B, D)
    q = (counts @ mom.outer).unflatten(1, (s.shape[1], s.shape[1]))  # (B, D, D)
    cov = (q - s[:, :, None] * s[:, None, :] / n[:, None, None]) / (n - 1)[:, None, None]
    return mom.mean + s / n[:, None], cov


def _factor_batch(s: torch.Tensor) -> torch.Tensor:
    """F (B, D, D) with F F^T = s: Cholesky where s is positive definite (cheap), the symmetric
    square root by eigh where it is singular (features that never vary, fewer rows than D)."""
    f, info = torch.linalg.cholesky_ex(s)
    bad = info != 0
    if bool(bad.any()):
        w, q = torch.linalg.eigh(s[bad])
        f[bad] = (q * w.clamp(min=0).sqrt()[:, None, :]) @ q.transpose(1, 2)
    return f


def _frechet_batch(mu, sigma, mu_ref, sigma_ref, factor_ref) -> torch.Tensor:
    """Frechet distances (B,) of B pairs, given F (B, D, D) with F F^T = sigma_ref: Tr((S S_ref)^(1/2))
    is the sum of the square roots of the eigenvalues of F^T S F (the same eigenvalues as S F F^T),
    so two sample sets measured against one reference half share its factor."""
    cross = torch.linalg.eigvalsh(factor_ref.transpose(1, 2) @ sigma @ factor_ref).clamp(min=0).sqrt().sum(1)
    trace = torch.diagonal(sigma, dim1=1, dim2=2).sum(1) + torch.diagonal(sigma_ref, dim1=1, dim2=2).sum(1)
    return ((mu - mu_ref) ** 2).sum(1) + trace - 2 * cross


def _check_features(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype.is_complex or x.dtype == torch.bool:
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"{name} must be a real tensor of features (N, D), got {got}")
    if x.dim() != 2 or x.shape[0] < 4:
        raise ValueError(f"{name} must be features (N, D) with N >= 4 (halves of at least 2 rows), "
                         f"got {tuple(x.shape)}")
    bad = ~torch.isfinite(x.double()).all(1)
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} of {x.shape[0]} rows of {name} hold NaN or inf (from NaN or inf "
                         "images?); FID needs finite features")


def _check_interval_args(sets: dict, n_boot, level) -> None:
    for name, x in sets.items():
        _check_features(name, x)
    dims = {name: x.shape[1] for name, x in sets.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"features of different sizes D: {dims} (from two different feature extractors?)")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1 (0.95 for a 95% interval), got {level!r}")


def _halves(units: int, b: int, g: torch.Generator) -> torch.Tensor:
    """(b, units): 1 for the units of a random half (floor(units / 2) of them, drawn without
    replacement), 0 for the rest, for b half-samples."""
    return (torch.rand(b, units, generator=g).argsort(1) < units // 2).double()


def _half_sample_fids(sets: list, reference: torch.Tensor, n_halves: int, seed: int, chunk: int = 32):
    """(n_halves, len(sets)) FIDs of random halves of each sample set against random halves of the
    reference: every set cut at the same rows (they are paired by row), one reference half for all."""
    g = torch.Generator().manual_seed(seed)
    n, m, d = sets[0].shape[0], reference.shape[0], reference.shape[1]
    rows, ref_rows = _blocks(n, d, g), _blocks(m, d, g)
    moms, ref = [_moments(x, rows) for x in sets], _moments(reference, ref_rows)
    out = []
    for start in range(0, n_halves, chunk):
        b = min(chunk, n_halves - start)
        keep = [_halves(len(mom.sizes), b, g).to(mom.sums.device) for mom in (moms[0], ref)]
        mu_r, s_r = _resampled(ref, keep[1])
        f_r = _factor_batch(s_r)
        fids = [_frechet_batch(*_resampled(mom, keep[0]), mu_r, s_r, f_r) for mom in moms]
        out.append(torch.stack(fids, 1))                           # (b, len(sets))
    return torch.cat(out).cpu()


def _centred_interval(value: float, fids: torch.Tensor, level: float) -> tuple:
    """The middle `level` of the half-sample values, moved so that their mean is `value`."""
    q = torch.quantile(fids, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=fids.dtype))
    shift = value - float(fids.mean())
    return (float(q[0]) + shift, float(q[1]) + shift)


def fid_interval(samples: torch.Tensor, reference: torch.Tensor, *, n_boot: int = 500, seed: int = 0,
                 level: float = 0.95) -> Estimate:
    """FID of samples (N, D) against reference (M, D) features, and an interval for it from n_boot
    random halves (see the notes above: half-sampling, not the with-replacement bootstrap).

    Both sets are halved: the samples because they are one draw of the model's output, the
    reference because it is one draw of the data (at M = 10,000 it adds little; a reference as
    small as the samples adds as much as they do), so the interval holds both sources of noise.
    A half's FID is larger than the full FID by about FID's small-sample bias (which grows as
    1/N), so the interval is the middle `level` of the half-sample FIDs, shifted by
    (value - their mean) so that it is centred on the value measured.

    What it covers: the FID of N fresh samples against a fresh reference, the number the tables
    report, compared with the real-vs-real FID at the same N. Not the FID of infinitely many
    samples, which lies lower by the small-sample bias (the real-vs-real FID shows its size).
    At D >= N/4 it is about 1.5 times wider than the spread of fresh draws. To compare two rows
    sampled from the same x_T, use `paired_fid_difference`: it is much tighter than two intervals
    side by side.

    Each half weights precomputed per-row outer products (no copy of the features per half) and
    costs a Cholesky factor and one eigvalsh of D x D matrices: about 2 s for 500 halves at D = 128
    on one CPU core. With more rows than fit in 64 MB of outer products (or 256 units), rows are
    halved in shuffled blocks. Features: (N, D), N >= 4, from `FashionEvaluator.features` or
    `attributes.features`, any real dtype, on any device. n_boot: how many halves; seed: which.
    """
    _check_interval_args({"samples": samples, "reference": reference}, n_boot, level)
    value = fid_from_features(samples, reference)
    halves = _half_sample_fids([samples], reference, n_boot, seed)[:, 0]
    return Estimate(value, _centred_interval(value, halves, level))


def paired_fid_difference(a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor, *, n_boot: int = 500,
                          seed: int = 0, level: float = 0.95) -> Estimate:
    """fid(b) - fid(a) for two rows of paired samples (row i of a and of b from the same x_T), and a
    paired interval for it: each of the n_boot halves keeps the SAME rows of a and b and measures
    both against the same half of the reference, so the noise the rows share (the x_T, the
    reference) cancels in the difference. The order is that of `caption_sweep.paired_difference`
    (b - a): a negative value means b is better (lower FID).

    The interval is centred on the difference measured, as in `fid_interval`; the small-sample
    biases of a and b nearly cancel in the difference, so it also nearly covers the difference of
    their infinite-sample FIDs. Word a comparison with `noise_word(interval)`.
    Identical a and b give exactly (0.0, (0.0, 0.0)).
    """
    _check_interval_args({"a": a, "b": b, "reference": reference}, n_boot, level)
    if a.shape != b.shape:
        raise ValueError(f"paired rows must hold the same number of samples (one per x_T), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    value = fid_from_features(b, reference) - fid_from_features(a, reference)
    halves = _half_sample_fids([a, b], reference, n_boot, seed)
    return Estimate(value, _centred_interval(value, halves[:, 1] - halves[:, 0], level))


def noise_word(interval: tuple) -> str:
    """'outside the noise' when a difference's interval excludes 0, else 'within the noise':
    the course's one wording, `caption_sweep.noise_word`, imported here when called so that
    `eval.fid` stays free of the sampling stack."""
    from course_lib.eval.caption_sweep import noise_word as word
    return word(interval)
