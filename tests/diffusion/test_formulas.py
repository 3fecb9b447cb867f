"""The closed forms of Gaussian diffusion, checked against independent derivations:
the Markov chain itself, Bayes' rule for Gaussians, and a float64 recomputation."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from course_lib.diffusion import formulas, schedules
from course_lib.diffusion.schedules import NoiseSchedule

SETTINGS = settings(max_examples=25, deadline=None)


def _schedule(name="cosine", T=50):
    return schedules.schedule(name, T)


@st.composite
def batches(draw, T=50):
    """A random image batch (B, C, H, W) with random timesteps, from a drawn seed."""
    B, C = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x0 = torch.rand(B, C, H, W, generator=g) * 2 - 1
    noise = torch.randn(B, C, H, W, generator=g)
    t = torch.tensor(draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B)), dtype=torch.long)
    return x0, noise, t


def _per_sample(values, t, like):
    """values[t] as float64 (B, 1, 1, 1): the schedule lookup, written out again."""
    return torch.stack([values[int(i)] for i in t]).reshape(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------- q_sample vs the Markov chain

@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_moments_match_the_markov_chain(name):
    """Iterating x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z from x_0 gives the same
    distribution at every t as the closed form q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)."""
    T, n = 40, 20000
    sched = schedules.schedule(name, T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-1.0, -0.3, 0.0, 0.6, 1.0], dtype=torch.float64)
    x = x0.expand(n, -1).clone()
    for t in range(T):
        beta = sched.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if t in (0, 5, T // 2, T - 1):
            tt = torch.full((1,), t)
            mean, var = formulas.q_mean_variance(sched, x0[None], tt)
            sample = formulas.q_sample(sched, x0[None].expand(n, -1), tt.expand(n), generator=g)
            for chain in (x, sample):
                # 6 standard errors: the mean's is sqrt(var / n), the variance's about var * sqrt(2 / n)
                assert (chain.mean(0) - mean[0]).abs().max() < 6 * (var[0] / n).sqrt().max()
                assert (chain.var(0) / var[0] - 1).abs().max() < 6 * math.sqrt(2 / n)
            # the closed form's moments, written out from alpha_bar
            torch.testing.assert_close(mean[0], sched.alpha_bar[t].sqrt() * x0)
            torch.testing.assert_close(var[0].expand(5), (1 - sched.alpha_bar[t]).expand(5))


@SETTINGS
@given(batches())
def test_q_sample_float32_matches_float64_reference(batch):
    x0, noise, t = batch
    sched = _schedule()
    out = formulas.q_sample(sched, x0, t, noise)
    assert out.dtype == torch.float32 and out.shape == x0.shape
    ab = _per_sample(sched.alpha_bar, t, x0)
    ref = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # float64 inputs stay float64 and agree to float64 precision
    torch.testing.assert_close(formulas.q_sample(sched, x0.double(), t, noise.double()), ref,
                               rtol=1e-12, atol=1e-12)


def test_q_sample_draws_noise_from_the_generator():
    sched, x0, t = _schedule(), torch.zeros(3, 1, 4, 4), torch.tensor([0, 10, 49])
    a = formulas.q_sample(sched, x0, t, generator=torch.Generator().manual_seed(7))
    b = formulas.q_sample(sched, x0, t, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, formulas.q_sample(sched, x0, t, noise))


# ---------------------------------------------------------------- the posterior vs Bayes' rule

def _bayes_posterior(sched, x0, x_t, t):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), both Gaussian in x_{t-1}:
    q(x_t | x_{t-1}) = N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) has precision alpha_t / beta_t and
    pulls towards x_t / sqrt(alpha_t); q(x_{t-1} | x_0) = N(sqrt(ab_{t-1}) x_0, 1 - ab_{t-1}).
    Precisions add; the mean is the precision-weighted combination. Float64, index t >= 1."""
    alpha = _per_sample(sched.alphas, t, x0)
    beta = _per_sample(sched.betas, t, x0)
    ab_prev = _per_sample(sched.alpha_bar, t - 1, x0)
    prec_lik, mean_lik = alpha / beta, x_t.double() / alpha.sqrt()
    prec_prior, mean_prior = 1 / (1 - ab_prev), ab_prev.sqrt() * x0.double()
    prec = prec_lik + prec_prior
    return (prec_lik * mean_lik + prec_prior * mean_prior) / prec, 1 / prec


