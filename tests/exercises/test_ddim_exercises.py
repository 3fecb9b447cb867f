"""Lesson 03's checkers accept right answers (written in several styles) and name each typical
slip, written here the way a learner would write it, not copied from the checker's catalogue."""
import math

import pytest
import torch

from course_lib.exercises import Verdict
from course_lib.exercises import ddim as ex
from course_lib.samplers import ddim


def _b(v, x):
    return v.to(x.dtype).view(-1, 1, 1, 1)


# ---- Exercise 1: sigma_t(eta) -----------------------------------------------------------------

def sigma_right(a_t, a_prev, eta):
    return eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)


def sigma_one_sqrt(a_t, a_prev, eta):
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


def sigma_via_beta_tilde(a_t, a_prev, eta):
    beta = 1 - a_t / a_prev                           # the step's beta on a respaced chain
    return eta * (beta * (1 - a_prev) / (1 - a_t)).sqrt()


@pytest.mark.parametrize("fn", [sigma_right, sigma_one_sqrt, sigma_via_beta_tilde, ex.sigma_reference])
def test_sigma_accepts_right_answers(fn):
    verdict = ex.check_ddim_sigma(fn)
    assert isinstance(verdict, Verdict) and verdict.ok, verdict.message
    assert str(verdict).startswith("Correct!")


