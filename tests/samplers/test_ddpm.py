"""DDPM's ancestral step (Algorithm 2): with the true noise of a known x_0 the step is the
posterior mean plus sigma_t z, for each choice of sigma_t^2."""
import pytest
import torch

from course_lib.diffusion import formulas, schedules
from course_lib.samplers import ddpm
from course_lib.samplers.ddpm import ddpm_step


def _known(T=30, B=4, seed=0, name="linear"):
    sched = schedules.schedule(name, T)
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(B, 2, 3, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9)
    noise = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    z = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    return sched, x0, noise, z


def _bayes_mean(sched, x0, x_t, t):
    """Posterior mean by precision weighting (see tests/diffusion/test_formulas.py), t >= 1."""
    a, b = sched.alphas[t].reshape(-1, 1, 1, 1), sched.betas[t].reshape(-1, 1, 1, 1)
    ab_prev = sched.alpha_bar[t - 1].reshape(-1, 1, 1, 1)
    p_lik, p_prior = a / b, 1 / (1 - ab_prev)
    return (p_lik * x_t / a.sqrt() + p_prior * ab_prev.sqrt() * x0) / (p_lik + p_prior)


@pytest.mark.parametrize("variance", ["small", "large", "learned-", "learned+"])
def test_true_eps_gives_posterior_mean_plus_sigma_noise(variance):
    sched, x0, noise, z = _known()
    t = torch.tensor([1, 5, 17, 29])
    x_t = formulas.q_sample(sched, x0, t, noise)
    kwargs = {"variance": variance}
    if variance.startswith("learned"):
        kwargs = {"variance": "learned", "v": torch.full_like(x0, -1.0 if variance == "learned-" else 1.0)}
    out = ddpm_step(sched, x_t, t, t - 1, noise, noise=z, **kwargs)
    torch.testing.assert_close(out.x0, x0, rtol=1e-9, atol=1e-9)
    beta, beta_tilde = sched.betas[t], sched.posterior_variance()[t]
    sigma2 = {"small": beta_tilde, "learned-": beta_tilde, "large": beta, "learned+": beta}[variance]
    expected = _bayes_mean(sched, x0, x_t, t) + sigma2.sqrt().reshape(-1, 1, 1, 1) * z
    torch.testing.assert_close(out.x_prev, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variance", ["small", "large", "learned"])
def test_no_noise_at_the_last_step(variance):
    sched, x0, noise, z = _known(B=2)
    t = torch.zeros(2, dtype=torch.long)
    x_t = formulas.q_sample(sched, x0, t, noise)
    v = torch.ones_like(x0) if variance == "learned" else None
    out = ddpm_step(sched, x_t, t, t - 1, noise, variance=variance, v=v, noise=z)
    torch.testing.assert_close(out.x_prev, x0, rtol=1e-9, atol=1e-9)  # the posterior at t=0 is x_0 itself
    again = ddpm_step(sched, x_t, t, t - 1, noise, variance=variance, v=v, noise=100 * z)
    assert torch.equal(out.x_prev, again.x_prev)


def test_mixed_batch_adds_noise_only_where_t_above_zero():
    sched, x0, noise, z = _known(B=2)
    t = torch.tensor([0, 10])
    x_t = formulas.q_sample(sched, x0, t, noise)
    a = ddpm_step(sched, x_t, t, t - 1, noise, noise=z)
    b = ddpm_step(sched, x_t, t, t - 1, noise, noise=torch.zeros_like(z))
    assert torch.equal(a.x_prev[0], b.x_prev[0]) and not torch.equal(a.x_prev[1], b.x_prev[1])


def test_log_variance_choices():
    sched = schedules.schedule("cosine", 40)
    x = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([0, 1, 39])
    bt, beta = sched.posterior_variance(), sched.betas
    small = ddpm.log_variance(sched, t, x, "small").flatten()
    large = ddpm.log_variance(sched, t, x, "large").flatten()
    torch.testing.assert_close(small, torch.stack([bt[1], bt[1], bt[39]]).log())
    # "large" is beta_t, except at t = 0 where beta_tilde_1 stands in (as ADM does)
    torch.testing.assert_close(large, torch.stack([bt[1], beta[1], beta[39]]).log())
    assert bool((small <= large).all())


def test_clip_x0():
    sched, x0, noise, z = _known(B=2)
    t = torch.tensor([20, 20])
    x_t = formulas.q_sample(sched, 3 * x0 + 2, t, noise)  # far outside [-1, 1]
    clipped = ddpm_step(sched, x_t, t, t - 1, noise, noise=z)
    raw = ddpm_step(sched, x_t, t, t - 1, noise, noise=z, clip_x0=False)
    assert clipped.x0.abs().max() <= 1 and raw.x0.abs().max() > 1
    torch.testing.assert_close(raw.x0, 3 * x0 + 2)


def test_generator_makes_the_step_reproducible():
    sched, x0, noise, _ = _known(B=2)
    t = torch.tensor([5, 6])
    x_t = x0.float()
    a = ddpm_step(sched, x_t, t, t - 1, noise.float(), generator=torch.Generator().manual_seed(3))
    b = ddpm_step(sched, x_t, t, t - 1, noise.float(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.x_prev, b.x_prev) and a.x_prev.dtype == torch.float32


def test_errors():
    sched, x0, noise, _ = _known(B=2)
    t = torch.tensor([5, 6])
    with pytest.raises(ValueError, match="one step at a time"):
        ddpm_step(sched, x0, t, t - 2, noise)
    with pytest.raises(ValueError, match="one step at a time"):
        ddpm_step(sched, x0, t, torch.tensor([4, 4]), noise)
    with pytest.raises(ValueError, match="learned_sigma|learn_sigma"):
        ddpm_step(sched, x0, t, t - 1, noise, variance="learned")
    with pytest.raises(ValueError, match="unknown variance"):
        ddpm_step(sched, x0, t, t - 1, noise, variance="medium")
    with pytest.raises(ValueError, match=r"\[-1, 29\]"):
        ddpm_step(sched, x0, t, torch.tensor([-2, 5]), noise)
