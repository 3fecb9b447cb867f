"""Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2), one step at a time.

x_{t-1} = mu_theta(x_t, t) + sigma_t z, with mu_theta the posterior mean at the predicted x_0
(DDPM eq. 7 with eq. 4 solved for x_0) and three choices of sigma_t^2 (DDPM sec. 3.2 and
Improved DDPM sec. 3.1):
  "small":   beta_tilde_t, the posterior variance (the lower bound of the two DDPM tried);
  "large":   beta_t (upper bound; at t=0 beta_tilde_1 is used, as ADM does);
  "learned": exp(v log beta_t + (1 - v) log beta_tilde_t), v predicted by the model.
Used by lesson 02; lesson 03 runs it on respaced schedules.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from course_lib.diffusion import formulas
from course_lib.diffusion._checks import check_like
from course_lib.diffusion.schedules import NoiseSchedule

VARIANCES = ("small", "large", "learned")


class StepOutput(NamedTuple):
    x_prev: torch.Tensor  # the sample one step earlier in the chain
    x0: torch.Tensor      # the model's prediction of the clean image at this step


def log_variance(schedule: NoiseSchedule, t, x_t, variance: str, v=None):
    """log sigma_t^2 for the chosen variance, shaped to broadcast against x_t."""
    if variance == "small":
        return formulas.extract(schedule.posterior_log_variance_clipped(), t, x_t)
    if variance == "large":
        large = torch.cat([schedule.posterior_log_variance_clipped()[:1], schedule.betas[1:].log()])
        return formulas.extract(large, t, x_t)
    if variance == "learned":
        if v is None:
            raise ValueError("variance='learned' needs the model's variance output v "
                             "(a UNet built with learn_sigma=True)")
        check_like("v", v, x_t)
        return formulas.learned_log_variance(schedule, v, t)
    raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")


def ddpm_step(schedule: NoiseSchedule, x_t, t, t_prev, eps, *, variance: str = "small", v=None,
              clip_x0: bool = True, noise=None, generator=None) -> StepOutput:
    """One step of Algorithm 2 from t to t_prev = t - 1 (t_prev = -1 returns the mean: no noise at the end)."""
    x0 = formulas.x0_from_eps(schedule, x_t, t, eps)                      # 1. predict x_0 (checks x_t, t, eps)
    formulas.check_t(schedule, t_prev, x_t.shape[0], allow_end=True)
    if not bool((t_prev == t.to(t_prev.device) - 1).all()):
        raise ValueError("ddpm_step moves one step at a time (t_prev = t - 1); "
                         "for fewer steps respace the schedule (samplers.respace) or use ddim_step")
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean, _, _ = formulas.q_posterior(schedule, x0, x_t, t)               # 2. posterior mean, eq. (7)
    log_var = log_variance(schedule, t, x_t, variance, v)                 # 3. sigma_t^2
    if noise is None:
        noise = formulas.randn(x_t.shape, generator, x_t.device, x_t.dtype)   # on the generator's device, moved
    else:
        check_like("noise", noise, x_t)
    nonzero = (t.to(x_t.device) > 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))  # no noise at the last step
    return StepOutput(mean + nonzero * torch.exp(0.5 * log_var) * noise, x0)
