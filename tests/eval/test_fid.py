"""The Frechet distance, against its closed form where the covariances are diagonal."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from course_lib.eval import fid


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_diagonal_closed_form(D, seed):
    """For diagonal S_1 = diag(a), S_2 = diag(b): FID = ||mu_1 - mu_2||^2 + sum (sqrt(a) - sqrt(b))^2."""
    g = torch.Generator().manual_seed(seed)
    mu1, mu2 = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    a, b = torch.rand(D, generator=g, dtype=torch.float64) * 3, torch.rand(D, generator=g, dtype=torch.float64) * 3
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    got = fid.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert isinstance(got, float)
    assert got == pytest.approx(float(expected), rel=1e-9, abs=1e-9)


def test_rotated_diagonal_is_the_same():
    """FID is invariant to rotating both Gaussians together, so a full covariance works too."""
    g = torch.Generator().manual_seed(0)
    D = 6
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    mu1, mu2 = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    a, b = torch.rand(D, generator=g, dtype=torch.float64) + 0.1, torch.rand(D, generator=g, dtype=torch.float64) + 0.1
    plain = fid.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    rotated = fid.frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert rotated == pytest.approx(plain, rel=1e-9)


def _features(n=300, d=8, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + shift


def test_same_features_give_zero():
    x = _features()
    assert fid.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than dimensions: a singular covariance; the square roots of its round-off
    # eigenvalues (~1e-16 relative) leave ~1e-8 of the trace, of either sign
    few = _features(n=5, d=8)
    scale = float(torch.cov(few.double().T).trace())
    assert fid.fid_from_features(few, few) == pytest.approx(0.0, abs=1e-6 * scale)


def test_symmetric_order_invariant_and_positive():
    x, y = _features(seed=0), _features(seed=1, shift=0.5)
    d = fid.fid_from_features(x, y)
    assert d > 0
    assert fid.fid_from_features(y, x) == pytest.approx(d, rel=1e-8)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))
    assert fid.fid_from_features(x[perm], y) == pytest.approx(d, rel=1e-8)
    # a pure mean shift adds exactly ||shift||^2
    assert fid.fid_from_features(x, x + 2.0) == pytest.approx(4.0 * x.shape[1], rel=1e-6)


def test_statistics():
    x = _features(n=50, d=3)
    mu, sigma = fid.statistics(x)
    assert mu.dtype == sigma.dtype == torch.float64 and mu.shape == (3,) and sigma.shape == (3, 3)
    centred = x.double() - x.double().mean(0)
    torch.testing.assert_close(sigma, centred.T @ centred / 49)  # unbiased covariance
    torch.testing.assert_close(mu, x.double().mean(0))


@pytest.mark.parametrize("shape", [(10,), (1, 4), (2, 3, 4), (0, 3)])
def test_statistics_errors(shape):
    with pytest.raises(ValueError, match=r"\(N, D\) with N >= 2"):
        fid.statistics(torch.zeros(shape))
