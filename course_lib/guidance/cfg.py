"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

One network learns both the conditional eps(x_t, y) and the unconditional eps(x_t) = eps(x_t, null):
during training the label is replaced by the null class with probability p_uncond (Algorithm 1;
nn.unet.UNet's null class is index num_classes). Sampling (Algorithm 2) mixes the two:

    eps_tilde = (1 + w) eps(x_t, y) - w eps(x_t)                     (Ho & Salimans eq. 6)

Why: Bayes' rule gives an implicit classifier p(y | x_t) ∝ p(x_t | y) / p(x_t), whose gradient is
the difference of the two scores, -(eps(x_t, y) - eps(x_t)) / sqrt(1 - alpha_bar_t) (sec. 3.2).
Put into classifier guidance's eps form, eps(x_t, y) - w sqrt(1 - alpha_bar_t) grad log p(y | x_t)
(sec. 3.1; Dhariwal & Nichol eq. 14), it is eq. 6: no classifier, no gradient.

Two parameterisations of the same line through eps(x_t) and eps(x_t, y):
  scale s (GLIDE, Nichol et al. 2022, sec. 2.3; diffusers' guidance_scale; Imagen's w):
      eps_tilde = eps(x_t) + s (eps(x_t, y) - eps(x_t));  s = 0 unconditional, s = 1 conditional;
  weight w (Ho & Salimans): w = 0 conditional, so s = 1 + w (`cfg_weight_to_scale`).
The library takes s (`cfg_eps`); convert a paper's w with cfg_weight_to_scale(w).

One forward pass per step: x_t is stacked twice and the labels as [y, null], so the model sees a
batch of 2B and returns the conditional half first. For a learned-variance model (eps, v) the
guided eps is paired with v of the conditional half, as GLIDE's sampling code does (v only sets
the step's variance; CFG moves the mean).

cfg_eps needs no schedule, so it composes with respacing either way round:
cfg_eps(respaced_model(eps_fn, r.timesteps), ...) or respaced_model(cfg_eps(eps_fn, ...), r.timesteps).

`cfg_two_models(cond_eps_fn, uncond_eps_fn, scale)` is the same line through the predictions of two
networks: eps(x_t, y) from a conditional model and eps(x_t) from a separate unconditional one (two
passes of B per step instead of one of 2B). With uncond_eps_fn = the first network at the null class
it is cfg_eps exactly; lesson 05 uses it to take eps(x_t) from fashion_ddpm, whose unconditional
predictions are better than fashion_cond's null class.
Used by lessons 05 and 07.
"""
from __future__ import annotations

import math
import numbers

import torch

from course_lib.diffusion import formulas
from course_lib.guidance._checks import check_image, check_labels, check_scale, check_steps, join_output


def cfg_weight_to_scale(w: float) -> float:
    """Ho & Salimans' weight w (0: the conditional model) as the scale s = 1 + w that cfg_eps takes."""
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
        raise TypeError(f"w must be a real number, got {type(w).__name__}")
    if not math.isfinite(w) or w < -1:
        raise ValueError(f"w must be >= -1 (w = -1 is the unconditional model, s = 1 + w = 0), got {w}")
    return 1.0 + float(w)


def cfg_scale_to_weight(scale: float) -> float:
    """The scale s as Ho & Salimans' weight w = s - 1."""
    return check_scale(scale) - 1.0


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_tilde = eps_uncond + s (eps_cond - eps_uncond) = (1 + w) eps_cond - w eps_uncond, s = 1 + w."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def cfg_eps(eps_fn, scale: float, null_class):
    """Classifier-free guidance as a noise predictor.

    Classes: call it with cond = y, class labels (B,); null_class is the label meaning "no class"
    (nn.unet.UNet: num_classes), and labels y lie in 0..null_class (a label equal to null_class is an
    unconditional row, which guidance leaves as is).
    Captions (GLIDE, lesson 07): null_class is the null caption, a string ("" for models.glide); call
    it with cond = a list of B captions or a models.glide.Prompt (its image channels are duplicated).

    eps_fn(x_t, t, cond) is called once per step on a batch of 2B: (x_t, x_t) with conditions
    (cond, null). scale s >= 0 (s = 1 + w; 1: the conditional model, 0: the unconditional one).
    """
    scale = check_scale(scale)
    captions = isinstance(null_class, str)
    if not captions:
        if isinstance(null_class, bool) or not isinstance(null_class, numbers.Integral):
            raise TypeError(f"null_class must be an int (the UNet's num_classes) or a null caption string, "
                            f"got {type(null_class).__name__}")
        if null_class < 0:
            raise ValueError(f"null_class must be >= 0 (the UNet's num_classes), got {null_class}")

    def both(cond, B, device):
        if captions:
            from course_lib.models.glide import as_prompt
            return as_prompt(cond, B).with_null(null_class)
        y = check_labels(cond, B, "classifier-free guidance", device)
        if B and int(y.max()) > null_class:
            raise ValueError(f"class label {int(y.max())} is above null_class={null_class}: the null class "
                             "is the index after the last real class (UNet: num_classes)")
        return torch.cat([y, torch.full_like(y, null_class)])

    def guided(x_t, t, cond=None):
        check_image(x_t)
        B, C = x_t.shape[:2]
        check_steps(t, B, "classifier-free guidance")
        out = eps_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), both(cond, B, x_t.device))  # (2B, C or 2C, H, W)
        if out.shape[0] != 2 * B:
            raise ValueError(f"the model returned a batch of {out.shape[0]} for an input batch of {2 * B}")
        out_cond, out_uncond = out.chunk(2)                               # conditional half first
        return _guided_output(out_cond, out_uncond, C, scale)
    return guided


