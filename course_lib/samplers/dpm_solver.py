"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2) and Karras et al.'s noise levels (2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", eq. 5).

DPM-Solver++ integrates the probability-flow ODE written for the data prediction x0 in the
half log-SNR time lambda_t = log(alpha_t / sigma_t), with alpha_t = sqrt(alpha_bar_t) and
sigma_t = sqrt(1 - alpha_bar_t) (variance preserving). The linear part is solved exactly; x0 is
extrapolated from the last two model calls (multistep, second order, "midpoint" form):

    h = lambda_prev - lambda_t,   r = h_last / h,   h_last = lambda_t - lambda_last
    D = (1 + 1 / (2 r)) x0_t - 1 / (2 r) x0_last
    x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D              (Algorithm 2)

The first step (no x0_last yet) and the last step (t_prev = -1: sigma_prev = 0, h = infinity) are
first order, D = x0_t, which is exactly DDIM with eta = 0. diffusers does the same
(`lower_order_final=True`; with a final sigma of 0 its last step is always first order).

State. The shared step contract `step(schedule, x_t, t, t_prev, eps, ...) -> StepOutput` is a
function of one step, but a multistep solver needs the previous x0. The math lives in a pure
function that takes that state explicitly, `dpm_solver_pp_2m_update(..., x0_last, t_last)`, and a
small object, `DPMSolverPP2M`, keeps it between calls: its `step` (and `__call__`) has the contract
signature, so `loop.sample(..., step=DPMSolverPP2M())`, guidance wrappers and callbacks work
unchanged, and neither StepOutput nor the loop grows a solver-specific field. The object
remembers which t it expects next: a call at any other t (a new chain, a reused object after an
interrupted run) starts afresh with a first-order step, and the end of the chain clears it.
Use one object per chain being sampled at a time.

