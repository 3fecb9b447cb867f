"""Checkers for the exercises of lesson 01 (the forward process q(x_t | x_0), DDPM eq. 4).

Each checker runs the learner's function on fixed inputs, compares it with the library and,
when it is wrong, names the slip it reproduces: alpha_t where alpha_bar_t belongs, a forgotten
square root, a variance where a standard deviation belongs, t off by one.

    check_alpha_bar(fn)   fn(betas) -> alpha_bar                       (T,)
    check_q_sample(fn)    fn(schedule, x0, t, eps) -> x_t               (B, C, H, W)
    check_snr(fn)         fn(schedule, t) -> alpha_bar_t / (1 - alpha_bar_t)   (B,)

Index convention (as everywhere in course_lib): t = 0..T-1 in code is the paper's step t+1,
so schedule.alpha_bar[t] = alpha_1 * ... * alpha_{t+1} in the paper's numbering.
"""
from __future__ import annotations

import torch

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from course_lib.exercises import Verdict, check_function

OFF_BY_ONE_BACK = ("t is off by one: you read alpha_bar at t-1. Code index t is already the paper's "
                   "step t+1, so schedule.alpha_bar[t] is the entry you need")
OFF_BY_ONE_FORWARD = "t is off by one: you read alpha_bar at t+1; schedule.alpha_bar[t] is the entry you need"
ALPHA_NOT_ALPHA_BAR = ("you used alpha_t = 1 - beta_t, a single step of the chain, where the closed form needs "
                       "alpha_bar_t = alpha_1 * ... * alpha_t, the product over all steps up to t")


def _schedules():
    short = NoiseSchedule.from_betas(torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.7], dtype=torch.float64))
    return short, NoiseSchedule.from_betas(linear_betas(1000)), NoiseSchedule.from_betas(cosine_betas(1000))


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """values[t] clamped into range (a mistake must never raise), shaped to broadcast over `like`."""
    out = values[t.clamp(0, values.numel() - 1)]
    return out if like is None else out.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _with_hint(verdict: Verdict) -> Verdict:
    """Add advice to errors whose cause is common enough to guess."""
    msg = verdict.message
    if "must match the size of tensor" in msg or "broadcast" in msg:
        msg += (" -- schedule.alpha_bar[t] has shape (B,); reshape it to (B, 1, 1, 1), e.g. "
                "alpha_bar[t].view(-1, 1, 1, 1), so that it broadcasts over the image dimensions")
    elif "out of bounds" in msg or "IndexError" in msg:
        msg += " -- is t off by one? Valid indices are 0..T-1 (code index t is the paper's step t+1)"
    return Verdict(verdict.ok, msg)


# ---- Exercise 1: alpha_bar from the betas ------------------------------------------------

def _alpha_bar_mistakes():
    return {
        "you returned alpha_t = 1 - beta_t, not the running product alpha_bar_t = alpha_1 * ... * alpha_t":
            lambda b: 1 - b,
        "you multiplied the betas (the noise added per step) instead of the alphas = 1 - betas":
            lambda b: torch.cumprod(b, 0),
        "you used 1 - (beta_1 + ... + beta_t), the small-beta approximation of the product; it drifts "
        "(and goes negative) once the betas add up. Take the product of (1 - beta_s)":
            lambda b: 1 - torch.cumsum(b, 0),
        "the product is off by one: entry t must include alpha at step t itself (yours stops at t-1, "
        "which is schedule.alpha_bar_prev)":
            lambda b: torch.cat([torch.ones(1, dtype=b.dtype), torch.cumprod(1 - b, 0)[:-1]]),
        "you returned sqrt(alpha_bar_t), the standard deviation of the signal part, not alpha_bar_t itself":
            lambda b: torch.cumprod(1 - b, 0).sqrt(),
    }


def check_alpha_bar(fn) -> Verdict:
    """Exercise 1: fn(betas) -> alpha_bar, both float tensors of shape (T,)."""
    inputs = [(s.betas.clone(),) for s in _schedules()]
    return _with_hint(check_function(fn, lambda b: torch.cumprod(1 - b, 0), inputs, mistakes=_alpha_bar_mistakes()))


# ---- Exercise 2: q_sample by hand ----------------------------------------------------------

