"""DDIM (Song et al. 2021): the step's limits and invariants, spacings, inversion, slerp."""
import math

import pytest
import torch

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from course_lib.samplers import ddim
from course_lib.samplers.ddim import ddim_invert_step, ddim_sigma, ddim_step
from course_lib.samplers.ddpm import ddpm_step
from course_lib.samplers.loop import sample

T = 1000
SCHEDULES = {"linear": NoiseSchedule.from_betas(linear_betas(T)),
             "cosine": NoiseSchedule.from_betas(cosine_betas(T))}


def full(t, B=4):
    return torch.full((B,), t, dtype=torch.long)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- timesteps

def test_timesteps_of_each_spacing_for_1000_steps_and_10_samples():
    assert ddim.timesteps(1000, 10, "leading").tolist() == list(range(0, 1000, 100))
    assert ddim.timesteps(1000, 10, "leading", offset=1).tolist() == list(range(1, 1000, 100))
    assert ddim.timesteps(1000, 10, "trailing").tolist() == list(range(99, 1000, 100))
    assert ddim.timesteps(1000, 10, "linspace").tolist() == [round(i * 999 / 9) for i in range(10)]


@pytest.mark.parametrize("spacing", ddim.SPACINGS)
@pytest.mark.parametrize("T_, n", [(1000, 1), (1000, 3), (1000, 7), (1000, 61), (1000, 999), (50, 29), (10, 10)])
def test_timesteps_are_n_increasing_indices_in_range(spacing, T_, n):
    ts = ddim.timesteps(T_, n, spacing)
    assert ts.dtype == torch.int64 and ts.shape == (n,)
    assert int(ts.min()) >= 0 and int(ts.max()) <= T_ - 1 and bool((ts[1:] > ts[:-1]).all())
    if spacing == "trailing":
        assert int(ts[-1]) == T_ - 1             # trailing always starts from the last step
    if spacing == "linspace":
        assert int(ts[0]) == 0 and int(ts[-1]) == (T_ - 1 if n > 1 else 0)   # numpy's linspace(0, T-1, 1) = [0]


@pytest.mark.parametrize("spacing", ddim.SPACINGS)
def test_all_steps_is_every_index_whatever_the_spacing(spacing):
    assert torch.equal(ddim.timesteps(100, 100, spacing), torch.arange(100))


@pytest.mark.parametrize("kwargs, match", [
    (dict(T=10, n=11), "n <= T"), (dict(T=10, n=0), "n <= T"),
    (dict(T=10, n=5, spacing="uniform"), "unknown spacing"),
    (dict(T=10, n=5, spacing="trailing", offset=1), "leading"),
    (dict(T=10, n=5, spacing="leading", offset=3), "outside"),
])
def test_timesteps_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddim.timesteps(**kwargs)


# ---------------------------------------------------------------------------- sigma and the step

@pytest.mark.parametrize("name", SCHEDULES)
def test_sigma_at_eta_1_over_one_step_is_ddpm_posterior_variance(name):
    s = SCHEDULES[name]
    sigma = ddim_sigma(s.alpha_bar, s.alpha_bar_prev, 1.0)
    torch.testing.assert_close(sigma ** 2, s.posterior_variance(), rtol=1e-12, atol=1e-15)
    assert torch.equal(ddim_sigma(s.alpha_bar, s.alpha_bar_prev, 0.0), torch.zeros(T, dtype=torch.float64))


def test_negative_eta_is_an_error():
    s = SCHEDULES["linear"]
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_sigma(0.5, 0.6, -0.1)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_step(s, rand(4, 3), full(10), full(5), rand(4, 3, seed=1), eta=-1.0)


def test_eta_that_makes_the_noise_exceed_the_step_is_an_error():
    s = SCHEDULES["linear"]
    with pytest.raises(ValueError, match="eta"):
        ddim_step(s, rand(4, 3), full(999), full(0), rand(4, 3, seed=1), eta=3.0)


@pytest.mark.parametrize("t, t_prev", [(10, 10), (10, 20)])
def test_step_must_go_back_in_time(t, t_prev):
    with pytest.raises(ValueError, match="t_prev < t"):
        ddim_step(SCHEDULES["linear"], rand(4, 3), full(t), full(t_prev), rand(4, 3, seed=1))


def test_step_rejects_eps_of_another_shape_and_float_t():
    s, x = SCHEDULES["linear"], rand(4, 3)
    with pytest.raises(ValueError, match="eps shape"):
        ddim_step(s, x, full(10), full(5), rand(4, 6))
    with pytest.raises(TypeError, match="integer"):
        ddim_step(s, x, full(10).double(), full(5), rand(4, 3))


