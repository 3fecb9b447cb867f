"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2021, "Denoising Diffusion
Implicit Models"), a family of samplers for a model trained as DDPM.

One step from x_t to x_{t_prev}, t_prev < t any earlier step (DDIM eq. 12):

    x_prev = sqrt(alpha_bar_prev) * x0                        "predicted x_0"
           + sqrt(1 - alpha_bar_prev - sigma_t^2) * eps       "direction pointing to x_t"
           + sigma_t * z                                      "random noise"

    sigma_t(eta) = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))
                       * sqrt(1 - alpha_bar_t / alpha_bar_prev)              (DDIM eq. 16)

eta = 0 is the deterministic DDIM (an Euler step of the probability-flow ODE in
x / sqrt(alpha_bar) against sqrt(1 / alpha_bar - 1), DDIM sec. 4.3); eta = 1 with t_prev = t - 1
is DDPM's ancestral step with variance beta_tilde_t. The noise term is sigma_t z, not
sqrt(sigma_t) z: sigma_t is a standard deviation. Because eta = 0 is an invertible ODE step,
an image can be run forward to its x_T (`invert`, DDIM sec. 5.4) and two x_T's interpolated
on the sphere (`slerp`, DDIM sec. 5.3).

alpha_bar_{-1} = 1: t_prev = -1 is the end of the chain (the clean image).
All coefficients are computed in float64 and cast to the sample's dtype at the last moment.
Used by lesson 03 (and by guidance in lessons 04-08 through the shared step contract).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from course_lib.diffusion import formulas
from course_lib.diffusion._checks import check_index_tensor, check_int, check_like, check_real
from course_lib.diffusion.schedules import NoiseSchedule
from course_lib.samplers.ddpm import StepOutput

SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------- schedule lookups

def alpha_bar_at(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t for integer t of shape (B,), float64, with alpha_bar_{-1} = 1 (end of chain)."""
    padded = torch.cat([schedule.alpha_bar.new_ones(1), schedule.alpha_bar])
    return padded[t.to(padded.device) + 1]


def per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) float64 coefficient as (B, 1, 1, ...) in x's dtype and device, for broadcasting."""
    return values.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def draw_noise(x: torch.Tensor, noise=None, generator=None) -> torch.Tensor:
    """The step's z ~ N(0, I): `noise` if given (checked), else drawn from `generator`."""
    if noise is None:
        return formulas.randn(x.shape, generator, x.device, x.dtype)   # on the generator's device, moved
    return check_like("noise", noise, x)


# ---------------------------------------------------------------------------- the step

def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta: float):
    """sigma_t(eta) of DDIM eq. (16): eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev),
    a = alpha_bar. eta = 1 with a_prev = alpha_bar_{t-1} is DDPM's beta_tilde_t (its square)."""
    eta = check_eta(eta)
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    alpha_bar_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()


def check_eta(eta) -> float:
    """DDIM's eta: a finite number >= 0 (0: DDIM, 1: DDPM's variance; above 1 only where eq. 16 allows)."""
    try:
        return check_real("eta", eta, low=0.0)
    except ValueError:
        raise ValueError(f"eta must be >= 0 and finite (0: DDIM, 1: DDPM's variance), got {eta}") from None


def _check_eps(x_t, eps) -> None:
    if isinstance(eps, torch.Tensor) and eps.shape != x_t.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} differs from x_t shape {tuple(x_t.shape)}; "
                         "split a learned-variance output first (formulas.split_model_output)")
    check_like("eps", eps, x_t)


def check_step(schedule: NoiseSchedule, x_t, t, t_prev, eps) -> None:
    """Validate a step's inputs: integer t, t_prev of shape (B,), -1 <= t_prev < t, eps like x_t."""
    formulas.check_image("x_t", x_t)
    formulas.check_t(schedule, t, x_t.shape[0])
    formulas.check_t(schedule, t_prev, x_t.shape[0], allow_end=True)
    if not bool((t_prev < t.to(t_prev.device)).all()):
        raise ValueError("a sampling step goes back in time: need t_prev < t (t_prev = -1 ends the chain)")
    _check_eps(x_t, eps)


