"""Training objectives: the Gaussian KL, the discretized decoder likelihood, the vb terms and
L_simple / L_hybrid, each against an independent computation."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from course_lib.diffusion import formulas, losses, schedules


def _sched(T=20):
    return schedules.schedule("linear", T)


def test_simple_loss_is_per_sample_mse():
    a, b = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    out = losses.simple_loss(a, b)
    assert out.shape == (3,)
    torch.testing.assert_close(out, torch.stack([torch.nn.functional.mse_loss(a[i], b[i]) for i in range(3)]))
    with pytest.raises(ValueError, match="differs"):
        losses.simple_loss(a, b[:, :1])


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(losses.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)
    assert bool((losses.normal_kl(m1, lv1, m2, lv2) >= 0).all())


def test_normal_kl_is_zero_for_equal_gaussians():
    m, lv = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(losses.normal_kl(m, lv, m, lv), torch.zeros(10, dtype=torch.float64))


def test_normal_kl_broadcasts_scalar_log_variances():
    m1, m2 = torch.zeros(2, 3), torch.ones(2, 3)
    out = losses.normal_kl(m1, torch.tensor(0.0), m2, torch.tensor(0.0))
    torch.testing.assert_close(out, torch.full((2, 3), 0.5))  # (m1 - m2)^2 / 2 for unit variances


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.3, -1.0), (-0.9, 0.5), (1.5, -5.0), (0.0, 2.0)])
def test_discretized_likelihood_sums_to_one_over_the_256_bins(mean, log_scale):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the bin centres of 8-bit data in [-1, 1]
    logp = losses.discretized_gaussian_log_likelihood(
        x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert bool((logp <= 0).all())
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_discretized_likelihood_is_the_normal_mass_of_the_bin():
    mean, std = torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    normal = Normal(mean, std)
    centres = torch.linspace(-1, 1, 256, dtype=torch.float64)
    logp = losses.discretized_gaussian_log_likelihood(centres, mean.expand(256), std.log().expand(256))
    half = 1 / 255
    inner = normal.cdf(centres[1:-1] + half) - normal.cdf(centres[1:-1] - half)
    torch.testing.assert_close(logp[1:-1].exp(), inner, rtol=1e-9, atol=1e-12)
    # the edge bins reach to -inf and +inf
    torch.testing.assert_close(logp[0].exp(), normal.cdf(centres[0] + half), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logp[-1].exp(), 1 - normal.cdf(centres[-1] - half), rtol=1e-9, atol=1e-12)


def _setup(B=6, C=2, T=20, seed=0, dtype=torch.float64):
    sched = _sched(T)
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randint(0, 256, (B, C, 4, 4), generator=g).to(dtype) / 127.5 - 1)  # 8-bit data
    noise = torch.randn(B, C, 4, 4, generator=g, dtype=dtype)
    t = torch.arange(B) * (T - 1) // max(B - 1, 1)  # includes t = 0 and t = T - 1
    x_t = formulas.q_sample(sched, x0, t, noise)
    return sched, x0, noise, t, x_t


def test_vb_term_is_kl_for_t_above_zero_and_nll_at_zero():
    sched, x0, noise, t, x_t = _setup()
    assert t[0] == 0 and bool((t[1:] > 0).all())
    g = torch.Generator().manual_seed(1)
    eps_pred = noise + 0.3 * torch.randn(noise.shape, generator=g, dtype=noise.dtype)
    log_var = torch.log(torch.rand(x0.shape, generator=g, dtype=x0.dtype) * 0.01 + 1e-4)
    vb = losses.vb_term(sched, x0, x_t, t, eps_pred, log_var)
    assert vb.shape == (6,)
    model_mean = formulas.p_mean_from_eps(sched, x_t, t, eps_pred)
    true_mean, true_var, _ = formulas.q_posterior(sched, x0, x_t, t)
    for i in range(1, 6):  # KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)), bits per dimension
        q = Normal(true_mean[i], true_var[i].sqrt().expand_as(x0[i]))
        p = Normal(model_mean[i], (0.5 * log_var[i]).exp())
        torch.testing.assert_close(vb[i], kl_divergence(q, p).mean() / math.log(2), rtol=1e-8, atol=1e-10)
    # t = 0: -log p(x_0 | x_1) of the 8-bit bins under N(model mean, exp(log_var))
    normal = Normal(model_mean[0], (0.5 * log_var[0]).exp())
    lo = torch.where(x0[0] < -0.999, torch.zeros_like(x0[0]), normal.cdf(x0[0] - 1 / 255))
    hi = torch.where(x0[0] > 0.999, torch.ones_like(x0[0]), normal.cdf(x0[0] + 1 / 255))
    nll = -(hi - lo).clamp(min=1e-12).log().mean() / math.log(2)
    torch.testing.assert_close(vb[0], nll, rtol=1e-6, atol=1e-8)


def test_vb_term_vanishes_for_the_true_posterior():
    """With the true noise and the posterior variance, p_theta(x_{t-1} | x_t) is q(x_{t-1} | x_t, x_0)."""
    sched, x0, noise, t, x_t = _setup()
    _, _, true_log_var = formulas.q_posterior(sched, x0, x_t, t)
    vb = losses.vb_term(sched, x0, x_t, t, noise, true_log_var.expand_as(x0))
    torch.testing.assert_close(vb[1:], torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-9)


def test_diffusion_loss_fixed_variance_is_mse():
    sched, x0, noise, t, x_t = _setup(dtype=torch.float32)
    out = torch.randn_like(x0)
    terms = losses.diffusion_loss(sched, out, x0, x_t, t, noise)
    torch.testing.assert_close(terms.loss, ((out - noise) ** 2).mean((1, 2, 3)))
    assert torch.equal(terms.loss, terms.mse) and torch.equal(terms.vb, torch.zeros(6))


def test_diffusion_loss_learned_is_hybrid_and_vb_does_not_reach_eps():
    sched, x0, noise, t, x_t = _setup(dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    out = torch.cat([noise + 0.1 * torch.randn(noise.shape, generator=g),
                     torch.rand(noise.shape, generator=g) * 2 - 1], dim=1).requires_grad_(True)
    terms = losses.diffusion_loss(sched, out, x0, x_t, t, noise)
    eps_pred, v = out[:, :2], out[:, 2:]
    torch.testing.assert_close(terms.mse, ((eps_pred - noise) ** 2).mean((1, 2, 3)))
    vb_ref = losses.vb_term(sched, x0, x_t, t, eps_pred, formulas.learned_log_variance(sched, v, t))
    torch.testing.assert_close(terms.vb, vb_ref)
    torch.testing.assert_close(terms.loss, terms.mse + 0.001 * sched.T * terms.vb)
    # L_vb trains the variance only: its gradient on the eps channels is exactly zero
    (grad_vb,) = torch.autograd.grad(terms.vb.sum(), out, retain_graph=True)
    assert torch.equal(grad_vb[:, :2], torch.zeros_like(grad_vb[:, :2]))
    assert grad_vb[:, 2:].abs().sum() > 0
    # so the eps channels see the gradient of L_simple alone, the v channels that of lambda T L_vb
    (grad_loss,) = torch.autograd.grad(terms.loss.sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms.mse.sum(), out, retain_graph=True)
    torch.testing.assert_close(grad_loss[:, :2], grad_mse[:, :2])
    torch.testing.assert_close(grad_loss[:, 2:], 0.001 * sched.T * grad_vb[:, 2:])


def test_diffusion_loss_lambda_and_bad_channels():
    sched, x0, noise, t, x_t = _setup(dtype=torch.float32)
    out = torch.cat([noise, torch.zeros_like(noise)], 1)
    terms = losses.diffusion_loss(sched, out, x0, x_t, t, noise, lambda_vlb=0.0)
    torch.testing.assert_close(terms.loss, terms.mse)
    with pytest.raises(ValueError, match="channels"):
        losses.diffusion_loss(sched, out[:, :3], x0, x_t, t, noise)
