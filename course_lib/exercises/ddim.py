"""Checkers for the exercises of lesson 03 (DDIM, Song, Meng & Ermon 2021).

Each checker runs the learner's function on fixed inputs, compares it with the library and,
when it is wrong, names the slip it reproduces.

    check_ddim_sigma(fn)   fn(alpha_bar_t, alpha_bar_prev, eta) -> sigma_t, shape (B,)        DDIM eq. (16)
    check_ddim_step(fn)    fn(schedule, x_t, t, t_prev, eps, eta, z) -> x_prev               DDIM eq. (12)
    check_slerp(fn)        fn(z0, z1, alpha) -> the spherical interpolation, per batch item    DDIM sec. 5.3

Notation: the DDIM paper's alpha_t is DDPM's (and course_lib's) alpha_bar_t. t_prev = -1 is the
end of the chain, where alpha_bar = 1 (schedule.alpha_bar[-1] is NOT that: Python reads the last
entry, alpha_bar_{T-1}, almost 0). No clipping of x0 anywhere in these exercises.
"""
from __future__ import annotations

import torch

from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from course_lib.exercises import Verdict, check_function
from course_lib.samplers import ddim


def _schedules():
    """A short schedule with large betas (every slip shows plainly), then DDPM's linear and the cosine."""
    short = NoiseSchedule.from_betas(torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.7], dtype=torch.float64))
    return short, NoiseSchedule.from_betas(linear_betas(1000)), NoiseSchedule.from_betas(cosine_betas(1000))