def predict_x0(schedule: NoiseSchedule, x_t, t, eps, clip_x0: bool = False):
    """x0 from eps (DDPM eq. 4 solved for x_0); with clip_x0, x0 is clamped to [-1, 1] and eps
    re-derived from the clipped x0 (as ADM's ddim_sample does). Returns (x0, eps)."""
    x0 = formulas.x0_from_eps(schedule, x_t, t, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = formulas.eps_from_x0(schedule, x_t, t, x0)
    return x0, eps


def ddim_step(schedule: NoiseSchedule, x_t, t, t_prev, eps, *, eta: float = 0.0, clip_x0: bool = False,
              noise=None, generator=None) -> StepOutput:
    """One step of DDIM from t to any t_prev < t, DDIM eq. (12) with sigma_t from eq. (16).
    Noise is drawn (or `noise` used) only when eta > 0; at t_prev = -1 sigma_t is 0."""
    eta = check_eta(eta)
    check_step(schedule, x_t, t, t_prev, eps)
    x0, eps = predict_x0(schedule, x_t, t, eps, clip_x0)                   # 1. "predicted x_0", f_theta
    a_t, a_prev = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_prev)  # alpha_t, alpha_{t-1} (paper)
    sigma = ddim_sigma(a_t, a_prev, eta)                                    # 2. sigma_t(eta), eq. (16)
    dir_var = 1 - a_prev - sigma ** 2                                       # 3. weight of "direction to x_t"
    if bool((dir_var < -1e-12).any()):
        raise ValueError(f"eta={eta} makes sigma_t^2 exceed 1 - alpha_bar_prev for this step; use eta <= 1")
    x_prev = per_sample(a_prev.sqrt(), x_t) * x0 + per_sample(dir_var.clamp(min=0).sqrt(), x_t) * eps
    if eta > 0:                                                             # 4. "random noise", sigma_t z
        x_prev = x_prev + per_sample(sigma, x_t) * draw_noise(x_t, noise, generator)
    return StepOutput(x_prev, x0)


# ---------------------------------------------------------------------------- timesteps