def test_eta_0_is_deterministic_and_draws_no_noise():
    s, x, eps = SCHEDULES["cosine"], rand(4, 3, 5, 5), rand(4, 3, 5, 5, seed=1)
    g = torch.Generator().manual_seed(7)
    before = g.get_state()
    a = ddim_step(s, x, full(500), full(300), eps, generator=g)
    b = ddim_step(s, x, full(500), full(300), eps, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a.x_prev, b.x_prev) and torch.equal(g.get_state(), before)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("t", [0, 1, 37, 500, T - 1])
def test_eta_1_over_one_step_is_the_ddpm_step(name, t):
    """DDIM sec. 4.1: eta = 1 with t_prev = t - 1 is DDPM's ancestral step, sigma^2 = beta_tilde."""
    s, x, eps, z = SCHEDULES[name], rand(4, 3, 6, 6), rand(4, 3, 6, 6, seed=1), rand(4, 3, 6, 6, seed=2)
    ours = ddim_step(s, x, full(t), full(t - 1), eps, eta=1.0, noise=z)
    ref = ddpm_step(s, x, full(t), full(t - 1), eps, variance="small", clip_x0=False, noise=z)
    torch.testing.assert_close(ours.x_prev, ref.x_prev, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.x0, ref.x0)


@pytest.mark.parametrize("t, t_prev", [(999, 899), (500, 499), (300, 17), (40, -1)])
def test_true_eps_of_a_point_mass_lands_on_the_forward_marginal(t, t_prev):
    """With eps the true noise of x_t ~ q(x_t | x0*), eta = 0 moves x_t to q(x_prev | x0*) with the
    same noise (DDIM eq. 7 is built so), and the eta = 1 one-step mean is q(x_{t-1} | x_t, x0*)'s."""
    s, x0, noise = SCHEDULES["linear"], rand(4, 2, 3, 3).clamp(-1, 1), rand(4, 2, 3, 3, seed=1)
    x_t = formulas.q_sample(s, x0, full(t), noise)
    eps = formulas.eps_from_x0(s, x_t, full(t), x0)
    out = ddim_step(s, x_t, full(t), full(t_prev), eps)
    torch.testing.assert_close(out.x0, x0)
    expected = x0 if t_prev < 0 else formulas.q_sample(s, x0, full(t_prev), noise)
    torch.testing.assert_close(out.x_prev, expected)
    mean = ddim_step(s, x_t, full(t), full(t - 1), eps, eta=1.0, noise=torch.zeros_like(x_t)).x_prev
    torch.testing.assert_close(mean, formulas.q_posterior(s, x0, x_t, full(t))[0])


def test_any_eta_keeps_the_marginal_q_x_prev_given_x0():
    """DDIM Lemma 1: for every sigma, x_t ~ q(x_t | x0) gives x_prev ~ q(x_prev | x0) (Monte Carlo)."""
    s, N, t, t_prev = SCHEDULES["cosine"], 200_000, 700, 400
    x0 = torch.full((N, 1), 0.3, dtype=torch.float64)
    x_t = formulas.q_sample(s, x0, full(t, N), rand(N, 1, seed=3))
    eps = formulas.eps_from_x0(s, x_t, full(t, N), x0)
    x_prev = ddim_step(s, x_t, full(t, N), full(t_prev, N), eps, eta=0.5, noise=rand(N, 1, seed=4)).x_prev
    a = float(s.alpha_bar[t_prev])
    assert abs(float(x_prev.mean()) - math.sqrt(a) * 0.3) < 5e-3
    assert abs(float(x_prev.var()) - (1 - a)) < 1e-2


def test_clipping_x0_equals_the_step_with_the_eps_of_the_clipped_x0():
    s, x, eps = SCHEDULES["linear"], rand(4, 3, 4, 4), 3 * rand(4, 3, 4, 4, seed=1)
    out = ddim_step(s, x, full(50), full(10), eps, clip_x0=True)
    assert float(out.x0.abs().max()) <= 1.0
    eps_clipped = formulas.eps_from_x0(s, x, full(50), out.x0)
    torch.testing.assert_close(out.x_prev, ddim_step(s, x, full(50), full(10), eps_clipped).x_prev)


def test_eta_0_through_the_loop_on_respaced_steps_is_deterministic():
    s = SCHEDULES["cosine"]
    eps_fn = lambda x, t, cond=None: 0.1 * x + torch.sin(t.double()).view(-1, 1, 1, 1)  # noqa: E731
    kw = dict(step=ddim_step, timesteps=ddim.timesteps(T, 10, "trailing"), progress=False)
    a = sample(eps_fn, s, (2, 1, 4, 4), x_T=rand(2, 1, 4, 4), **kw)
    b = sample(eps_fn, s, (2, 1, 4, 4), x_T=rand(2, 1, 4, 4), generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())


# ---------------------------------------------------------------------------- inversion