def _b(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor as (B, 1, 1, 1) in like's dtype."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _images(seed: int, batch: int, n: int = 3):
    """n float64 batches (B, 1, 6, 5), B differing from H and W."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 6, 5, generator=g, dtype=torch.float64) for _ in range(n)]


def _with_hint(verdict: Verdict) -> Verdict:
    msg = verdict.message
    if "must match the size of tensor" in msg or "broadcast" in msg:
        msg += (" -- values read at t have shape (B,); reshape them to (B, 1, 1, 1), e.g. "
                "alpha_bar_t.view(-1, 1, 1, 1), so that they broadcast over the image")
    elif "out of bounds" in msg or "IndexError" in msg:
        msg += " -- t_prev = -1 means the end of the chain (alpha_bar = 1), not an index to read"
    return Verdict(verdict.ok, msg)


# ---- Exercise 1: sigma_t(eta), DDIM eq. (16) ------------------------------------------------

NAN_IN_SIGMA = (" -- the ratio under the second square root is flipped? 1 - alpha_bar_t / alpha_bar_prev is "
                "positive because alpha_bar falls with t (alpha_bar_prev > alpha_bar_t); 1 - alpha_bar_prev / "
                "alpha_bar_t is negative")


def _sigma_mistakes():
    def parts(a_t, a_p):
        return (1 - a_p) / (1 - a_t), 1 - a_t / a_p

    return {
        "you returned the variance sigma_t^2; eq. (16) gives the standard deviation sigma_t "
        "(take the square root of the product)":
            lambda a_t, a_p, eta: eta ** 2 * parts(a_t, a_p)[0] * parts(a_t, a_p)[1],
        "you squared eta (eta^2 on sigma_t); eq. (16) has eta itself, so sigma_t grows linearly with eta":
            lambda a_t, a_p, eta: eta ** 2 * (parts(a_t, a_p)[0] * parts(a_t, a_p)[1]).sqrt(),
        "you put sqrt(eta) on sigma_t, as if eta scaled the variance; eq. (16) puts eta on sigma_t itself":
            lambda a_t, a_p, eta: eta ** 0.5 * (parts(a_t, a_p)[0] * parts(a_t, a_p)[1]).sqrt(),
        "you ignored eta: eta = 0 must give sigma_t = 0 (deterministic DDIM)":
            lambda a_t, a_p, eta: (parts(a_t, a_p)[0] * parts(a_t, a_p)[1]).sqrt(),
        "the first factor is missing: sqrt(1 - alpha_bar_t / alpha_bar_prev) alone is the step's beta (DDPM's "
        "'large' variance); eq. (16) shrinks it by sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) to beta_tilde":
            lambda a_t, a_p, eta: eta * parts(a_t, a_p)[1].sqrt(),
        "the first ratio is upside down: sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)), the less noisy step "
        "on top": lambda a_t, a_p, eta: eta * (parts(a_t, a_p)[1] / parts(a_t, a_p)[0]).sqrt(),
        "the second factor has a difference, 1 - (alpha_bar_prev - alpha_bar_t), where eq. (16) has the ratio "
        "1 - alpha_bar_t / alpha_bar_prev": lambda a_t, a_p, eta: eta * (parts(a_t, a_p)[0] * (1 - (a_p - a_t))).sqrt(),
    }


def _sigma_inputs():
    short, linear, cosine = _schedules()
    a_short = short.alpha_bar
    a_t = torch.cat([a_short[[1, 3, 5]], linear.alpha_bar[[10, 500, 999]], cosine.alpha_bar[[300, 999]]])
    a_p = torch.cat([a_short[[0, 1, 2]], linear.alpha_bar[[9, 100, 0]], cosine.alpha_bar[[0, 899]]])
    a_p_end = torch.cat([a_p[:-1], torch.ones(1, dtype=torch.float64)])    # the last step ends the chain
    return [(a_t, a_p, 0.5), (a_t, a_p_end, 1.0), (a_t, a_p, 0.0), (a_t.float(), a_p.float(), 0.8)]


def sigma_reference(alpha_bar_t, alpha_bar_prev, eta):
    return ddim.ddim_sigma(alpha_bar_t, alpha_bar_prev, eta).to(torch.as_tensor(alpha_bar_t).dtype)


def check_ddim_sigma(fn) -> Verdict:
    """Exercise 1: fn(alpha_bar_t, alpha_bar_prev, eta) -> sigma_t of eq. (16), (B,) tensors in, (B,) out."""
    verdict = check_function(fn, sigma_reference, _sigma_inputs(), mistakes=_sigma_mistakes())
    if not verdict.ok and "NaN" in verdict.message:
        return Verdict(False, verdict.message + NAN_IN_SIGMA)
    return _with_hint(verdict)


# ---- Exercise 2: one DDIM step, eq. (12) ------------------------------------------------------

def step_reference(schedule, x_t, t, t_prev, eps, eta, z):
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z, x0 from eps, a = alpha_bar
    (alpha_bar_{-1} = 1), sigma of eq. (16); ddim_step without clipping, float64."""
    out = ddim.ddim_step(schedule, x_t.double(), t, t_prev, eps.double(), eta=eta, noise=z.double())
    return out.x_prev.to(x_t.dtype)


def _step_mistakes():
    def parts(s, x_t, t, t_prev, eta):
        a_t, a_p = s.alpha_bar[t], ddim.alpha_bar_at(s, t_prev)
        return _b(a_t, x_t), _b(a_p, x_t), _b(ddim.ddim_sigma(a_t, a_p, eta), x_t)

    def x0_of(x_t, eps, a_t):
        return (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()

    def step(a_t, a_p, sigma, x_t, eps, z, *, noise=None, direction=None, x0=None):
        x0 = x0_of(x_t, eps, a_t) if x0 is None else x0
        direction = (1 - a_p - sigma ** 2).clamp(min=0).sqrt() if direction is None else direction
        return a_p.sqrt() * x0 + direction * eps + (sigma if noise is None else noise) * z

    def sqrt_sigma(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p, sigma = parts(s, x_t, t, t_prev, eta)
        return step(a_t, a_p, sigma, x_t, eps, z, noise=sigma.sqrt())

    def variance_noise(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p, sigma = parts(s, x_t, t, t_prev, eta)
        return step(a_t, a_p, sigma, x_t, eps, z, noise=sigma ** 2)

    def no_sigma_in_direction(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p, sigma = parts(s, x_t, t, t_prev, eta)
        return step(a_t, a_p, sigma, x_t, eps, z, direction=(1 - a_p).sqrt())

    def one_step_back(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p = s.alpha_bar[t], s.alpha_bar_prev[t]
        sigma = _b(ddim.ddim_sigma(a_t, a_p, eta), x_t)
        return step(_b(a_t, x_t), _b(a_p, x_t), sigma, x_t, eps, z)

    def x0_no_sqrt(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p, sigma = parts(s, x_t, t, t_prev, eta)
        return step(a_t, a_p, sigma, x_t, eps, z, x0=(x_t - (1 - a_t).sqrt() * eps) / a_t)

    def x0_variance_on_eps(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p, sigma = parts(s, x_t, t, t_prev, eta)
        return step(a_t, a_p, sigma, x_t, eps, z, x0=(x_t - (1 - a_t) * eps) / a_t.sqrt())

    def x0_coef_alpha_bar_t(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p, sigma = parts(s, x_t, t, t_prev, eta)
        return step(a_t, a_p, sigma, x_t, eps, z) + (a_t.sqrt() - a_p.sqrt()) * x0_of(x_t, eps, a_t)

    def x_t_for_x0(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p, sigma = parts(s, x_t, t, t_prev, eta)
        return step(a_t, a_p, sigma, x_t, eps, z, x0=x_t)

    def eps_subtracted(s, x_t, t, t_prev, eps, eta, z):
        a_t, a_p, sigma = parts(s, x_t, t, t_prev, eta)
        return step(a_t, a_p, sigma, x_t, eps, z) - 2 * (1 - a_p - sigma ** 2).clamp(min=0).sqrt() * eps

    return {
        "the noise is scaled by sqrt(sigma_t) (a typo some lecture notes carry); sigma_t is already a standard "
        "deviation, so the noise term is sigma_t * z": sqrt_sigma,
        "the noise is scaled by the variance sigma_t^2; z has std 1, so scale it by the std sigma_t": variance_noise,
        "the 'direction pointing to x_t' has weight sqrt(1 - alpha_bar_prev); eq. (12) takes the noise's "
        "share out of it: sqrt(1 - alpha_bar_prev - sigma_t^2)": no_sigma_in_direction,
        "you used schedule.alpha_bar_prev[t], the step just before t; DDIM jumps from t to any t_prev < t, so "
        "read alpha_bar at t_prev (and alpha_bar = 1 where t_prev = -1)": one_step_back,
        "the predicted x0 divides by alpha_bar_t; eq. (12)'s f_theta divides by sqrt(alpha_bar_t)": x0_no_sqrt,
        "the predicted x0 removes (1 - alpha_bar_t) eps; the noise in x_t is sqrt(1 - alpha_bar_t) eps":
            x0_variance_on_eps,
        "the predicted x0 is scaled by sqrt(alpha_bar_t); the step moves it to t_prev: sqrt(alpha_bar_prev) x0":
            x0_coef_alpha_bar_t,
        "you used x_t where the predicted x0 belongs: first compute x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / "
        "sqrt(alpha_bar_t)": x_t_for_x0,
        "the direction term subtracts eps; eq. (12) adds sqrt(1 - alpha_bar_prev - sigma_t^2) eps": eps_subtracted,
    }


def _step_inputs():
    short, linear, cosine = _schedules()
    x_t, eps, z = _images(5, 4)
    return [(cosine, x_t, torch.tensor([999, 500, 100, 30]), torch.tensor([899, 250, -1, 29]), eps, 0.5, z),
            (short, x_t, torch.tensor([5, 3, 1, 2]), torch.tensor([4, 0, -1, -1]), eps, 1.0, z),
            (linear, x_t, torch.tensor([999, 40, 650, 1]), torch.tensor([949, 0, 300, -1]), eps, 0.0, z),
            (cosine, x_t.float(), torch.tensor([700, 20, 999, 0]), torch.tensor([600, 10, 0, -1]), eps.float(), 0.3,
             z.float())]


WRAPPED_END = ("at t_prev = -1 your step breaks: reading schedule.alpha_bar[t_prev] there gives Python's LAST "
               "entry (alpha_bar_{T-1}, almost 0), so 1 - alpha_bar_t / alpha_bar_prev goes negative under the "
               "square root. t_prev = -1 is the end of the chain, where alpha_bar = 1: pad alpha_bar with a 1 "
               "in front, or use torch.where(t_prev >= 0, schedule.alpha_bar[t_prev], 1.0)")


def _diagnose_nan(fn) -> str:
    """Why a step returned NaN: the end of the chain (t_prev = -1), or something else?"""
    _, _, cosine = _schedules()
    x_t, eps, z = _images(5, 4)
    try:
        out = fn(cosine, x_t, torch.tensor([999, 500, 100, 30]), torch.tensor([899, 250, 0, 29]), eps, 0.5, z)
        fine = isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all())
    except Exception:
        fine = False
    if fine:
        return WRAPPED_END
    return ("NaN even without t_prev = -1: a negative number under a square root? sigma_t^2 needs "
            "1 - alpha_bar_t / alpha_bar_prev > 0, and the direction's weight is sqrt(1 - alpha_bar_prev - sigma_t^2), "
            "with sigma_t squared (eq. 12)")


def check_ddim_step(fn) -> Verdict:
    """Exercise 2: fn(schedule, x_t, t, t_prev, eps, eta, z) -> x_prev of eq. (12) with sigma of eq. (16),
    no clipping; t, t_prev (B,) code indices with t_prev < t, t_prev = -1 the end of the chain."""
    verdict = check_function(fn, step_reference, _step_inputs(), mistakes=_step_mistakes())
    if not verdict.ok and "NaN" in verdict.message:
        return Verdict(False, f"{verdict.message} -- {_diagnose_nan(fn)}")
    return _with_hint(verdict)


# ---- Exercise 3: slerp ------------------------------------------------------------------------

def slerp_reference(z0, z1, alpha):
    return ddim.slerp(z0, z1, alpha)


def _slerp_mistakes():
    def angle(u0, u1, dims):
        def norm(u):
            return u.pow(2).sum(dims, keepdim=True).sqrt()
        cos = (u0 * u1).sum(dims, keepdim=True) / (norm(u0) * norm(u1))
        return torch.arccos(cos.clamp(-1, 1))

    def slerp_with(z0, z1, a, theta):
        return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)

    per_item = (1, 2, 3)
    return {
        "this is linear interpolation (1 - alpha) z0 + alpha z1; slerp moves along the great circle: weights "
        "sin((1 - alpha) theta) / sin(theta) and sin(alpha theta) / sin(theta)":
            lambda z0, z1, a: (1 - a) * z0 + a * z1,
        "the two ends are swapped: alpha = 0 must give z0 and alpha = 1 must give z1":
            lambda z0, z1, a: slerp_with(z0, z1, 1 - a, angle(z0, z1, per_item)),
        "you used one angle for the whole batch (the dot product summed over every item); each item has its own "
        "theta: sum over (C, H, W) only, e.g. z0.flatten(1)":
            lambda z0, z1, a: slerp_with(z0, z1, a, angle(z0, z1, (0, 1, 2, 3))),
        "the division by sin(theta) is missing": lambda z0, z1, a: slerp_with(z0, z1, a, angle(z0, z1, per_item))
        * torch.sin(angle(z0, z1, per_item)),
        "the cosine itself was used as the angle: theta = arccos(cos), in radians":
            lambda z0, z1, a: slerp_with(z0, z1, a, torch.cos(angle(z0, z1, per_item))),
        "you interpolated linearly and rescaled to the norm of z0 (or of a lerp of the norms): close, but the "
        "points are not spread evenly along the arc": lambda z0, z1, a: _lerp_renormed(z0, z1, a),
    }


def _lerp_renormed(z0, z1, a):
    lerp = (1 - a) * z0 + a * z1
    norm = (1 - a) * z0.flatten(1).norm(dim=1) + a * z1.flatten(1).norm(dim=1)
    return lerp / lerp.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * norm.view(-1, 1, 1, 1)


def _slerp_inputs():
    z0, z1, _ = _images(6, 3)
    z1 = z1 * torch.tensor([1.0, 1.3, 0.8], dtype=torch.float64).view(-1, 1, 1, 1)   # norms differ
    return [(z0, z1, 0.3), (z0, z1, 0.75), (z0.float(), z1.float(), 0.5), (z0, z1, 0.0)]


def check_slerp(fn) -> Verdict:
    """Exercise 3: fn(z0, z1, alpha) -> slerp of each batch item, (B, C, H, W) in and out, alpha a float."""
    verdict = check_function(fn, slerp_reference, _slerp_inputs(), mistakes=_slerp_mistakes())
    if not verdict.ok and "NaN" in verdict.message:
        return Verdict(False, verdict.message + " -- is the cosine divided by both norms, and clamped to [-1, 1] "
                                                "before arccos? Rounding can push it a hair past 1")
    return _with_hint(verdict)
