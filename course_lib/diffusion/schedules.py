"""Noise schedules: the betas of the forward process and the quantities derived from them.

DDPM (Ho et al. 2020, sec. 4) uses a linear schedule beta_1..beta_T from 1e-4 to 0.02;
Improved DDPM (Nichol & Dhariwal 2021, eq. 17) a cosine schedule on alpha_bar.
Everything is computed once, in float64. Index t = 0..T-1 in code is the paper's step t+1.
Used from lesson 01 on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from course_lib.diffusion._checks import check_int, check_real


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4), float64, length T."""
    T = _check_T(T)
    beta_start, beta_end = check_real("beta_start", beta_start), check_real("beta_end", beta_end)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule (eq. 17): alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped."""
    T = _check_T(T)
    s = check_real("s (the cosine schedule's offset)", s, low=0.0, high=1.0)
    max_beta = check_real("max_beta", max_beta, low=0.0, high=1.0, low_open=True)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def _check_T(T) -> int:
    try:
        return check_int("T (the number of diffusion steps)", T, minimum=1)
    except ValueError:
        raise ValueError(f"T must be a positive number of steps, got {T}") from None


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

    betas, alphas = 1 - betas, alpha_bar = cumprod(alphas): float64 tensors of length T.
    alpha_bar_prev[t] is alpha_bar at t-1, with alpha_bar_prev[0] = 1 (the clean image).
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor

    @classmethod
    def from_betas(cls, betas) -> "NoiseSchedule":
        try:
            betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"betas must be a sequence of numbers, got {type(betas).__name__}") from e
        if betas.numel() == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty sequence of values in (0, 1): beta = 1 would make "
                             "alpha_bar 0 and x_0 unrecoverable from x_t")
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return cls(betas, alphas, alpha_bar, alpha_bar_prev)

    @classmethod
    def from_alpha_bar(cls, alpha_bar) -> "NoiseSchedule":
        """The schedule whose cumulative products are `alpha_bar` (used by respacing)."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).flatten()
        if alpha_bar.numel() == 0 or not bool(((alpha_bar > 0) & (alpha_bar < 1)).all()) \
                or not bool((alpha_bar[1:] < alpha_bar[:-1]).all()):
            raise ValueError("alpha_bar must be a non-empty, strictly decreasing sequence of values in (0, 1)")
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return cls.from_betas(1 - alpha_bar / prev)

    @property
    def T(self) -> int:
        return self.betas.numel()

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at every step (Kingma et al. 2021)."""
        return self.alpha_bar / (1 - self.alpha_bar)

    def posterior_variance(self) -> torch.Tensor:
        """beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (DDPM eq. 7)."""
        return (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * self.betas

    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta_tilde_t with step 0 (where beta_tilde = 0) replaced by step 1's value, as ADM does
        (a one-step schedule, e.g. respaced to K=1, has no step 1: beta_0 stands in)."""
        var = self.posterior_variance()
        first = var[1:2] if self.T > 1 else self.betas[:1]
        return torch.log(torch.cat([first, var[1:]]))


def schedule(name: str, T: int = 1000) -> NoiseSchedule:
    """A named schedule: "linear" or "cosine"."""
    makers = {"linear": linear_betas, "cosine": cosine_betas}
    if not isinstance(name, str) or name not in makers:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(makers)}")
    return NoiseSchedule.from_betas(makers[name](T))
