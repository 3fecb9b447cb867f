"""Lesson 01's checkers accept right answers (written in several styles) and name each typical
slip, written here the way a learner would write it, not copied from the checker's catalogue."""
import math

import pytest
import torch

from course_lib.exercises import Verdict
from course_lib.exercises import forward_process as fp


def _bcast(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


# ---- Exercise 1 ---------------------------------------------------------------------------

def alpha_bar_loop(betas):
    out, running = [], 1.0
    for b in betas.tolist():
        running *= 1 - b
        out.append(running)
    return torch.tensor(out)


def alpha_bar_log_space(betas):
    return torch.exp(torch.cumsum(torch.log1p(-betas), 0)).float()


@pytest.mark.parametrize("fn", [lambda b: torch.cumprod(1 - b, 0), alpha_bar_loop, alpha_bar_log_space])
def test_alpha_bar_accepts_right_answers(fn):
    verdict = fp.check_alpha_bar(fn)
    assert isinstance(verdict, Verdict) and verdict.ok, verdict.message
    assert str(verdict).startswith("Correct!")


@pytest.mark.parametrize("fn, named", [
    (lambda b: 1 - b, "not the running product"),                                  # alpha_t, not alpha_bar_t
    (lambda b: torch.cumprod(b, 0), "multiplied the betas"),
    (lambda b: 1 - torch.cumsum(b, 0), "small-beta approximation"),
    (lambda b: torch.cat([torch.ones(1, dtype=b.dtype), torch.cumprod(1 - b, 0)])[:-1], "off by one"),
    (lambda b: torch.sqrt(torch.cumprod(1 - b, 0)), "standard deviation"),      # std, not variance
    (lambda b: torch.cumprod(1 - b, 0)[1:], "shape"),
    (lambda b: None, "return"),
])
def test_alpha_bar_names_each_mistake(fn, named):
    verdict = fp.check_alpha_bar(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


# ---- Exercise 2 ---------------------------------------------------------------------------

def q_sample_right(schedule, x0, t, eps):
    ab = _bcast(schedule.alpha_bar[t], x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def q_sample_float64(schedule, x0, t, eps):
    ab = schedule.alpha_bar[t][:, None, None, None]
    return torch.sqrt(ab) * x0 + torch.sqrt(1 - ab) * eps       # float64 result: still accepted


def q_sample_alpha_t(schedule, x0, t, eps):
    a = _bcast(schedule.alphas[t], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def q_sample_no_sqrt(schedule, x0, t, eps):
    ab = _bcast(schedule.alpha_bar[t], x0)
    return ab * x0 + (1 - ab) * eps


def q_sample_variance_not_std(schedule, x0, t, eps):
    ab = _bcast(schedule.alpha_bar[t], x0)
    return ab.sqrt() * x0 + (1 - ab) * eps


def q_sample_signal_sqrt_forgotten(schedule, x0, t, eps):
    ab = _bcast(schedule.alpha_bar[t], x0)
    return ab * x0 + (1 - ab).sqrt() * eps


def q_sample_paper_index(schedule, x0, t, eps):
    ab = _bcast(schedule.alpha_bar[t - 1], x0)                 # reads the paper's t as a 1-based index
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def q_sample_one_ahead(schedule, x0, t, eps):
    ab = _bcast(schedule.alpha_bar[t + 1], x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def q_sample_beta(schedule, x0, t, eps):
    ab, b = _bcast(schedule.alpha_bar[t], x0), _bcast(schedule.betas[t], x0)
    return ab.sqrt() * x0 + b.sqrt() * eps


def q_sample_swapped(schedule, x0, t, eps):
    ab = _bcast(schedule.alpha_bar[t], x0)
    return (1 - ab).sqrt() * x0 + ab.sqrt() * eps


def q_sample_no_reshape(schedule, x0, t, eps):
    ab = schedule.alpha_bar[t].float()
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


@pytest.mark.parametrize("fn", [q_sample_right, q_sample_float64])
def test_q_sample_accepts_right_answers(fn):
    verdict = fp.check_q_sample(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (q_sample_alpha_t, "alpha_t = 1 - beta_t"),
    (q_sample_no_sqrt, "both square roots are missing"),
    (q_sample_variance_not_std, "standard deviation"),
    (q_sample_signal_sqrt_forgotten, "square root is missing"),
    (q_sample_paper_index, "off by one: you read alpha_bar at t-1"),
    (q_sample_one_ahead, "off by one: you read alpha_bar at t+1"),
    (q_sample_beta, "sqrt(beta_t)"),
    (q_sample_swapped, "swapped"),
    (q_sample_no_reshape, "(B, 1, 1, 1)"),
    (lambda s, x0, t, eps: 2 * q_sample_right(s, x0, t, eps), "constant factor of 2"),
])
def test_q_sample_names_each_mistake(fn, named):
    verdict = fp.check_q_sample(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


# ---- Exercise 3 ---------------------------------------------------------------------------

def snr_right(schedule, t):
    ab = schedule.alpha_bar[t]
    return ab / (1 - ab)


@pytest.mark.parametrize("fn", [snr_right, lambda s, t: s.snr()[t],
                                lambda s, t: torch.tensor([math.exp(math.log(a) - math.log1p(-a))
                                                           for a in s.alpha_bar[t].tolist()])])
def test_snr_accepts_right_answers(fn):
    verdict = fp.check_snr(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (lambda s, t: (s.alpha_bar[t] / (1 - s.alpha_bar[t])).sqrt(), "standard deviations"),
    (lambda s, t: s.alpha_bar[t].sqrt() / (1 - s.alpha_bar[t]).sqrt(), "standard deviations"),
    (lambda s, t: (1 - s.alpha_bar[t]) / s.alpha_bar[t], "upside down"),
    (lambda s, t: s.alphas[t] / (1 - s.alphas[t]), "alpha_t (one step)"),
    (lambda s, t: snr_right(s, t - 1), "off by one"),
    (lambda s, t: torch.log(snr_right(s, t)), "log SNR"),
    (lambda s, t: s.alpha_bar[t], "signal variance alone"),
    (lambda s, t: s.snr(), "shape"),
])
def test_snr_names_each_mistake(fn, named):
    verdict = fp.check_snr(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_an_exception_in_the_learners_code_is_reported_not_raised():
    def broken(schedule, x0, t, eps):
        raise KeyError("oops")
    verdict = fp.check_q_sample(broken)
    assert not verdict.ok and "KeyError" in verdict.message
