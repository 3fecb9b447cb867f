"""Noise schedules: the betas of DDPM and Improved DDPM and what NoiseSchedule derives from them."""
import math

import pytest
import torch

from course_lib.diffusion import schedules
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas


def test_linear_endpoints_and_spacing():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    steps = betas.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (0.02 - 1e-4) / 999))


def test_linear_custom_endpoints():
    betas = linear_betas(5, beta_start=0.1, beta_end=0.5)
    torch.testing.assert_close(betas, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("T", [10, 100, 1000])
def test_cosine_alpha_bar_is_the_closed_form(T):
    """Improved DDPM eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    wherever max_beta does not clip; the paper's step t+1 is code index t."""
    s = 0.008
    sched = NoiseSchedule.from_betas(cosine_betas(T, s=s))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    unclipped = cosine_betas(T, s=s, max_beta=1.0) < 0.999
    # the clip only touches the last steps, and everything before it is the closed form
    first_clipped = int((~unclipped).nonzero()[0]) if (~unclipped).any() else T
    assert first_clipped >= T - 2
    torch.testing.assert_close(sched.alpha_bar[:first_clipped], expected[:first_clipped], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [linear_betas, cosine_betas])
@pytest.mark.parametrize("T", [1, 2, 50, 1000])
def test_betas_in_unit_interval_and_alpha_bar_decreasing(make, T):
    betas = make(T)
    assert betas.shape == (T,) and betas.dtype == torch.float64
    assert bool(((betas > 0) & (betas <= 1)).all())
    sched = NoiseSchedule.from_betas(betas)
    assert bool((sched.alpha_bar.diff() < 0).all())
    assert 0 < sched.alpha_bar[-1] <= sched.alpha_bar[0] < 1


def test_cosine_max_beta_clips():
    betas = cosine_betas(1000, max_beta=0.5)
    assert betas.max().item() == 0.5
    assert cosine_betas(1000).max().item() <= 0.999


def test_noise_schedule_fields():
    betas = linear_betas(20)
    sched = NoiseSchedule.from_betas(betas.float())  # any dtype in, float64 out
    assert sched.T == 20
    for name in ("betas", "alphas", "alpha_bar", "alpha_bar_prev"):
        value = getattr(sched, name)
        assert value.dtype == torch.float64 and value.shape == (20,), name
    torch.testing.assert_close(sched.alphas, 1 - sched.betas)
    # alpha_bar is the running product of alphas, computed here by a plain loop
    prod, expected = 1.0, []
    for a in sched.alphas.tolist():
        prod *= a
        expected.append(prod)
    torch.testing.assert_close(sched.alpha_bar, torch.tensor(expected, dtype=torch.float64))
    assert sched.alpha_bar_prev[0].item() == 1.0
    torch.testing.assert_close(sched.alpha_bar_prev[1:], sched.alpha_bar[:-1])


def test_posterior_variance_and_snr():
    sched = schedules.schedule("linear", 50)
    bt = sched.posterior_variance()
    assert bt[0].item() == 0.0  # q(x_0 | x_1, x_0) is a point mass
    assert bool((bt[1:] > 0).all()) and bool((bt <= sched.betas).all())  # beta_tilde <= beta
    clipped = sched.posterior_log_variance_clipped()
    assert clipped[0] == clipped[1] and torch.allclose(clipped[1:], bt[1:].log())
    torch.testing.assert_close(sched.snr(), sched.alpha_bar / (1 - sched.alpha_bar))
    assert bool((sched.snr().diff() < 0).all())


def test_single_step_schedule_has_finite_clipped_log_variance():
    """T = 1 arises from respacing to one step; beta_tilde_1 does not exist there."""
    sched = NoiseSchedule.from_betas(torch.tensor([0.5]))
    clipped = sched.posterior_log_variance_clipped()
    assert clipped.shape == (1,) and torch.isfinite(clipped).all()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_from_alpha_bar_round_trips_from_betas(name):
    sched = schedules.schedule(name, 200)
    again = NoiseSchedule.from_alpha_bar(sched.alpha_bar)
    torch.testing.assert_close(again.betas, sched.betas, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(again.alpha_bar, sched.alpha_bar, rtol=1e-12, atol=0)


def test_named_schedules():
    torch.testing.assert_close(schedules.schedule("linear", 30).betas, linear_betas(30))
    torch.testing.assert_close(schedules.schedule("cosine", 30).betas, cosine_betas(30))
    assert schedules.schedule("cosine").T == 1000


@pytest.mark.parametrize("make", [linear_betas, cosine_betas])
@pytest.mark.parametrize("T", [0, -3])
def test_bad_T(make, T):
    with pytest.raises(ValueError, match="T must be"):
        make(T)


@pytest.mark.parametrize("start,end", [(0.0, 0.02), (0.03, 0.02), (1e-4, 1.0), (-0.1, 0.2)])
def test_bad_linear_endpoints(start, end):
    with pytest.raises(ValueError, match="beta_start"):
        linear_betas(10, start, end)


@pytest.mark.parametrize("betas", [[], [0.0, 0.1], [0.1, 1.5], [-0.1, 0.2], [float("nan")]])
def test_bad_betas(betas):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule.from_betas(torch.tensor(betas, dtype=torch.float64))


def test_unknown_schedule_name_lists_known():
    with pytest.raises(ValueError, match="cosine.*linear|linear.*cosine"):
        schedules.schedule("sigmoid", 10)
