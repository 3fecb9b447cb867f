"""Training objectives of diffusion models.

- L_simple (DDPM eq. 14): mean squared error between the true and predicted noise.
- The variational bound terms L_t (DDPM eq. 5): a Gaussian KL for t > 0 and a discretized
  Gaussian decoder NLL at t = 0, in bits per dimension.
- L_hybrid (Improved DDPM sec. 3.1): L_simple + lambda * L_vlb with lambda = 0.001, the
  variance trained through L_vlb only (the mean is frozen inside that term).
Used by lesson 02 and by every training recipe.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule


def simple_loss(eps_pred, noise):
    """L_simple = || eps - eps_theta(x_t, t) ||^2, averaged over pixels, one value per sample."""
    if eps_pred.shape != noise.shape:
        raise ValueError(f"eps_pred shape {tuple(eps_pred.shape)} differs from noise {tuple(noise.shape)}")
    return ((noise - eps_pred) ** 2).flatten(1).mean(1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, mean, log_scale, bins: int = 256):
    """log p(x) of data in [-1, 1] quantised to `bins` levels under N(mean, e^(2 log_scale)),
    the edge bins extended to +-infinity (DDPM sec. 3.3). Elementwise, in nats."""
    half = 1.0 / (bins - 1)
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv_std * (centered + half))
    cdf_minus = _standard_normal_cdf(inv_std * (centered - half))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def vb_term(schedule: NoiseSchedule, x0, x_t, t, eps_pred, model_log_variance):
    """One term of the variational bound, in bits per dimension, one value per sample:
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder
    NLL -log p(x_0 | x_1) at t = 0 (DDPM eq. 5, code index t is the paper's t+1)."""
    true_mean, _, true_log_var = formulas.q_posterior(schedule, x0, x_t, t)
    model_mean = formulas.p_mean_from_eps(schedule, x_t, t, eps_pred)
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_variance).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


class LossTerms(NamedTuple):
    loss: torch.Tensor   # (B,) what is minimised
    mse: torch.Tensor    # (B,) L_simple
    vb: torch.Tensor     # (B,) L_t in bits/dim (zeros for a fixed-variance model)


def diffusion_loss(schedule: NoiseSchedule, model_out, x0, x_t, t, noise, *, lambda_vlb: float = 0.001):
    """L_simple for a fixed-variance model; L_hybrid = L_simple + lambda * T * L_t for a learned
    one (Improved DDPM sec. 3.1: T * L_t estimates L_vlb when t is uniform). The mean is
    detached inside the vb term so the variance alone learns from it."""
    eps_pred, v = formulas.split_model_output(model_out, x0.shape[1])
    mse = simple_loss(eps_pred, noise)
    if v is None:
        return LossTerms(mse, mse, torch.zeros_like(mse))
    log_var = formulas.learned_log_variance(schedule, v, t)
    vb = vb_term(schedule, x0, x_t, t, eps_pred.detach(), log_var)
    return LossTerms(mse + lambda_vlb * schedule.T * vb, mse, vb)