@SETTINGS
@given(batches())
def test_q_posterior_is_bayes_rule(batch):
    x0, noise, t = batch
    sched = _schedule()
    x_t = formulas.q_sample(sched, x0, t, noise)
    mean, var, log_var = formulas.q_posterior(sched, x0, x_t, t)
    assert mean.shape == x0.shape and mean.dtype == torch.float32
    late = t >= 1
    if late.any():
        ref_mean, ref_var = _bayes_posterior(sched, x0[late], x_t[late], t[late])
        torch.testing.assert_close(mean[late].double(), ref_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var[late].double().expand_as(ref_mean), ref_var.expand_as(ref_mean),
                                   rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(log_var[late].double(), ref_var.log(), rtol=1e-5, atol=1e-5)
    first = t == 0
    if first.any():  # at the first step x_{t-1} is x_0 itself: a point mass
        torch.testing.assert_close(mean[first], x0[first], rtol=1e-5, atol=1e-6)
        assert bool((var[first] == 0).all())
        assert torch.isfinite(log_var[first]).all()  # clipped to step 1's value
        torch.testing.assert_close(log_var[first].double().flatten(),
                                   sched.posterior_variance()[1].log().expand(int(first.sum())).float().double(),
                                   rtol=1e-6, atol=1e-6)


def test_q_posterior_float64_inputs_match_bayes_to_float64_precision():
    sched = schedules.schedule("linear", 100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 50, 98, 99])
    mean, var, _ = formulas.q_posterior(sched, x0, x_t, t)
    ref_mean, ref_var = _bayes_posterior(sched, x0, x_t, t)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------- eps <-> x0 and the reverse mean

@SETTINGS
@given(batches())
def test_eps_and_x0_round_trip(batch):
    x0, noise, t = batch
    sched = _schedule()
    x_t = formulas.q_sample(sched, x0.double(), t, noise.double())
    # the x_0 and eps that made x_t are recovered (in float64 to the last digits)
    torch.testing.assert_close(formulas.x0_from_eps(sched, x_t, t, noise.double()), x0.double(),
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(formulas.eps_from_x0(sched, x_t, t, x0.double()), noise.double(),
                               rtol=1e-7, atol=1e-7)
    # and any eps -> x0 -> eps round trips
    x_t32 = formulas.q_sample(sched, x0, t, noise)
    eps = torch.randn_like(x0)
    back = formulas.eps_from_x0(sched, x_t32.double(), t, formulas.x0_from_eps(sched, x_t32.double(), t, eps.double()))
    torch.testing.assert_close(back, eps.double(), rtol=1e-7, atol=1e-7)


@SETTINGS
@given(batches())
def test_x0_from_eps_float32_matches_float64(batch):
    x0, noise, t = batch
    sched = _schedule()
    x_t = torch.randn_like(x0)
    out = formulas.x0_from_eps(sched, x_t, t, noise)
    ab = _per_sample(sched.alpha_bar, t, x0)
    ref = (x_t.double() - (1 - ab).sqrt() * noise.double()) / ab.sqrt()
    # at the noisiest steps 1/sqrt(ab) is large, so the tolerance is relative to it
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ab.min().rsqrt()))