@pytest.mark.parametrize("fn, named", [
    (lambda a_t, a_p, eta: eta ** 2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p), "the variance sigma_t^2"),
    (lambda a_t, a_p, eta: eta ** 2 * sigma_right(a_t, a_p, 1.0), "eta^2"),
    (lambda a_t, a_p, eta: math.sqrt(eta) * sigma_right(a_t, a_p, 1.0), "sqrt(eta)"),
    (lambda a_t, a_p, eta: sigma_right(a_t, a_p, 1.0), "ignored eta"),
    (lambda a_t, a_p, eta: eta * torch.sqrt(1 - a_t / a_p), "the first factor is missing"),
    (lambda a_t, a_p, eta: eta * torch.sqrt((1 - a_t) / (1 - a_p)) * torch.sqrt(1 - a_t / a_p), "upside down"),
    (lambda a_t, a_p, eta: eta * torch.sqrt((1 - a_p) / (1 - a_t)) * torch.sqrt(1 - a_p / a_t), "flipped"),
    (lambda a_t, a_p, eta: None, "return"),
])
def test_sigma_names_each_mistake(fn, named):
    verdict = ex.check_ddim_sigma(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_sigma_at_eta_1_on_one_step_is_beta_tilde():
    """The fact the lesson builds on: eta = 1 and t_prev = t - 1 give DDPM's posterior variance."""
    s = ex._schedules()[2]
    t = torch.arange(1, 1000)
    torch.testing.assert_close(ex.sigma_reference(s.alpha_bar[t], s.alpha_bar_prev[t], 1.0) ** 2,
                               s.posterior_variance()[t])


# ---- Exercise 2: one DDIM step ----------------------------------------------------------------

def alpha_bar_or_one(s, t):
    return torch.where(t >= 0, s.alpha_bar[t.clamp(min=0)], torch.ones((), dtype=s.alpha_bar.dtype))


def step_right(s, x_t, t, t_prev, eps, eta, z):
    a_t, a_p = _b(s.alpha_bar[t], x_t), _b(alpha_bar_or_one(s, t_prev), x_t)
    sigma = eta * ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt()
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_p.sqrt() * x0 + (1 - a_p - sigma ** 2).sqrt() * eps + sigma * z


def step_padded(s, x_t, t, t_prev, eps, eta, z):
    padded = torch.cat([torch.ones(1, dtype=torch.float64), s.alpha_bar])   # index t + 1, so -1 -> 1
    a_t, a_p = padded[t + 1].view(-1, 1, 1, 1), padded[t_prev + 1].view(-1, 1, 1, 1)
    sigma = ex.sigma_reference(a_t, a_p, eta)
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return (a_p.sqrt() * x0 + (1 - a_p - sigma ** 2).sqrt() * eps + sigma * z).to(x_t.dtype)


def step_with_library(s, x_t, t, t_prev, eps, eta, z):
    return ddim.ddim_step(s, x_t, t, t_prev, eps, eta=eta, noise=z).x_prev


def step_with(noise=None, direction=None, x0=None, a_prev=None):
    """A step with one piece replaced, written as a learner would slip."""
    def fn(s, x_t, t, t_prev, eps, eta, z):
        a_t = _b(s.alpha_bar[t], x_t)
        a_p = _b(alpha_bar_or_one(s, t_prev) if a_prev is None else a_prev(s, t, t_prev), x_t)
        sigma = eta * ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt()
        pred = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt() if x0 is None else x0(x_t, eps, a_t)
        d = (1 - a_p - sigma ** 2).sqrt() if direction is None else direction(a_p, sigma)
        return a_p.sqrt() * pred + d * eps + (sigma if noise is None else noise(sigma)) * z
    return fn


@pytest.mark.parametrize("fn", [step_right, step_padded, step_with_library, ex.step_reference])
def test_step_accepts_right_answers(fn):
    verdict = ex.check_ddim_step(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (step_with(noise=lambda sigma: sigma.sqrt()), "sqrt(sigma_t)"),
    (step_with(noise=lambda sigma: sigma ** 2), "the variance sigma_t^2"),
    (step_with(direction=lambda a_p, sigma: (1 - a_p).sqrt()), "sqrt(1 - alpha_bar_prev - sigma_t^2)"),
    (step_with(direction=lambda a_p, sigma: (1 - a_p - sigma).sqrt()), "with sigma_t squared"),
    (step_with(a_prev=lambda s, t, t_prev: s.alpha_bar[t_prev]), "Python's LAST entry"),
    (step_with(a_prev=lambda s, t, t_prev: s.alpha_bar_prev[t]), "alpha_bar_prev[t]"),
    (step_with(x0=lambda x_t, eps, a_t: (x_t - (1 - a_t).sqrt() * eps) / a_t), "divides by alpha_bar_t"),
    (step_with(x0=lambda x_t, eps, a_t: (x_t - (1 - a_t) * eps) / a_t.sqrt()), "removes (1 - alpha_bar_t) eps"),
    (step_with(x0=lambda x_t, eps, a_t: x_t), "you used x_t where the predicted x0 belongs"),
    (step_with(direction=lambda a_p, sigma: -(1 - a_p - sigma ** 2).sqrt()), "subtracts eps"),
    (lambda s, x_t, t, t_prev, eps, eta, z: step_right(s, x_t, t, t_prev, eps, eta, z)[..., 0], "shape"),
])
def test_step_names_each_mistake(fn, named):
    verdict = ex.check_ddim_step(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_step_with_x0_scaled_by_alpha_bar_t_is_named():
    def fn(s, x_t, t, t_prev, eps, eta, z):
        return step_right(s, x_t, t, t_prev, eps, eta, z) + (
            _b(s.alpha_bar[t], x_t).sqrt() - _b(alpha_bar_or_one(s, t_prev), x_t).sqrt()) * (
            (x_t - (1 - _b(s.alpha_bar[t], x_t)).sqrt() * eps) / _b(s.alpha_bar[t], x_t).sqrt())
    verdict = ex.check_ddim_step(fn)
    assert not verdict.ok and "sqrt(alpha_bar_prev) x0" in verdict.message, verdict.message


def test_step_without_reshape_gets_the_broadcast_hint():
    def fn(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p = s.alpha_bar[t], alpha_bar_or_one(s, t_prev)
        return a_p.sqrt() * (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    verdict = ex.check_ddim_step(fn)
    assert not verdict.ok and "(B, 1, 1, 1)" in verdict.message, verdict.message


def test_a_nan_not_caused_by_the_end_of_the_chain_gets_the_other_hint():
    def fn(s, x_t, t, t_prev, eps, eta, z):
        return step_right(s, x_t, t, t_prev, eps, eta, z) * float("nan")
    verdict = ex.check_ddim_step(fn)
    assert not verdict.ok and "even without t_prev = -1" in verdict.message, verdict.message


# ---- Exercise 3: slerp ------------------------------------------------------------------------

def slerp_right(z0, z1, alpha):
    u0, u1 = z0.flatten(1), z1.flatten(1)
    cos = (u0 * u1).sum(1) / (u0.norm(dim=1) * u1.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).view(-1, 1, 1, 1)
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


def slerp_by_loop(z0, z1, alpha):
    out = []
    for a, b in zip(z0, z1):
        theta = math.acos(max(-1.0, min(1.0, float((a * b).sum() / (a.norm() * b.norm())))))
        out.append((math.sin((1 - alpha) * theta) * a + math.sin(alpha * theta) * b) / math.sin(theta))
    return torch.stack(out)


@pytest.mark.parametrize("fn", [slerp_right, slerp_by_loop, ex.slerp_reference])
def test_slerp_accepts_right_answers(fn):
    verdict = ex.check_slerp(fn)
    assert verdict.ok, verdict.message


def slerp_whole_batch(z0, z1, alpha):
    theta = torch.arccos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


def slerp_unnormalised(z0, z1, alpha):
    theta = torch.arccos((z0 * z1).flatten(1).sum(1)).view(-1, 1, 1, 1)
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


@pytest.mark.parametrize("fn, named", [
    (lambda z0, z1, a: (1 - a) * z0 + a * z1, "linear interpolation"),
    (lambda z0, z1, a: slerp_right(z0, z1, 1 - a), "swapped"),
    (slerp_whole_batch, "one angle for the whole batch"),
    (lambda z0, z1, a: slerp_right(z0, z1, a) * torch.sin(torch.arccos(
        ((z0 * z1).flatten(1).sum(1) / (z0.flatten(1).norm(dim=1) * z1.flatten(1).norm(dim=1)))).view(-1, 1, 1, 1)),
     "division by sin(theta) is missing"),
    (slerp_unnormalised, "divided by both norms"),
    (lambda z0, z1, a: slerp_right(z0, z1, a)[:, 0], "shape"),
])
def test_slerp_names_each_mistake(fn, named):
    verdict = ex.check_slerp(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


# ---- all checkers -----------------------------------------------------------------------------

def test_an_exception_in_the_learners_code_is_reported_not_raised():
    def broken(*args):
        raise KeyError("oops")
    for check in (ex.check_ddim_sigma, ex.check_ddim_step, ex.check_slerp):
        verdict = check(broken)
        assert not verdict.ok and "KeyError" in verdict.message


@pytest.mark.parametrize("check, catalogue", [
    (ex.check_ddim_sigma, ex._sigma_mistakes),
    (ex.check_ddim_step, ex._step_mistakes),
    (ex.check_slerp, ex._slerp_mistakes),
])
def test_every_catalogued_slip_is_told_apart_from_the_others(check, catalogue):
    """No slip in a checker's catalogue is shadowed by an earlier one: each is named as itself."""
    for description, slip in catalogue().items():
        verdict = check(slip)
        assert not verdict.ok and description in verdict.message, (description, verdict.message)
