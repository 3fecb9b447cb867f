"""The Frechet distance, against its closed form where the covariances are diagonal."""
import math

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


# ---- intervals: fid_interval and paired_fid_difference -------------------------------------------

def _gaussian(n, mean, var, g):
    """n rows of N(mean, diag(var)): FID between two such Gaussians has the closed form above."""
    return mean + torch.randn(n, mean.numel(), generator=g, dtype=torch.float64) * var.sqrt()


def _closed_form(mu1, var1, mu2, var2):
    return float(((mu1 - mu2) ** 2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum())


def test_interval_covers_the_closed_form_at_large_n():
    g = torch.Generator().manual_seed(0)
    D = 4
    mu_s, mu_r = torch.tensor([0.5, 0.0, -0.3, 0.2], dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    var_s, var_r = torch.tensor([1.5, 0.8, 1.0, 2.0], dtype=torch.float64), torch.ones(D, dtype=torch.float64)
    samples, reference = _gaussian(20_000, mu_s, var_s, g), _gaussian(20_000, mu_r, var_r, g)
    value, (lo, hi) = fid.fid_interval(samples, reference, n_boot=200)
    assert value == pytest.approx(fid.fid_from_features(samples, reference), abs=0)
    assert lo < value < hi
    truth = _closed_form(mu_s, var_s, mu_r, var_r)
    assert lo <= truth <= hi
    assert hi - lo < 0.2 * truth  # an interval, not everything


def test_identical_rows_differ_by_exactly_zero():
    g = torch.Generator().manual_seed(1)
    a = _features(n=200, d=6, seed=3)
    reference = torch.randn(300, 6, generator=g)
    value, interval = fid.paired_fid_difference(a, a.clone(), reference, n_boot=100)
    assert value == 0.0 and interval == (0.0, 0.0)
    assert fid.noise_word(interval) == "within the noise"


def test_a_shifted_copy_is_outside_the_noise():
    """With b = a + delta the covariances are equal, so fid(b) - fid(a) is exactly
    ||delta||^2 + 2 delta . (mean(a) - mean(reference)), and a clear shift is resolved."""
    g = torch.Generator().manual_seed(2)
    a, reference = torch.randn(250, 8, generator=g), torch.randn(1000, 8, generator=g)
    delta = torch.full((8,), 0.15)
    value, (lo, hi) = fid.paired_fid_difference(a, a + delta, reference, n_boot=200)
    d64 = delta.double()
    expected = float(d64 @ d64 + 2 * d64 @ (a.double().mean(0) - reference.double().mean(0)))
    assert value == pytest.approx(expected, rel=1e-6)
    assert 0 < lo < value < hi
    assert fid.noise_word((lo, hi)) == "outside the noise"
    # the order is b - a, as in caption_sweep.paired_difference: the reverse flips the sign
    back, (blo, bhi) = fid.paired_fid_difference(a + delta, a, reference, n_boot=200)
    assert back == pytest.approx(-value, rel=1e-9) and bhi < 0


def test_pairing_cancels_the_shared_noise():
    """Rows that share x_T share most of their noise: the paired interval is much narrower than
    the one for the same rows with the pairing broken (b shuffled), and than either row's own."""
    g = torch.Generator().manual_seed(4)
    z, reference = torch.randn(250, 8, generator=g), torch.randn(2000, 8, generator=g)
    a, b = z * 1.2 + 0.5, z * 1.3 + 0.55
    _, (lo, hi) = fid.paired_fid_difference(a, b, reference, n_boot=200)
    shuffled = b[torch.randperm(250, generator=g)]
    _, (ulo, uhi) = fid.paired_fid_difference(a, shuffled, reference, n_boot=200)
    _, (alo, ahi) = fid.fid_interval(a, reference, n_boot=200)
    assert hi - lo < 0.5 * (uhi - ulo)
    assert hi - lo < 0.5 * (ahi - alo)


def test_paired_difference_covers_the_true_difference():
    """Over 40 independent draws at N = 150 the 95% interval of fid(b) - fid(a) covers the
    closed-form difference of the two Gaussians (rows of a and b share their noise, as rows
    sampled from one x_T do) most of the time."""
    D = 5
    mu_a = torch.tensor([0.3, 0.0, 0.0, -0.2, 0.1], dtype=torch.float64)
    mu_b = mu_a + 0.2
    var_a = torch.ones(D, dtype=torch.float64)
    var_b = torch.tensor([1.2, 1.0, 0.8, 1.3, 1.0], dtype=torch.float64)
    mu_r, var_r = torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)
    truth = _closed_form(mu_b, var_b, mu_r, var_r) - _closed_form(mu_a, var_a, mu_r, var_r)
    covered = 0
    for draw in range(40):
        g = torch.Generator().manual_seed(100 + draw)
        z = torch.randn(150, D, generator=g, dtype=torch.float64)
        reference = _gaussian(300, mu_r, var_r, g)
        _, (lo, hi) = fid.paired_fid_difference(mu_a + z * var_a.sqrt(), mu_b + z * var_b.sqrt(), reference,
                                                n_boot=200, seed=draw)
        covered += lo <= truth <= hi
    assert covered >= 32, f"covered the true difference {truth:.3f} in {covered} of 40 draws"


def test_interval_covers_the_mean_fid_at_this_n():
    """fid_interval is centred on the value measured, so it covers what N fresh samples score on
    average (estimated from 200 fresh draws), small-sample bias included."""
    D, N, M = 5, 120, 240
    mu_s, var_s = torch.full((D,), 0.3, dtype=torch.float64), torch.full((D,), 1.4, dtype=torch.float64)
    mu_r, var_r = torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    mean_fid = sum(fid.fid_from_features(_gaussian(N, mu_s, var_s, g), _gaussian(M, mu_r, var_r, g))
                   for _ in range(200)) / 200
    assert mean_fid > _closed_form(mu_s, var_s, mu_r, var_r)  # the bias the centring keeps
    covered = 0
    for draw in range(30):
        g = torch.Generator().manual_seed(500 + draw)
        _, (lo, hi) = fid.fid_interval(_gaussian(N, mu_s, var_s, g), _gaussian(M, mu_r, var_r, g),
                                       n_boot=200, seed=draw)
        covered += lo <= mean_fid <= hi
    assert covered >= 24, f"covered the mean FID {mean_fid:.3f} in {covered} of 30 draws"


def test_interval_width_matches_fresh_draws():
    """The spread the intervals claim against the spread over fresh draws, at D = N/2 as in the
    course (128 features, 250 samples; Gaussian, a flat spectrum): the paired difference's within
    30% (1.1x); one FID's wider (half-samples are FIDs at N/2, whose second-order noise is
    larger), 1.6x, but less than 2.2x, where the with-replacement bootstrap gives 2.8x."""
    D, N, M = 64, 128, 256
    g = torch.Generator().manual_seed(11)
    def draw():
        z = torch.randn(N, D, generator=g, dtype=torch.float64)
        return z + 0.1, z * 1.1 + 0.1, torch.randn(M, D, generator=g, dtype=torch.float64)
    fresh = []
    for _ in range(150):
        a, b, r = draw()
        fa = fid.fid_from_features(a, r)
        fresh.append((fa, fid.fid_from_features(b, r) - fa))
    sd_fid, sd_diff = torch.tensor(fresh).std(0).tolist()
    widths = []
    for draw_seed in range(4):
        a, b, r = draw()
        _, (lo, hi) = fid.fid_interval(a, r, n_boot=200, seed=draw_seed)
        _, (dlo, dhi) = fid.paired_fid_difference(a, b, r, n_boot=200, seed=draw_seed)
        widths.append(((hi - lo) / 3.92, (dhi - dlo) / 3.92))  # a 95% normal interval is 3.92 sd wide
    w_fid, w_diff = torch.tensor(widths).mean(0).tolist()
    assert 0.7 < w_diff / sd_diff < 1.4, (w_diff, sd_diff)
    assert 1.0 < w_fid / sd_fid < 2.2, (w_fid, sd_fid)


def test_batched_frechet_matches_frechet_distance():
    """The bootstrap's batched distance (Cholesky factor, or eigh where singular) agrees with
    frechet_distance, for positive definite and for singular reference covariances."""
    g = torch.Generator().manual_seed(8)
    D = 6
    mus, sigmas = [], []
    for rank in (D, D, 3):
        x = torch.randn(D, rank, generator=g, dtype=torch.float64)
        mus.append(torch.randn(D, generator=g, dtype=torch.float64))
        sigmas.append(x @ x.T)
    mu, sigma = torch.randn(3, D, generator=g, dtype=torch.float64), torch.stack(sigmas[::-1])
    mu_r, sigma_r = torch.stack(mus), torch.stack(sigmas)
    got = fid._frechet_batch(mu, sigma, mu_r, sigma_r, fid._factor_batch(sigma_r))
    for i in range(3):
        assert float(got[i]) == pytest.approx(fid.frechet_distance(mu[i], sigma[i], mu_r[i], sigma_r[i]), rel=1e-8)


def test_blocks_resample_like_rows(monkeypatch):
    """Above a memory budget rows are resampled in shuffled blocks: the interval keeps its width."""
    g = torch.Generator().manual_seed(9)
    samples, reference = torch.randn(400, 4, generator=g) + 0.3, torch.randn(400, 4, generator=g)
    _, (lo, hi) = fid.fid_interval(samples, reference, n_boot=300)
    monkeypatch.setattr(fid, "_BLOCK_BYTES", 8 * 4 * 4 * 40)  # 40 units: 10 rows per block
    monkeypatch.setattr(fid, "_MIN_UNITS", 32)
    assert len(fid._blocks(400, 4, torch.Generator())) == 40
    value, (blo, bhi) = fid.fid_interval(samples, reference, n_boot=300)
    assert blo < value < bhi
    assert (bhi - blo) == pytest.approx(hi - lo, rel=0.3)


def test_dead_features_and_float32():
    """A feature that never varies (a dead unit) leaves the covariances singular; float32 is fine."""
    g = torch.Generator().manual_seed(10)
    samples, reference = torch.randn(100, 5, generator=g) + 0.2, torch.randn(200, 5, generator=g)
    samples[:, 0] = 0.0
    reference[:, 0] = 0.0
    value, (lo, hi) = fid.fid_interval(samples.float(), reference.float(), n_boot=50)
    assert value == pytest.approx(fid.fid_from_features(samples, reference), rel=1e-5)
    assert lo < value < hi and all(map(math.isfinite, (lo, hi)))


def test_interval_seeded():
    x, y = _features(n=60, d=3, seed=0), _features(n=60, d=3, seed=1, shift=0.2)
    assert fid.fid_interval(x, y, n_boot=50, seed=3) == fid.fid_interval(x, y, n_boot=50, seed=3)
    assert fid.fid_interval(x, y, n_boot=50, seed=3) != fid.fid_interval(x, y, n_boot=50, seed=4)


def test_noise_word_is_caption_sweeps():
    from course_lib.eval import caption_sweep
    for interval in ((0.1, 0.5), (-0.5, -0.1), (-0.1, 0.1), (0.0, 0.0)):
        assert fid.noise_word(interval) == caption_sweep.noise_word(interval)


_X = _features(n=20, d=4)


@pytest.mark.parametrize("call, match", [
    (lambda: fid.fid_interval(_X, _X[:, :3]), r"different sizes D"),
    (lambda: fid.paired_fid_difference(_X, _X[:, :3], _X), r"different sizes D"),
    (lambda: fid.paired_fid_difference(_X, _X[:10], _X), r"same number of samples"),
    (lambda: fid.fid_interval(_X[:1], _X), r"samples must be features \(N, D\) with N >= 4"),
    (lambda: fid.fid_interval(_X, _X[:3]), r"reference must be features \(N, D\) with N >= 4 \(halves"),
    (lambda: fid.fid_interval(_X, _X[0]), r"reference must be features \(N, D\)"),
    (lambda: fid.fid_interval(torch.cat([_X, torch.full((1, 4), float("nan"))]), _X), r"1 of 21 rows of samples hold NaN"),
    (lambda: fid.paired_fid_difference(_X, _X.clone().fill_(float("inf")), _X), r"rows of b hold NaN or inf"),
    (lambda: fid.fid_interval(_X, _X, n_boot=0), r"n_boot must be an int >= 1"),
    (lambda: fid.fid_interval(_X, _X, n_boot=2.5), r"n_boot must be an int >= 1"),
    (lambda: fid.fid_interval(_X, _X, level=1.0), r"level must lie strictly between 0 and 1"),
    (lambda: fid.paired_fid_difference(_X, _X, _X, level=0), r"level must lie strictly between 0 and 1"),
    (lambda: fid.fid_interval(_X, _X, level=95), r"level must lie strictly between 0 and 1"),
])
def test_interval_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_interval_type_errors():
    with pytest.raises(TypeError, match="samples must be a real tensor"):
        fid.fid_interval(_X.numpy(), _X)
    with pytest.raises(TypeError, match="reference must be a real tensor"):
        fid.fid_interval(_X, _X > 0)
