"""Checkers for the exercises of lesson 02 (DDPM, Ho et al. 2020).

Each checker runs the learner's function on fixed inputs, compares it with the library and,
when it is wrong, names the slip it reproduces.

    check_posterior_mean(fn)   fn(schedule, x0, x_t, t) -> mu_tilde_t(x_t, x0)          DDPM eq. (7)
    check_ancestral_step(fn)   fn(schedule, x_t, t, eps, z) -> x_{t-1}                   Algorithm 2, sigma_t^2 = beta_t
    check_simple_loss(fn)      fn(eps_fn, schedule, x0, t, noise) -> L_simple, shape (B,)  DDPM eq. (14)

Index convention (as everywhere in course_lib): t = 0..T-1 in code is the paper's step t+1, so
the paper's "t = 1", where Algorithm 2 adds no noise, is code index t = 0, and
schedule.alpha_bar_prev[t] is the paper's alpha_bar_{t-1} (equal to 1 at t = 0).
"""
from __future__ import annotations

import torch

from course_lib.diffusion import formulas, losses
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from course_lib.exercises import Verdict, check_function


def _schedules():
    """A short schedule with large betas (every slip shows plainly), then DDPM's linear and the cosine."""
    short = NoiseSchedule.from_betas(torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.7], dtype=torch.float64))
    return short, NoiseSchedule.from_betas(linear_betas(1000)), NoiseSchedule.from_betas(cosine_betas(1000))


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] (t clamped into range: a mistake must never raise), shaped (B, 1, 1, 1) in like's dtype."""
    return values[t.clamp(0, values.numel() - 1)].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _images(seed: int, batch: int):
    """Three float64 batches (B, C, H, W), B differing from H and W. float64 so that a right answer
    computed in the images' dtype is not let down by rounding: 1 - alpha_bar_t near t = 0 loses
    most of its digits in float32."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, 1, 6, 5, generator=g, dtype=torch.float64) * 2 - 1
    return a, torch.randn(a.shape, generator=g, dtype=torch.float64), torch.randn(a.shape, generator=g, dtype=torch.float64)


def _with_hint(verdict: Verdict) -> Verdict:
    """Add advice to errors whose cause is common enough to guess."""
    msg = verdict.message
    if "must match the size of tensor" in msg or "broadcast" in msg:
        msg += (" -- values read at t have shape (B,); reshape them to (B, 1, 1, 1), e.g. "
                "schedule.betas[t].view(-1, 1, 1, 1), so that they broadcast over the image")
    elif "out of bounds" in msg or "IndexError" in msg:
        msg += " -- is t off by one? Valid indices are 0..T-1 (code index t is the paper's step t+1)"
    return Verdict(verdict.ok, msg)


# ---- Exercise 1: the posterior mean, DDPM eq. (7) -------------------------------------------

SWAPPED = ("the two coefficients are swapped (a typo some lecture notes carry): x0 is multiplied by "
           "sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) and x_t by sqrt(alpha_t) (1 - alpha_bar_{t-1}) / "
           "(1 - alpha_bar_t). Sanity check: at the paper's t = 1 the mean must be x0 exactly")


def _posterior_mistakes():
    def parts(s, x0, x_t, t):
        ab, ab_prev = _at(s.alpha_bar, t, x0), _at(s.alpha_bar_prev, t, x0)
        return ab, ab_prev, _at(s.alphas, t, x0), _at(s.betas, t, x0)

    def mean(c0, ct, x0, x_t):
        return c0 * x0 + ct * x_t

    def swapped(s, x0, x_t, t):
        ab, ab_prev, a, b = parts(s, x0, x_t, t)
        return mean(a.sqrt() * (1 - ab_prev) / (1 - ab), ab_prev.sqrt() * b / (1 - ab), x0, x_t)

    def alpha_not_alpha_bar(s, x0, x_t, t):                 # (1 - alpha_{t-1}) for (1 - alpha_bar_{t-1})
        ab, ab_prev, a, b = parts(s, x0, x_t, t)
        a_prev = _at(s.alphas, t - 1, x0)
        return mean(ab_prev.sqrt() * b / (1 - ab), a.sqrt() * (1 - a_prev) / (1 - ab), x0, x_t)

    def off_by_one(s, x0, x_t, t):                          # alpha_bar_t where alpha_bar_{t-1} belongs
        ab, _, a, b = parts(s, x0, x_t, t)
        return mean(ab.sqrt() * b / (1 - ab), a.sqrt() * (1 - ab) / (1 - ab), x0, x_t)

    def no_sqrt_x0(s, x0, x_t, t):
        ab, ab_prev, a, b = parts(s, x0, x_t, t)
        return mean(ab_prev * b / (1 - ab), a.sqrt() * (1 - ab_prev) / (1 - ab), x0, x_t)

    def no_sqrt_xt(s, x0, x_t, t):
        ab, ab_prev, a, b = parts(s, x0, x_t, t)
        return mean(ab_prev.sqrt() * b / (1 - ab), a * (1 - ab_prev) / (1 - ab), x0, x_t)

    def alpha_bar_in_xt(s, x0, x_t, t):
        ab, ab_prev, a, b = parts(s, x0, x_t, t)
        return mean(ab_prev.sqrt() * b / (1 - ab), ab.sqrt() * (1 - ab_prev) / (1 - ab), x0, x_t)

    def x0_term_only(s, x0, x_t, t):
        ab, ab_prev, a, b = parts(s, x0, x_t, t)
        return ab_prev.sqrt() * b / (1 - ab) * x0

    return {
        SWAPPED: swapped,
        "the x_t coefficient uses 1 - alpha_{t-1} (one step) where eq. (7) has 1 - alpha_bar_{t-1} "
        "(the product over all steps up to t-1, schedule.alpha_bar_prev[t])": alpha_not_alpha_bar,
        "t is off by one: you used alpha_bar_t where eq. (7) has alpha_bar_{t-1}; "
        "schedule.alpha_bar_prev[t] holds it (1 at t = 0)": off_by_one,
        "the square root on alpha_bar_{t-1} in the x0 coefficient is missing": no_sqrt_x0,
        "the square root on alpha_t in the x_t coefficient is missing": no_sqrt_xt,
        "the x_t coefficient has sqrt(alpha_bar_t); eq. (7) has sqrt(alpha_t), one step only": alpha_bar_in_xt,
        "only the x0 term is there: the mean also has a term in x_t": x0_term_only,
    }


def _posterior_inputs():
    short, linear, cosine = _schedules()
    x0, x_t, _ = _images(2, 4)
    return [(short, x0, x_t, torch.tensor([1, 3, 5, 0])),
            (linear, x0, x_t, torch.tensor([40, 300, 650, 999])),
            (cosine, x0, x_t, torch.tensor([0, 1, 500, 990]))]


def posterior_mean_reference(schedule, x0, x_t, t):
    return formulas.q_posterior(schedule, x0, x_t, t)[0]


def check_posterior_mean(fn) -> Verdict:
    """Exercise 1: fn(schedule, x0, x_t, t) -> mu_tilde = c0 * x0 + ct * x_t (DDPM eq. 7), shape of x0."""
    return _with_hint(check_function(fn, posterior_mean_reference, _posterior_inputs(),
                                     mistakes=_posterior_mistakes()))


# ---- Exercise 2: one step of Algorithm 2 --------------------------------------------------

def ancestral_step_reference(schedule, x_t, t, eps, z):
    """x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z, sigma_t^2 = beta_t,
    z = 0 at code index t = 0; computed in float64 (the library's eq. 11 and ddpm_step agree with it)."""
    x64, e64 = x_t.double(), eps.double()
    mean = formulas.p_mean_from_eps(schedule, x64, t, e64)
    sigma = _at(schedule.betas, t, x64).sqrt()
    return (mean + (t > 0).double().view(-1, 1, 1, 1) * sigma * z.double()).to(x_t.dtype)


def _step_mistakes():
    def mean(s, x_t, t, eps):
        return formulas.p_mean_from_eps(s, x_t.double(), t, eps.double())

    def nonzero(t):
        return (t > 0).double().view(-1, 1, 1, 1)

    def terms(s, x_t, t):
        x = x_t.double()
        return _at(s.alphas, t, x), _at(s.alpha_bar, t, x), _at(s.betas, t, x)

    def variance_not_std(s, x_t, t, eps, z):
        _, _, b = terms(s, x_t, t)
        return mean(s, x_t, t, eps) + nonzero(t) * b * z

    def noise_at_end(s, x_t, t, eps, z):
        _, _, b = terms(s, x_t, t)
        return mean(s, x_t, t, eps) + b.sqrt() * z

    def small_variance(s, x_t, t, eps, z):
        var = _at(s.posterior_variance(), t, x_t.double())
        return mean(s, x_t, t, eps) + nonzero(t) * var.sqrt() * z

    def eps_coef_no_sqrt(s, x_t, t, eps, z):
        a, ab, b = terms(s, x_t, t)
        return (x_t - b / (1 - ab) * eps) / a.sqrt() + nonzero(t) * b.sqrt() * z

    def no_one_over_sqrt_alpha(s, x_t, t, eps, z):
        a, ab, b = terms(s, x_t, t)
        return x_t - b / (1 - ab).sqrt() * eps + nonzero(t) * b.sqrt() * z

    def alpha_bar_for_alpha(s, x_t, t, eps, z):
        a, ab, b = terms(s, x_t, t)
        return (x_t - b / (1 - ab).sqrt() * eps) / ab.sqrt() + nonzero(t) * b.sqrt() * z

    def eps_added(s, x_t, t, eps, z):
        a, ab, b = terms(s, x_t, t)
        return (x_t + b / (1 - ab).sqrt() * eps) / a.sqrt() + nonzero(t) * b.sqrt() * z

    def sqrt_one_minus_alpha_bar(s, x_t, t, eps, z):     # eps scaled as in eq. (4), not eq. (11)
        a, ab, b = terms(s, x_t, t)
        return (x_t - (1 - ab).sqrt() * eps) / a.sqrt() + nonzero(t) * b.sqrt() * z

    return {
        "the noise is scaled by the variance beta_t; scale z by the standard deviation sigma_t = sqrt(beta_t) "
        "(z has std 1, so its scale is a std: the sqrt was forgotten)": variance_not_std,
        "noise was added at the last step too: Algorithm 2 sets z = 0 at the paper's t = 1 (code index "
        "t = 0), so the final sample is the mean, with no noise on it": noise_at_end,
        "you used the small variance sigma_t^2 = beta_tilde_t; this exercise asks for Algorithm 2 with "
        "sigma_t^2 = beta_t (the lesson compares both later)": small_variance,
        "the eps coefficient is beta_t / (1 - alpha_bar_t); eq. (11) has beta_t / sqrt(1 - alpha_bar_t) "
        "(a square root is missing)": eps_coef_no_sqrt,
        "the factor 1 / sqrt(alpha_t) in front of the bracket is missing": no_one_over_sqrt_alpha,
        "you divided by sqrt(alpha_bar_t); eq. (11) divides by sqrt(alpha_t), one step only": alpha_bar_for_alpha,
        "the predicted noise is added; it must be subtracted from x_t": eps_added,
        "the eps coefficient is sqrt(1 - alpha_bar_t), as in q_sample; one reverse step removes only "
        "beta_t / sqrt(1 - alpha_bar_t) of it (eq. 11)": sqrt_one_minus_alpha_bar,
    }


def _step_inputs():
    short, linear, cosine = _schedules()
    x_t, eps, z = _images(3, 4)
    return [(short, x_t, torch.tensor([2, 0, 5, 1]), eps, z),
            (linear, x_t, torch.tensor([0, 40, 650, 999]), eps, z),
            (cosine, x_t, torch.tensor([700, 300, 1, 0]), eps, z)]


def check_ancestral_step(fn) -> Verdict:
    """Exercise 2: fn(schedule, x_t, t, eps, z) -> x_{t-1}, one step of Algorithm 2 with sigma_t^2 = beta_t
    (z = 0 where t = 0)."""
    return _with_hint(check_function(fn, ancestral_step_reference, _step_inputs(), mistakes=_step_mistakes()))


# ---- Exercise 3: L_simple, DDPM eq. (14) --------------------------------------------------

def toy_eps_fn(x_t, t):
    """A fixed stand-in for a trained network (deterministic, nonlinear, depends on t): the checker
    calls the learner's loss with it, so feeding x0 instead of x_t changes the answer."""
    scale = 0.6 + 0.4 * torch.cos(t.to(x_t.dtype) / 170.0).view(-1, 1, 1, 1)
    return torch.tanh(scale * x_t) + 0.1 * x_t.roll(1, dims=-1)


def simple_loss_reference(eps_fn, schedule, x0, t, noise):
    return losses.simple_loss(eps_fn(formulas.q_sample(schedule, x0, t, noise), t), noise)


def _simple_loss_mistakes():
    def x_t(s, x0, t, e, a=None):
        a = _at(s.alpha_bar if a is None else a, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * e

    def mse(a, b):
        return ((a - b) ** 2).flatten(1).mean(1)

    return {
        "you fed x0 to the model; it must see the noisy image x_t = sqrt(alpha_bar_t) x0 + "
        "sqrt(1 - alpha_bar_t) eps": lambda f, s, x0, t, e: mse(f(x0, t), e),
        "you fed the noise itself to the model; it must see the noisy image x_t":
            lambda f, s, x0, t, e: mse(f(e, t), e),
        "you compared the model's output with x0; L_simple compares it with the noise eps that made x_t":
            lambda f, s, x0, t, e: mse(f(x_t(s, x0, t, e), t), x0),
        "you summed the squared error over the pixels; L_simple here averages it (mean over C, H, W), "
        "one value per sample": lambda f, s, x0, t, e: ((f(x_t(s, x0, t, e), t) - e) ** 2).flatten(1).sum(1),
        "the error is not squared (a mean absolute error); L_simple is a mean squared error":
            lambda f, s, x0, t, e: (f(x_t(s, x0, t, e), t) - e).abs().flatten(1).mean(1),
        "x_t was built with alpha_t (one step) where q(x_t | x0) needs alpha_bar_t":
            lambda f, s, x0, t, e: mse(f(x_t(s, x0, t, e, s.alphas), t), e),
        "x_t was built with the variance (1 - alpha_bar_t) on the noise; the std sqrt(1 - alpha_bar_t) "
        "belongs there": lambda f, s, x0, t, e: mse(f(_at(s.alpha_bar, t, x0).sqrt() * x0
                                                      + (1 - _at(s.alpha_bar, t, x0)) * e, t), e),
    }


def _simple_loss_inputs():
    short, linear, cosine = _schedules()
    x0, noise, _ = _images(4, 3)
    return [(toy_eps_fn, short, x0, torch.tensor([1, 4, 2]), noise),
            (toy_eps_fn, linear, x0, torch.tensor([40, 300, 650]), noise),
            (toy_eps_fn, cosine, x0, torch.tensor([0, 999, 500]), noise)]


def check_simple_loss(fn) -> Verdict:
    """Exercise 3: fn(eps_fn, schedule, x0, t, noise) -> one Monte-Carlo term of L_simple per sample, (B,)."""
    verdict = check_function(fn, simple_loss_reference, _simple_loss_inputs(), mistakes=_simple_loss_mistakes())
    if not verdict.ok and verdict.message.startswith("shape ()"):
        return Verdict(False, "you returned one number for the whole batch: return one loss per sample, "
                              "shape (B,), e.g. ((eps - eps_pred) ** 2).flatten(1).mean(1) "
                              "(the training loop takes the batch mean itself)")
    if not verdict.ok and "shape (3, 1, 6, 5)" in verdict.message:
        return Verdict(False, "you returned the squared error per pixel: average it over (C, H, W) to one "
                              "number per sample, shape (B,)")
    return _with_hint(verdict)