@pytest.mark.parametrize("t, t_next", [(-1, 0), (-1, 400), (120, 121), (300, 999)])
def test_invert_step_is_the_inverse_of_the_eta_0_step_for_the_same_eps(t, t_next):
    s, x, eps = SCHEDULES["cosine"], rand(4, 3, 4, 4), rand(4, 3, 4, 4, seed=1)
    up = ddim_invert_step(s, x, full(t), full(t_next), eps)
    down = ddim_step(s, up.x_next, full(t_next), full(t), eps)
    torch.testing.assert_close(down.x_prev, x, rtol=1e-9, atol=1e-9)


def test_invert_step_rejects_going_back():
    with pytest.raises(ValueError, match="t < t_next"):
        ddim_invert_step(SCHEDULES["linear"], rand(4, 3), full(10), full(5), rand(4, 3))


@pytest.mark.parametrize("spacing", ddim.SPACINGS)
def test_invert_then_sample_reconstructs_x0_for_an_eps_fn_independent_of_x(spacing):
    """If eps does not depend on x_t, inversion and sampling see the same eps at every t: exact."""
    s, x0, e = SCHEDULES["linear"], rand(2, 3, 4, 4).clamp(-1, 1), rand(1, 3, 4, 4, seed=1)
    eps_fn = lambda x, t, cond=None: e * torch.cos(t.double() / 300).view(-1, 1, 1, 1)  # noqa: E731
    ts = ddim.timesteps(T, 20, spacing)
    x_T = ddim.invert(eps_fn, s, x0, ts, progress=False)
    assert float((x_T - x0).abs().max()) > 0.5                   # it did move
    torch.testing.assert_close(ddim.reconstruct(eps_fn, s, x_T, ts, progress=False), x0, rtol=0, atol=1e-9)


def gaussian_oracle(s: NoiseSchedule, m: float, v: float):
    """The exact eps of data x0 ~ N(m, v) per pixel: E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) m) / (a v + 1 - a)."""
    def eps_fn(x, t, cond=None):
        a = ddim.per_sample(s.alpha_bar[t], x)
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * v + 1 - a)
    return eps_fn


def test_inversion_error_shrinks_as_steps_increase_for_a_smooth_eps_fn():
    s, x0 = SCHEDULES["cosine"], rand(2, 1, 8, 8).clamp(-1, 1)
    eps_fn = gaussian_oracle(s, m=0.2, v=0.25)
    errors = []
    for n in (10, 20, 40, 80):
        ts = ddim.timesteps(T, n, "trailing")
        x_T = ddim.invert(eps_fn, s, x0, ts, progress=False)
        errors.append(float((ddim.reconstruct(eps_fn, s, x_T, ts, progress=False) - x0).abs().max()))
    assert all(b < 0.75 * a for a, b in zip(errors, errors[1:])), errors   # about first order
    assert errors[-1] < 0.05, errors


def test_invert_takes_a_learned_variance_output_and_returns_x0_shape():
    s, x0 = SCHEDULES["linear"], rand(2, 3, 4, 4)
    eps_fn = lambda x, t, cond=None: torch.cat([0.1 * x, torch.zeros_like(x)], 1)  # noqa: E731
    assert ddim.invert(eps_fn, s, x0, [0, 500, 999], progress=False).shape == x0.shape


# ---------------------------------------------------------------------------- slerp

def test_slerp_endpoints_and_norm_preservation():
    z0 = rand(3, 4, 8, 8)
    z1 = rand(3, 4, 8, 8, seed=1)
    z1 = z1 * (z0.flatten(1).norm(dim=1) / z1.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)   # equal norms
    torch.testing.assert_close(ddim.slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(ddim.slerp(z0, z1, 1.0), z1)
    for alpha in (0.1, 0.25, 0.5, 0.9):
        z = ddim.slerp(z0, z1, alpha)
        torch.testing.assert_close(z.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1))
    lerp_norm = (0.5 * (z0 + z1)).flatten(1).norm(dim=1)
    assert bool((lerp_norm < 0.9 * z0.flatten(1).norm(dim=1)).all())      # what slerp avoids


def test_slerp_moves_at_constant_angular_speed_with_a_tensor_of_alphas():
    unit = lambda z: z / z.norm()  # noqa: E731
    z0, z1 = unit(rand(1, 16)).expand(5, 16), unit(rand(1, 16, seed=1)).expand(5, 16)
    alphas = torch.linspace(0, 1, 5, dtype=torch.float64)
    z = ddim.slerp(z0, z1, alphas)
    angle = lambda a, b: torch.arccos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))  # noqa: E731
    torch.testing.assert_close(angle(z0[:1], z[1:]), alphas[1:] * angle(z0[:1], z1[:1]))


def test_slerp_of_parallel_vectors_is_lerp_and_of_opposite_ones_an_error():
    z = rand(2, 6)
    torch.testing.assert_close(ddim.slerp(z, 2 * z, 0.5), 1.5 * z)
    with pytest.raises(ValueError, match="opposite"):
        ddim.slerp(z, -z, 0.5)
    with pytest.raises(ValueError, match="one shape"):
        ddim.slerp(z, rand(3, 6), 0.5)
