"""The closed forms of Gaussian diffusion, one equation per function.

Names follow DDPM (Ho et al. 2020) and the guided-diffusion code:
q_sample is eq. (4), q_posterior eqs. (6)-(7), x0_from_eps inverts eq. (4) for x_0.
Schedule values are stored in float64 and cast to the image's dtype at the last moment.
Used by every lesson from 01 on; samplers and losses call these and never re-derive them.
"""
from __future__ import annotations

import torch

from course_lib.diffusion._checks import check_like
from course_lib.diffusion.schedules import NoiseSchedule


def check_t(schedule: NoiseSchedule, t, batch: int, *, allow_end: bool = False) -> torch.Tensor:
    """Validate integer timesteps t of shape (B,), 0 <= t < T (t = -1 allowed with allow_end)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be an integer tensor of shape ({batch},), got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor (torch.long), got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
    low = -1 if allow_end else 0
    if batch and (int(t.min()) < low or int(t.max()) >= schedule.T):
        raise ValueError(f"t must lie in [{low}, {schedule.T - 1}] for a schedule of T={schedule.T}, "
                         f"got values from {int(t.min())} to {int(t.max())}")
    return t


def extract(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to (B, 1, 1, ...) for broadcasting against x, in x's dtype and device."""
    out = values.to(x.device)[t.to(x.device)]
    return out.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _check_image(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be batched, shape (B, ...), got {tuple(x.shape)}")


check_image = _check_image   # public: samplers validate x_t with it


def _check_pair(schedule, x_t, t, other, other_name: str) -> None:
    """x_t a batched float image, t valid steps for it, `other` (eps, x0, v) a float tensor of x_t's shape."""
    _check_image("x_t", x_t)
    check_t(schedule, t, x_t.shape[0])
    check_like(other_name, other, x_t)


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) of `shape` drawn from `generator` on the generator's own device, then moved to `device`:
    a seeded CPU generator gives the same noise whatever device the samples are on (CUDA itself
    refuses a CPU generator for a draw on the GPU)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def q_sample(schedule: NoiseSchedule, x0, t, noise=None, *, generator=None):
    """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (DDPM eq. 4)."""
    _check_image("x0", x0)
    check_t(schedule, t, x0.shape[0])
    if noise is None:
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
    else:
        check_like("noise", noise, x0, "x0")
    return extract(schedule.alpha_bar.sqrt(), t, x0) * x0 + extract((1 - schedule.alpha_bar).sqrt(), t, x0) * noise


def q_mean_variance(schedule: NoiseSchedule, x0, t):
    """Mean and variance of q(x_t | x_0) (DDPM eq. 4)."""
    _check_image("x0", x0)
    check_t(schedule, t, x0.shape[0])
    return extract(schedule.alpha_bar.sqrt(), t, x0) * x0, extract(1 - schedule.alpha_bar, t, x0)


def posterior_coefficients(schedule: NoiseSchedule):
    """The two coefficients of the posterior mean, DDPM eq. (7):
    mu_tilde = c0 * x_0 + ct * x_t, c0 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t),
    ct = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)."""
    s = schedule
    c0 = s.alpha_bar_prev.sqrt() * s.betas / (1 - s.alpha_bar)
    ct = s.alphas.sqrt() * (1 - s.alpha_bar_prev) / (1 - s.alpha_bar)
    return c0, ct


def q_posterior(schedule: NoiseSchedule, x0, x_t, t):
    """q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I)  (DDPM eqs. 6-7).

    Returns (mean, variance, log_variance); log_variance is clipped at t=0 as in ADM.
    """
    _check_image("x0", x0)
    check_like("x_t", x_t, x0, "x0")
    check_t(schedule, t, x0.shape[0])
    c0, ct = posterior_coefficients(schedule)
    mean = extract(c0, t, x_t) * x0 + extract(ct, t, x_t) * x_t
    variance = extract(schedule.posterior_variance(), t, x_t)
    log_variance = extract(schedule.posterior_log_variance_clipped(), t, x_t)
    return mean, variance, log_variance


def x0_from_eps(schedule: NoiseSchedule, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  (eq. 4 solved for x_0)."""
    _check_pair(schedule, x_t, t, eps, "eps")
    return extract((1 / schedule.alpha_bar).sqrt(), t, x_t) * x_t - extract((1 / schedule.alpha_bar - 1).sqrt(), t, x_t) * eps


def eps_from_x0(schedule: NoiseSchedule, x_t, t, x0):
    """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)  (eq. 4 solved for eps)."""
    _check_pair(schedule, x_t, t, x0, "x0")
    return (extract((1 / schedule.alpha_bar).sqrt(), t, x_t) * x_t - x0) / extract((1 / schedule.alpha_bar - 1).sqrt(), t, x_t)


def learned_log_variance(schedule: NoiseSchedule, v, t):
    """ADM's learned range (Improved DDPM eq. 15): log Sigma = v log beta_t + (1 - v) log beta_tilde_t,
    with the network's raw output mapped from [-1, 1] to v in [0, 1]."""
    _check_image("v", v)
    check_t(schedule, t, v.shape[0])
    min_log = extract(schedule.posterior_log_variance_clipped(), t, v)
    max_log = extract(schedule.betas.log(), t, v)
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def p_mean_from_eps(schedule: NoiseSchedule, x_t, t, eps):
    """The reverse-process mean in eps form (DDPM eq. 11):
    mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t).
    Equal to q_posterior's mean with x_0 = x0_from_eps(x_t, eps) (tested)."""
    _check_pair(schedule, x_t, t, eps, "eps")
    coef = extract(schedule.betas / (1 - schedule.alpha_bar).sqrt(), t, x_t)
    return (x_t - coef * eps) / extract(schedule.alphas.sqrt(), t, x_t)


def split_model_output(out, channels: int):
    """Split a UNet output into (eps, v): v is None for a fixed-variance model,
    the learned-range interpolation in [-1, 1] for a learned-variance one (2 * channels)."""
    if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point or out.dim() < 2:
        raise TypeError(f"the model must return a floating-point tensor shaped (B, C, ...), got "
                        f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    if out.shape[1] == channels:
        return out, None
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    raise ValueError(f"model output has {out.shape[1]} channels; expected {channels} (eps) "
                     f"or {2 * channels} (eps and variance)")