def _q_sample_mistakes():
    def ab(s, t, x):
        return _at(s.alpha_bar, t, x)
    return {
        ALPHA_NOT_ALPHA_BAR:
            lambda s, x0, t, e: _at(s.alphas, t, x0).sqrt() * x0 + (1 - _at(s.alphas, t, x0)).sqrt() * e,
        "both square roots are missing: the coefficients are sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t)":
            lambda s, x0, t, e: ab(s, t, x0) * x0 + (1 - ab(s, t, x0)) * e,
        "the noise is scaled by the variance 1 - alpha_bar_t; scale it by the standard deviation "
        "sqrt(1 - alpha_bar_t) (eps has std 1, so its scale is a std)":
            lambda s, x0, t, e: ab(s, t, x0).sqrt() * x0 + (1 - ab(s, t, x0)) * e,
        "x0 is scaled by alpha_bar_t; the mean of q(x_t | x_0) is sqrt(alpha_bar_t) * x0 (the square root is missing)":
            lambda s, x0, t, e: ab(s, t, x0) * x0 + (1 - ab(s, t, x0)).sqrt() * e,
        "the noise is scaled by sqrt(beta_t), the noise of one step; after t steps the accumulated "
        "variance is 1 - alpha_bar_t":
            lambda s, x0, t, e: ab(s, t, x0).sqrt() * x0 + _at(s.betas, t, x0).sqrt() * e,
        "the two coefficients are swapped: x0 gets sqrt(alpha_bar_t), eps gets sqrt(1 - alpha_bar_t)":
            lambda s, x0, t, e: (1 - ab(s, t, x0)).sqrt() * x0 + ab(s, t, x0).sqrt() * e,
        "x0 is not scaled at all: it must shrink by sqrt(alpha_bar_t) as noise grows":
            lambda s, x0, t, e: x0 + (1 - ab(s, t, x0)).sqrt() * e,
        OFF_BY_ONE_BACK:
            lambda s, x0, t, e: _at(s.alpha_bar_prev, t, x0).sqrt() * x0 + (1 - _at(s.alpha_bar_prev, t, x0)).sqrt() * e,
        OFF_BY_ONE_FORWARD:
            lambda s, x0, t, e: ab(s, t + 1, x0).sqrt() * x0 + (1 - ab(s, t + 1, x0)).sqrt() * e,
    }


def _q_sample_inputs():
    g = torch.Generator().manual_seed(1)
    _, linear, cosine = _schedules()
    x0 = torch.rand(3, 1, 6, 5, generator=g) * 2 - 1          # (B, C, H, W); B differs from H and W
    eps = torch.randn(x0.shape, generator=g)
    inside = torch.tensor([40, 300, 650])                     # away from the ends: off-by-one shows plainly
    ends = torch.tensor([0, 999, 1])
    return [(linear, x0, inside, eps), (cosine, x0, inside, eps), (linear, x0, ends, eps)]


def check_q_sample(fn) -> Verdict:
    """Exercise 2: fn(schedule, x0, t, eps) -> x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    return _with_hint(check_function(fn, formulas.q_sample, _q_sample_inputs(), mistakes=_q_sample_mistakes()))


# ---- Exercise 3: the signal-to-noise ratio -----------------------------------------------

def _snr_mistakes():
    def snr(values):
        return values / (1 - values)
    return {
        "you took the ratio of standard deviations sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t); "
        "the SNR compares variances (square it)":
            lambda s, t: snr(_at(s.alpha_bar, t)).sqrt(),
        "the ratio is upside down: (1 - alpha_bar_t) / alpha_bar_t is noise-to-signal":
            lambda s, t: 1 / snr(_at(s.alpha_bar, t)),
        "you used alpha_t (one step) in place of alpha_bar_t (all steps up to t)":
            lambda s, t: snr(_at(s.alphas, t)),
        "you returned log SNR; the exercise asks for the SNR itself":
            lambda s, t: snr(_at(s.alpha_bar, t)).log(),
        "you returned alpha_bar_t, the signal variance alone; divide by the noise variance 1 - alpha_bar_t":
            lambda s, t: _at(s.alpha_bar, t),
        OFF_BY_ONE_BACK: lambda s, t: snr(_at(s.alpha_bar_prev, t)),
        OFF_BY_ONE_FORWARD: lambda s, t: snr(_at(s.alpha_bar, t + 1)),
    }


def check_snr(fn) -> Verdict:
    """Exercise 3: fn(schedule, t) -> SNR_t = alpha_bar_t / (1 - alpha_bar_t), shape (B,)."""
    _, linear, cosine = _schedules()
    inside = torch.tensor([5, 120, 400, 800])
    inputs = [(linear, inside), (cosine, inside), (linear, torch.tensor([0, 999]))]
    reference = lambda s, t: s.snr()[t]                       # noqa: E731
    return _with_hint(check_function(fn, reference, inputs, mistakes=_snr_mistakes()))