def _guided_output(out_cond, out_uncond, C: int, scale: float):
    """The guided model output from the conditional and unconditional outputs ((B, C or 2C, H, W)
    each): eps combined by cfg_combine, v (learned variance) from the conditional output."""
    eps_c, v_c = formulas.split_model_output(out_cond, C)
    eps_u, _ = formulas.split_model_output(out_uncond, C)
    return join_output(cfg_combine(eps_c, eps_u, scale), v_c)


def cfg_two_models(cond_eps_fn, uncond_eps_fn, scale: float):
    """Classifier-free guidance with the unconditional prediction taken from a second network:
    eps_tilde = eps_u + s (eps_c - eps_u), eps_c = cond_eps_fn(x_t, t, cond), eps_u = uncond_eps_fn(x_t, t, None).

    cond_eps_fn: the conditional model, called once per step on the batch of B with the condition the
    sampler passes (cond = class labels (B,), or captions). uncond_eps_fn: an unconditional model,
    called once per step on the same x_t and t with cond=None. Both must predict the noise on the
    same schedule (same t). A learned-variance output (eps, v) takes v from the conditional model, as
    cfg_eps does; the unconditional model may have learned variance or not (its v is ignored).
    scale s >= 0 (s = 1 + w; 1: the conditional model, 0: the unconditional one).
    cfg_eps(eps_fn, s, null) equals cfg_two_models(eps_fn, lambda x, t, c=None: eps_fn(x, t, null labels), s).
    """
    scale = check_scale(scale)
    if not callable(cond_eps_fn) or not callable(uncond_eps_fn):
        raise TypeError("cond_eps_fn and uncond_eps_fn must be noise predictors eps_fn(x_t, t, cond)")

    def guided(x_t, t, cond=None):
        check_image(x_t)
        B, C = x_t.shape[:2]
        check_steps(t, B, "classifier-free guidance with two models")
        if cond is None:
            raise ValueError("classifier-free guidance with two models needs a condition: pass cond=y "
                             "(class labels) to the guided noise predictor (loop.sample(..., cond=y))")
        if isinstance(cond, torch.Tensor):
            check_labels(cond, B, "classifier-free guidance with two models", x_t.device)
        out_cond, out_uncond = cond_eps_fn(x_t, t, cond), uncond_eps_fn(x_t, t, None)
        for name, out in (("cond_eps_fn", out_cond), ("uncond_eps_fn", out_uncond)):
            if out.shape[0] != B or out.shape[2:] != x_t.shape[2:]:
                raise ValueError(f"{name} returned shape {tuple(out.shape)} for x_t of shape {tuple(x_t.shape)}")
        return _guided_output(out_cond, out_uncond, C, scale)
    return guided