Karras spacing. `karras_sigmas` gives Karras's noise levels sigma = sqrt(1 / alpha_bar - 1);
`sigmas_to_timesteps` maps them to the (rounded or interpolated) discrete t of a schedule by
interpolating log sigma. Two ways to sample on them: `karras_timesteps` snaps to the nearest
discrete steps and uses the schedule's own alpha_bar there (any sampler, `timesteps=`);
`karras_schedule` keeps the exact Karras sigmas as a respaced schedule whose model timesteps are
the rounded t (what diffusers' `use_karras_sigmas=True` does).
Used by lesson 03.
"""
from __future__ import annotations

import torch

from course_lib.diffusion._checks import check_int, check_real
from course_lib.diffusion.schedules import NoiseSchedule
from course_lib.samplers.ddim import alpha_bar_at, check_step, per_sample, predict_x0
from course_lib.samplers.ddpm import StepOutput
from course_lib.samplers.respace import Respaced


# ---------------------------------------------------------------------------- the solver

def vp_coefficients(schedule: NoiseSchedule, t: torch.Tensor):
    """(alpha_t, sigma_t, lambda_t) of the VP process at integer t of shape (B,), float64:
    alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t).
    t = -1 (the end of the chain) gives alpha 1, sigma 0, lambda +inf."""
    alpha_bar = alpha_bar_at(schedule, t)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return alpha, sigma, alpha.log() - sigma.log()


def dpm_solver_pp_2m_update(schedule: NoiseSchedule, x_t, t, t_prev, x0, x0_last=None, t_last=None):
    """x_prev from x_t by DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), the state passed explicitly:
    x0 = x_theta(x_t, t); x0_last = x_theta at the previous step's t_last, or None for a first-order
    step (= DDIM eta = 0). Steps ending the chain (t_prev = -1) are first order per sample."""
    a_t, s_t, l_t = vp_coefficients(schedule, t)              # alpha_{t_{i-1}}, sigma_{t_{i-1}}, lambda
    a_p, s_p, l_p = vp_coefficients(schedule, t_prev)         # alpha_{t_i}, sigma_{t_i}, lambda_{t_i}
    exp_neg_h = (a_t * s_p) / (a_p * s_t)                     # e^{-h_i}, h_i = lambda_{t_i} - lambda_{t_{i-1}}
    phi = a_p * (1 - exp_neg_h)                               # -alpha_{t_i} (e^{-h_i} - 1)
    x_prev = per_sample(s_p / s_t, x_t) * x_t + per_sample(phi, x_t) * x0   # first order: D = x0
    if x0_last is None:
        return x_prev
    _, _, l_last = vp_coefficients(schedule, t_last)
    r = (l_t - l_last) / (l_p - l_t)                          # r_i = h_{i-1} / h_i
    coef = torch.where(t_prev.to(r.device) < 0, torch.zeros_like(r), phi / (2 * r))   # phi / (2 r_i)
    return x_prev + per_sample(coef, x_t) * (x0 - x0_last)    # D_i = x0 + (x0 - x0_last) / (2 r_i)


class DPMSolverPP2M:
    """DPM-Solver++(2M) as a sampler step: `sample(eps_fn, schedule, shape, step=DPMSolverPP2M(), ...)`.

    Keeps the previous step's x0 prediction (see the module docstring for why an object).
    Deterministic: `noise` and `generator` are accepted for the contract and unused; eta must be 0.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget the previous x0: the next step is a first-order one."""
        self._expected_t = self._t_last = self._x0_last = None

    def _continues(self, t, x_t) -> bool:
        return (self._x0_last is not None and self._x0_last.shape == x_t.shape
                and bool((self._expected_t == t).all()))

    def step(self, schedule: NoiseSchedule, x_t, t, t_prev, eps, *, eta: float = 0.0, clip_x0: bool = False,
             noise=None, generator=None) -> StepOutput:
        """One step from t to t_prev < t; clip_x0 clamps the predicted x0 to [-1, 1]."""
        if eta != 0:
            raise ValueError(f"DPM-Solver++(2M) solves the deterministic ODE: eta must be 0, got {eta}")
        check_step(schedule, x_t, t, t_prev, eps)
        x0, _ = predict_x0(schedule, x_t, t, eps, clip_x0)                  # x_theta(x_t, t)
        last = (self._x0_last, self._t_last) if self._continues(t, x_t) else (None, None)
        x_prev = dpm_solver_pp_2m_update(schedule, x_t, t, t_prev, x0, *last)
        if bool((t_prev < 0).all()):
            self.reset()                                                     # the chain is over
        else:
            self._expected_t, self._t_last, self._x0_last = t_prev.clone(), t.clone(), x0
        return StepOutput(x_prev, x0)

    __call__ = step


# ---------------------------------------------------------------------------- Karras sigmas

def schedule_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float64, increasing in t: the noise level of
    x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps (Karras et al. 2022, sec. 2 and Table 1, VP)."""
    return ((1 - schedule.alpha_bar) / schedule.alpha_bar).sqrt()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. (5): sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho)
    - sigma_max^(1/rho)))^rho, i = 0..n-1, float64, decreasing from sigma_max to sigma_min.
    Karras's final sigma_N = 0 is not included: in our samplers it is t_prev = -1."""
    if check_int("n", n) < 1:
        raise ValueError(f"need n >= 1 noise levels, got {n}")
    sigma_min, sigma_max = check_real("sigma_min", sigma_min), check_real("sigma_max", sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, both finite, got {sigma_min}, {sigma_max}")
    try:
        rho = check_real("rho", rho, low=0.0, low_open=True)
    except ValueError:
        raise ValueError(f"rho must be positive and finite (Karras: 7), got {rho}") from None
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigmas_to_timesteps(schedule: NoiseSchedule, sigmas, *, interpolate: bool = False) -> torch.Tensor:
    """The discrete t whose sigma_t matches each of `sigmas`, by linear interpolation in log sigma
    between neighbouring steps (clamped to 0..T-1). interpolate=True returns the fractional t
    (float64); the default rounds to the nearest integer t (int64, half to even, as numpy)."""
    if schedule.T < 2:
        raise ValueError("need a schedule of at least 2 steps to interpolate sigmas")
    log_s = schedule_sigmas(schedule).log()                           # (T,), increasing
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise ValueError("sigmas must be finite and >= 0 (noise levels sqrt(1 / alpha_bar - 1))")
    log_q = sigmas.clamp(min=1e-10).log()
    low = (torch.searchsorted(log_s, log_q, right=True) - 1).clamp(0, schedule.T - 2)
    w = ((log_s[low] - log_q) / (log_s[low] - log_s[low + 1])).clamp(0, 1)
    t = low + w
    return t if interpolate else t.round().long()


def _karras_for(schedule: NoiseSchedule, n: int, rho: float, sigma_min, sigma_max) -> torch.Tensor:
    s = schedule_sigmas(schedule)
    lo = float(s[0]) if sigma_min is None else sigma_min
    hi = float(s[-1]) if sigma_max is None else sigma_max
    return karras_sigmas(n, lo, hi, rho)


def karras_timesteps(schedule: NoiseSchedule, n: int, rho: float = 7.0, *, sigma_min=None,
                     sigma_max=None) -> torch.Tensor:
    """Karras spacing snapped to the schedule: the nearest discrete t of n Karras sigmas (default
    range: the schedule's own sigma_0..sigma_{T-1}), increasing int64, repeats removed (so near
    sigma_min, where Karras steps are finer than the grid, fewer than n may remain)."""
    return sigmas_to_timesteps(schedule, _karras_for(schedule, n, rho, sigma_min, sigma_max)).unique()


def karras_schedule(schedule: NoiseSchedule, n: int, rho: float = 7.0, *, sigma_min=None,
                    sigma_max=None) -> Respaced:
    """Karras spacing with the exact Karras sigmas, as diffusers' `use_karras_sigmas=True`:
    an n-step schedule with alpha_bar_i = 1 / (1 + sigma_i^2) (index 0 the least noisy) and, for the
    model, the rounded t of each sigma (repeats possible). Sample it like a respaced schedule:
    `sample(respaced_model(eps_fn, r.timesteps), r.schedule, shape, step=...)`."""
    sigmas = _karras_for(schedule, n, rho, sigma_min, sigma_max).flip(0)   # increasing
    return Respaced(NoiseSchedule.from_alpha_bar(1 / (1 + sigmas ** 2)), sigmas_to_timesteps(schedule, sigmas))