def timesteps(T: int, n: int, spacing: str = "leading", *, offset: int = 0) -> torch.Tensor:
    """n of the T training steps, increasing int64 indices, as diffusers' `timestep_spacing` names them
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2):

    "leading":  0, r, 2r, ..., (n-1) r with r = T // n, plus `offset` (diffusers' steps_offset;
                the DDIM repo's "uniform" skip with offset 0, Stable Diffusion uses 1);
    "trailing": round(T - k T / n) - 1 for k = 0..n-1, so the first step is always T-1;
    "linspace": round(linspace(0, T - 1, n)): both ends 0 and T-1 (for n = 1 only 0, as numpy).
    Computed with numpy exactly as diffusers does, so the indices agree to the integer.
    """
    T, n = check_int("T", T, minimum=1), check_int("n (the number of sampling steps)", n)
    offset = check_int("offset", offset, minimum=0)
    if not 1 <= n <= T:
        raise ValueError(f"need 1 <= n <= T sampling steps, got n={n} for T={T}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    if offset and spacing != "leading":
        raise ValueError(f"offset (steps_offset) applies to 'leading' spacing only, got spacing={spacing!r}")
    if spacing == "leading":
        ts = np.arange(n) * (T // n) + offset
    elif spacing == "trailing":   # np.arange with a float step may make n + 1 values: keep the first n
        ts = (np.round(np.arange(T, 0, -T / n))[:n] - 1)[::-1]
    else:
        ts = np.linspace(0, T - 1, n).round()
    ts = torch.from_numpy(ts.astype(np.int64).copy())
    if int(ts.min()) < 0 or int(ts.max()) >= T or not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError(f"spacing {spacing!r} with offset={offset} gives steps outside 0..{T - 1} "
                         f"or repeated: {ts.tolist()}")
    return ts


# ---------------------------------------------------------------------------- inversion

class InvertOutput(NamedTuple):
    x_next: torch.Tensor  # the sample one step later (noisier) in the chain
    x0: torch.Tensor      # the prediction of the clean image used for the step


def ddim_invert_step(schedule: NoiseSchedule, x_t, t, t_next, eps) -> InvertOutput:
    """The eta = 0 DDIM step run forward, from t (-1: the clean image) to t_next > t (DDIM sec. 4.3):
    x_next = sqrt(alpha_bar_next) x0 + sqrt(1 - alpha_bar_next) eps, x0 = (x_t - sqrt(1 - alpha_bar_t) eps)
    / sqrt(alpha_bar_t). It is the exact inverse of ddim_step(x_next, t_next, t, eps) for the same eps,
    so `invert` evaluates eps at (x_t, t_next), the step's target time, as the sampler will."""
    formulas.check_image("x_t", x_t)
    formulas.check_t(schedule, t, x_t.shape[0], allow_end=True)
    formulas.check_t(schedule, t_next, x_t.shape[0])
    if not bool((t < t_next.to(t.device)).all()):
        raise ValueError("an inversion step goes forward in time: need t < t_next (t = -1 is the clean image)")
    _check_eps(x_t, eps)
    a_t, a_next = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_next)
    x0 = (x_t - per_sample((1 - a_t).sqrt(), x_t) * eps) / per_sample(a_t.sqrt(), x_t)   # x0_from_eps, t = -1 too
    x_next = per_sample(a_next.sqrt(), x_t) * x0 + per_sample((1 - a_next).sqrt(), x_t) * eps
    return InvertOutput(x_next, x0)


def _sorted_steps(ts, T: int | None = None) -> torch.Tensor:
    ts = check_index_tensor("timesteps", ts, low=0, high=None if T is None else T - 1).unique()  # sorted
    if ts.numel() == 0:
        raise ValueError("timesteps is empty")
    return ts


@torch.no_grad()
def invert(eps_fn, schedule: NoiseSchedule, x0, timesteps, cond=None, progress: bool = True):
    """Deterministic DDIM inversion (DDIM sec. 5.4): encode an image x0 into the x_T that eta = 0
    sampling over the same `timesteps` maps back to x0 (exactly for an eps_fn that does not depend
    on x_t, up to O(1/steps) otherwise). eps_fn(x_t, t, cond) as everywhere; returns x_T."""
    if not isinstance(x0, torch.Tensor) or not x0.dtype.is_floating_point or x0.dim() < 2:
        raise TypeError("x0 must be a batched floating-point image tensor, shape (B, C, H, W)")
    x, B = x0, x0.shape[0]
    t = torch.full((B,), -1, dtype=torch.long, device=x0.device)
    for t_next_i in tqdm(_sorted_steps(timesteps, schedule.T).tolist(), disable=not progress, desc="inverting"):
        t_next = torch.full((B,), t_next_i, dtype=torch.long, device=x0.device)
        eps, _ = formulas.split_model_output(eps_fn(x, t_next, cond), x.shape[1])
        x, t = ddim_invert_step(schedule, x, t, t_next, eps).x_next, t_next
    return x


def reconstruct(eps_fn, schedule: NoiseSchedule, x_T, timesteps, cond=None, progress: bool = True):
    """eta = 0 DDIM sampling from a given x_T over `timesteps`: the decoder that undoes `invert`."""
    from course_lib.samplers.loop import sample   # here, so that loop.py may import this module
    formulas.check_image("x_T", x_T)
    return sample(eps_fn, schedule, x_T.shape, step=ddim_step, timesteps=_sorted_steps(timesteps, schedule.T),
                  cond=cond, x_T=x_T, progress=progress, eta=0.0)


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985), used by DDIM sec. 5.3 between two x_T's:
    sin((1 - alpha) theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1, theta the angle between
    z0 and z1, per batch item (all dims after the first flattened). alpha: a float or a (B,) tensor.
    Keeps the norm when |z0| = |z1|, unlike lerp; falls back to lerp for (nearly) parallel inputs."""
    for name, z in (("z0", z0), ("z1", z1)):
        if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    if z0.shape != z1.shape or z0.dim() < 1:
        raise ValueError(f"z0 and z1 must be batched and of one shape, got {tuple(z0.shape)}, {tuple(z1.shape)}")
    check_like("z1", z1, z0, "z0")
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    if alpha.numel() not in (1, z0.shape[0]) or not bool(torch.isfinite(alpha).all()):
        raise ValueError(f"alpha must be a finite number or a ({z0.shape[0]},) tensor of them, got {alpha.tolist()}")
    a = per_sample(alpha.flatten().expand(z0.shape[0]), z0)
    u0, u1 = z0.flatten(1), z1.flatten(1)
    if bool(((u0.norm(dim=1) == 0) | (u1.norm(dim=1) == 0)).any()):
        raise ValueError("slerp of a zero vector: the angle to it is undefined (z0 and z1 must be non-zero)")
    if not bool(torch.isfinite(u0).all() and torch.isfinite(u1).all()):
        raise ValueError("z0 and z1 must be finite (no NaN or inf)")
    cos = ((u0 * u1).sum(1) / (u0.norm(dim=1) * u1.norm(dim=1))).clamp(-1, 1)
    theta = per_sample(torch.arccos(cos), z0)
    sin = torch.sin(theta)
    if bool(((sin.flatten() < 1e-6) & (cos < 0)).any()):
        raise ValueError("z0 and z1 point in opposite directions: the great circle between them is not unique")
    safe = sin.clamp(min=1e-6)
    w0 = torch.where(sin < 1e-6, 1 - a, torch.sin((1 - a) * theta) / safe)
    w1 = torch.where(sin < 1e-6, a, torch.sin(a * theta) / safe)
    return w0 * z0 + w1 * z1
