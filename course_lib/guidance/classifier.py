"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
sec. 4): steer a diffusion model toward class y with the gradient of a noise-aware classifier
p_phi(y | x_t, t) (nn.classifier.NoisyClassifier: logits = classifier(x_t, t)).

The gradient. g = grad_{x_t} log p_phi(y | x_t, t), the log-softmax of the logits at y,
differentiated by autograd (`classifier_grad`). It points to where the classifier is more sure
that x_t shows class y. ADM's code takes it at the current x_t, as we do.

Mean form, for ancestral sampling (sec. 4.1, Algorithm 1). The class-conditional transition is
p(x_{t-1} | x_t, y) ∝ p_theta(x_{t-1} | x_t) p_phi(y | x_{t-1}) (eq. 2). The first factor is
N(mu, Sigma) (eq. 3); the log of the second, expanded to first order around mu, is linear,
(x_{t-1} - mu) g + C (eqs. 5-6). A Gaussian log-density plus a linear term is a Gaussian with a
moved mean: completing the square (eqs. 7-10) gives N(mu + Sigma g, Sigma). Algorithm 1 samples
x_{t-1} ~ N(mu + s Sigma g, Sigma), s the gradient scale.
(The paper writes these steps as x_{t+1} -> x_t; the code's are t -> t_prev.)

Eps form, for DDIM and any sampler that only reads eps (sec. 4.2, Algorithm 2). A noise predictor
is a scaled score, grad log p_theta(x_t) = -eps_theta(x_t) / sqrt(1 - alpha_bar_t) (eq. 11).
The score of p_theta(x_t) p_phi(y | x_t) adds the classifier's gradient (eqs. 12-13); turning
it back into a noise prediction gives

    eps_hat = eps_theta(x_t) - sqrt(1 - alpha_bar_t) grad log p_phi(y | x_t)      (eq. 14)

and Algorithm 2 runs DDIM on eps_hat. The scale s multiplies the gradient in both algorithms:
s grad log p(y | x) = grad log (p(y | x)^s / Z), a sharper classifier distribution (sec. 4.3).

Both forms are noise predictors here, so `samplers.loop.sample` runs them with any step unchanged.
The mean form becomes an eps because ddpm_step's mean is linear in eps (DDPM eq. 11):

    mu(eps) = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)
    mu(eps') = mu(eps) + s Sigma g   <=>   eps' = eps - s Sigma g sqrt(alpha_t) sqrt(1 - alpha_bar_t) / beta_t

Sigma is the variance of the step ddpm_step takes, computed exactly as it does
(`samplers.ddpm.log_variance`): "small" beta_tilde_t, "large" beta_t, or "learned" from the
model's v; pass the wrapper the same `variance=` you give ddpm_step. At t = 0 ddpm_step adds no
noise but its log variance is the clipped one (beta_tilde_1 for "small"); we shift the mean by
that same Sigma. (ADM's fixed-small variance is exactly 0 at the last step, so ADM does not
shift the final mean there; the difference is one step of size s beta_tilde_1 g.)
The mean shift is exact when ddpm_step does not clip x0 (`clip_x0=False`); to clip x0 before
guiding, as ADM does, wrap the model in `thresholding.threshold_eps(..., method="clip")` first.

The two forms agree for small steps. Fed to ddpm_step, the eps form moves the mean by
s (beta_t / sqrt(alpha_t)) g; Algorithm 1 moves it by s Sigma g. Their ratio is
Sigma sqrt(alpha_t) / beta_t: with Sigma = beta_t it is sqrt(1 - beta_t), which tends to 1 as
beta_t -> 0 (many steps); with Sigma = beta_tilde_t it tends to 1 as well away from t = 0.

Schedules and indices. A wrapper takes the schedule the SAMPLER uses, and is called with t, the
sampler's indices into it; the model and the classifier it wraps are called with those same t.
To sample a respaced schedule, respace the inner pieces and pass the respaced schedule:

    r = respace(schedule, even_timesteps(1000, 50))
    guided = classifier_guided_mean(respaced_model(eps_fn, r.timesteps),
                                    respaced_classifier(classifier, r.timesteps), r.schedule, scale=2.0)
    x = sample(guided, r.schedule, shape, step=ddpm_step, cond=y, clip_x0=False)

The mean form needs this: Sigma and beta of a respaced step are not those of one original step.
The eps form reads only alpha_bar_t, which respacing keeps, so wrapping the original model with
the original schedule and respacing the result (`respaced_model(classifier_guided_eps(...))`)
gives the same numbers (tested).
Used by lesson 04.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.diffusion import formulas
from course_lib.diffusion._checks import check_index_tensor
from course_lib.diffusion.schedules import NoiseSchedule
from course_lib.guidance._checks import check_image, check_labels, check_scale, join_output
from course_lib.samplers import ddpm
from course_lib.samplers.respace import check_respaced_index


# ---------------------------------------------------------------------------- the gradient

def classifier_grad(classifier, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g = grad_{x_t} log p_phi(y | x_t, t), shaped and typed like x_t.

    classifier(x_t, t) -> logits (B, K); log p_phi(y | x_t) is their log-softmax at y. The per-sample
    log-probabilities are summed before differentiating: each depends on its own x_t only (use the
    classifier in eval mode), so the gradient of the sum is every sample's own gradient.
    Gradients are enabled inside, so callers under torch.no_grad (loop.sample) work; the
    classifier's parameters receive no .grad.
    """
    check_image(x_t)
    y = check_labels(y, x_t.shape[0], "classifier guidance", x_t.device)
    if x_t.shape[0] == 0:
        return torch.zeros_like(x_t)                                       # an empty batch has an empty gradient
    if torch.is_inference_mode_enabled():
        raise RuntimeError("classifier guidance differentiates the classifier, and autograd is off under "
                           "torch.inference_mode(); sample under torch.no_grad() instead (loop.sample does)")
    with torch.enable_grad():
        x_in = x_t.detach().clone().requires_grad_(True)
        logits = classifier(x_in, t)                                       # (B, K)
        if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
            raise TypeError(f"classifier(x_t, t) must return floating-point logits, got "
                            f"{getattr(logits, 'dtype', type(logits).__name__)}")
        if logits.dim() != 2 or logits.shape[0] != x_t.shape[0]:
            raise ValueError(f"classifier(x_t, t) must return logits of shape ({x_t.shape[0]}, K), "
                             f"got {tuple(logits.shape)}")
        if int(y.max()) >= logits.shape[1]:
            raise ValueError(f"class label {int(y.max())} is out of range for a classifier of "
                             f"{logits.shape[1]} classes (labels 0..{logits.shape[1] - 1})")
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        log_probs = F.log_softmax(logits, dim=-1)                          # log p_phi(k | x_t), (B, K)
        selected = log_probs[torch.arange(len(y), device=logits.device), y.to(logits.device)]  # (B,)
        (grad,) = torch.autograd.grad(selected.sum(), x_in)                # (B, C, H, W)
    return grad.detach()


def respaced_classifier(classifier, timesteps: torch.Tensor):
    """classifier(x_t, t) for respaced indices i: it sees t = timesteps[i], the original steps it was
    trained on (the classifier's counterpart of samplers.respace.respaced_model)."""
    timesteps = check_index_tensor("timesteps", timesteps, low=0)

    def wrapped(x_t, i):
        i = check_respaced_index(i, len(timesteps))
        return classifier(x_t, timesteps.to(i.device)[i])
    return wrapped


# ---------------------------------------------------------------------------- the two forms, as math

def score_guided_eps(schedule: NoiseSchedule, x_t, t, eps, grad, scale: float):
    """Algorithm 2's eps_hat = eps - s sqrt(1 - alpha_bar_t) g (eq. 14, scaled as in sec. 4.3)."""
    return eps - scale * formulas.extract((1 - schedule.alpha_bar).sqrt(), t, x_t) * grad


def step_variance(schedule: NoiseSchedule, x_t, t, variance: str = "small", v=None):
    """Sigma, the variance of ddpm_step's transition at t, computed as ddpm_step computes it
    (exp of samplers.ddpm.log_variance; clipped at t = 0), shaped to broadcast against x_t."""
    return torch.exp(ddpm.log_variance(schedule, t, x_t, variance, v))


def mean_guided_eps(schedule: NoiseSchedule, x_t, t, eps, grad, scale: float, sigma2):
    """The eps whose DDPM mean is Algorithm 1's mu + s Sigma g:
    eps' = eps - s Sigma g sqrt(alpha_t) sqrt(1 - alpha_bar_t) / beta_t (DDPM eq. 11 solved for eps)."""
    s = schedule
    coef = formulas.extract(s.alphas.sqrt() * (1 - s.alpha_bar).sqrt() / s.betas, t, x_t)
    return eps - scale * coef * sigma2 * grad


# ---------------------------------------------------------------------------- the wrappers

def _check_call(schedule: NoiseSchedule, x_t, t, cond) -> torch.Tensor:
    """Validate a guided call's x_t, t (indices into `schedule`) and labels; return the labels."""
    check_image(x_t)
    formulas.check_t(schedule, t, x_t.shape[0])
    return check_labels(cond, x_t.shape[0], "classifier guidance", x_t.device)


def classifier_guided_eps(eps_fn, classifier, schedule: NoiseSchedule, scale: float, *,
                          model_uses_cond: bool = True):
    """Classifier guidance in eps form (Algorithm 2), as a noise predictor for any sampler (DDIM,
    DPM-Solver, DDPM). Call it with cond = y, class labels (B,): the classifier always gets them,
    the model only when model_uses_cond (False guides an unconditional model).
    `schedule` and t: the sampler's (see the module docstring for respacing).
    A learned-variance output (eps, v) keeps v and moves eps. scale 0 returns the model's output."""
    scale = check_scale(scale)

    def guided(x_t, t, cond=None):
        y = _check_call(schedule, x_t, t, cond)
        out = eps_fn(x_t, t, y if model_uses_cond else None)
        if scale == 0:
            return out
        eps, v = formulas.split_model_output(out, x_t.shape[1])
        g = classifier_grad(classifier, x_t, t, y)                         # grad log p_phi(y | x_t)
        return join_output(score_guided_eps(schedule, x_t, t, eps, g, scale), v)
    return guided


def classifier_guided_mean(eps_fn, classifier, schedule: NoiseSchedule, scale: float, *,
                           variance: str = "small", model_uses_cond: bool = True):
    """Classifier guidance in mean form (Algorithm 1), as a noise predictor for ddpm_step: the step's
    mean moves by s Sigma g, Sigma the step's variance for `variance` ("small", "large", "learned";
    give ddpm_step the same, and clip_x0=False for the shift to be exact). Call it with cond = y;
    model_uses_cond, learned variance and scale 0 as in classifier_guided_eps."""
    scale = check_scale(scale)
    if variance not in ddpm.VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {ddpm.VARIANCES}")

    def guided(x_t, t, cond=None):
        y = _check_call(schedule, x_t, t, cond)
        out = eps_fn(x_t, t, y if model_uses_cond else None)
        if scale == 0:
            return out
        eps, v = formulas.split_model_output(out, x_t.shape[1])
        sigma2 = step_variance(schedule, x_t, t, variance, v)             # Sigma, as ddpm_step has it
        g = classifier_grad(classifier, x_t, t, y)
        return join_output(mean_guided_eps(schedule, x_t, t, eps, g, scale, sigma2), v)
    return guided