@SETTINGS
@given(batches())
def test_p_mean_from_eps_is_posterior_mean_at_predicted_x0(batch):
    """DDPM eq. 11 equals eq. 7 with x_0 replaced by its eps-prediction."""
    x0, eps, t = batch
    sched = _schedule()
    x_t = torch.randn_like(x0).double()
    eps = eps.double()
    mean = formulas.p_mean_from_eps(sched, x_t, t, eps)
    ref, _, _ = formulas.q_posterior(sched, formulas.x0_from_eps(sched, x_t, t, eps), x_t, t)
    torch.testing.assert_close(mean, ref, rtol=1e-8, atol=1e-8)


def test_learned_log_variance_endpoints_and_midpoint():
    sched = _schedule("linear", 30)
    t = torch.tensor([0, 1, 15, 29])
    shape = (4, 2, 3, 3)
    lo = formulas.learned_log_variance(sched, torch.full(shape, -1.0, dtype=torch.float64), t)
    hi = formulas.learned_log_variance(sched, torch.full(shape, 1.0, dtype=torch.float64), t)
    mid = formulas.learned_log_variance(sched, torch.zeros(shape, dtype=torch.float64), t)
    bt = sched.posterior_variance()
    log_bt_clipped = torch.stack([bt[max(int(i), 1)].log() for i in t]).reshape(-1, 1, 1, 1)
    log_beta = torch.stack([sched.betas[int(i)].log() for i in t]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(lo, log_bt_clipped.expand(shape))
    torch.testing.assert_close(hi, log_beta.expand(shape))
    torch.testing.assert_close(mid, ((log_bt_clipped + log_beta) / 2).expand(shape))
    assert bool((lo <= hi).all())  # beta_tilde <= beta


def test_split_model_output():
    out = torch.randn(2, 6, 4, 4)
    eps, v = formulas.split_model_output(out, 3)
    assert torch.equal(eps, out[:, :3]) and torch.equal(v, out[:, 3:])
    eps, v = formulas.split_model_output(out, 6)
    assert eps is out and v is None
    with pytest.raises(ValueError, match="expected 4 .* or 8"):
        formulas.split_model_output(out, 4)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("t,error,match", [
    ([0, 1], TypeError, "integer tensor of shape"),                       # a list
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer"),
    (torch.tensor([True, False, True]), TypeError, "integer"),
    (torch.tensor([0, 1]), ValueError, r"shape \(3,\)"),
    (torch.tensor([[0, 1, 2]]), ValueError, r"shape \(3,\)"),
    (torch.tensor([0, 1, 50]), ValueError, r"\[0, 49\]"),
    (torch.tensor([-1, 1, 2]), ValueError, r"\[0, 49\]"),
])
def test_bad_t(t, error, match):
    sched, x0 = _schedule(), torch.zeros(3, 1, 2, 2)
    with pytest.raises(error, match=match):
        formulas.q_sample(sched, x0, t)


def test_check_t_allows_end_only_when_asked():
    sched = _schedule()
    t = torch.tensor([-1, 3])
    assert formulas.check_t(sched, t, 2, allow_end=True) is t
    with pytest.raises(ValueError):
        formulas.check_t(sched, t, 2)


def test_bad_images():
    sched, t = _schedule(), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="floating-point"):
        formulas.q_sample(sched, torch.zeros(2, 1, 2, 2, dtype=torch.long), t)
    with pytest.raises(ValueError, match="batched"):
        formulas.x0_from_eps(sched, torch.zeros(2), t, torch.zeros(2))
    with pytest.raises(ValueError, match="noise shape"):
        formulas.q_sample(sched, torch.zeros(2, 1, 2, 2), t, torch.zeros(2, 1, 2, 3))
    with pytest.raises(ValueError, match="x_t shape"):
        formulas.q_posterior(sched, torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 3, 2), t)


def test_outputs_follow_input_device_and_dtype():
    sched = _schedule()
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.zeros(2, 1, 2, 2, dtype=dtype)
        t = torch.tensor([0, 49])
        assert formulas.q_sample(sched, x, t).dtype == dtype
        assert formulas.x0_from_eps(sched, x, t, x).dtype == dtype
        assert all(z.dtype == dtype for z in formulas.q_posterior(sched, x, x, t))
