"""Keeping the predicted x0 in the data range: clipping (static thresholding) and Imagen's dynamic
thresholding (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep
Language Understanding", sec. 2.3, "Large guidance weight samplers").

Every step predicts the clean image x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
(DDPM eq. 4 solved for x0). Images live in [-1, 1], but a strongly guided eps can predict an x0
far outside: the sampler then moves toward an image that cannot exist, and samples saturate.

  static ("clip"):    x0 <- clip(x0, -1, 1), what DDPM and ADM do (ddpm_step's clip_x0).
  dynamic:            s <- the p-th percentile of |x0| over each sample's pixels (p = 0.995),
                      s <- max(s, 1), x0 <- clip(x0, -s, s) / s.
                      When the percentile is <= 1, s = 1 and this is the static clip, so an x0
                      already inside [-1, 1] is left unchanged; a saturated x0 is scaled back inside
                      [-1, 1] instead of flattened against its edges, which Imagen found gives more
                      photorealistic samples at large guidance weights.

`threshold_eps` applies either to any noise predictor: it thresholds the x0 implied by eps and
returns the eps implied by the thresholded x0 (eq. 4 solved for eps), so every sampler (DDPM, DDIM,
DPM-Solver) benefits without a change. Wrap the guided predictor to threshold after guidance:
threshold_eps(cfg_eps(eps_fn, 7.0, null), schedule). Like the guidance wrappers, it takes the
schedule the sampler uses and t as indices into it (the original schedule around an
original-index model gives the same numbers: respacing keeps alpha_bar).
`only_below=t0` thresholds only the steps t < t0 and passes the others through unchanged (the
sampler's own clip_x0, if on, still acts there): threshold_eps(..., only_below=999) skips the
first step of a T = 1000 chain, where x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) divides
by sqrt(alpha_bar_999) and any method faces a wild x0 (lesson 05).
Used by lessons 04, 05 and 07.
"""
from __future__ import annotations

import numbers

import torch

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule
from course_lib.guidance._checks import check_image, join_output

METHODS = ("clip", "dynamic")


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    """Imagen's static thresholding: clip x0 to [-1, 1] (the clip_x0 of DDPM and ADM)."""
    check_image(x0, "x0")
    return x0.clamp(-1, 1)


def _check_percentile(percentile) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
        raise TypeError(f"percentile must be a number, got {type(percentile).__name__}")
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile is a fraction in (0, 1] (Imagen: 0.995 for 99.5%), got {percentile}")
    return float(percentile)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding, per sample: s = max(percentile of |x0|, 1), x0 <- clip(x0, -s, s) / s.
    The percentile interpolates linearly between pixel values (torch.quantile, numpy's default)."""
    percentile = _check_percentile(percentile)
    check_image(x0, "x0")
    if x0.numel() == 0:
        return x0.clone()                                                 # an empty batch: nothing to threshold
    flat = x0.abs().flatten(1)                                            # (B, C*H*W)
    if flat.dtype not in (torch.float32, torch.float64):                  # quantile wants float or double
        flat = flat.float()
    s = torch.quantile(flat, percentile, dim=1)                           # (B,)
    s = s.clamp(min=1).to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def threshold(x0: torch.Tensor, method: str = "dynamic", percentile: float = 0.995) -> torch.Tensor:
    """x0 thresholded by `method`: "clip" (static) or "dynamic"."""
    if method == "clip":
        return static_threshold(x0)
    if method == "dynamic":
        return dynamic_threshold(x0, percentile)
    raise ValueError(f"unknown thresholding method {method!r}; choose one of {METHODS}")


def threshold_eps(eps_fn, schedule: NoiseSchedule, method: str = "dynamic", percentile: float = 0.995, *,
                  only_below: int | None = None):
    """A noise predictor whose implied x0 is thresholded: eps -> x0 -> threshold -> eps.
    A learned-variance output keeps its v. t: indices into `schedule`, the sampler's schedule.
    only_below: None (every step) or an int t0 in 1..T: threshold only the samples whose t < t0 and
    return the others' eps unchanged (only_below=schedule.T - 1 skips the first step, t = T - 1)."""
    if method not in METHODS:
        raise ValueError(f"unknown thresholding method {method!r}; choose one of {METHODS}")
    percentile = _check_percentile(percentile)
    if only_below is not None:
        if isinstance(only_below, bool) or not isinstance(only_below, numbers.Integral):
            raise TypeError(f"only_below must be None or an int step index, got {type(only_below).__name__}")
        if not 1 <= only_below <= schedule.T:
            raise ValueError(f"only_below must lie in 1..{schedule.T} (steps t < only_below are thresholded), "
                             f"got {only_below}")

    def thresholded(x_t, t, cond=None):
        check_image(x_t)
        formulas.check_t(schedule, t, x_t.shape[0])
        eps, v = formulas.split_model_output(eps_fn(x_t, t, cond), x_t.shape[1])
        x0 = formulas.x0_from_eps(schedule, x_t, t, eps)                  # 1. the predicted x0
        x0 = threshold(x0, method, percentile)                            # 2. back into [-1, 1]
        new_eps = formulas.eps_from_x0(schedule, x_t, t, x0)              # 3. the eps it implies
        if only_below is not None:                                        # steps t >= only_below pass through
            keep = (t >= only_below).reshape(-1, *([1] * (eps.dim() - 1))).to(eps.device)
            new_eps = torch.where(keep, eps, new_eps)
        return join_output(new_eps, v)
    return thresholded
