"""CLIP guidance (GLIDE, Nichol et al. 2022, sec. 2.4): steer a diffusion model toward a caption c
with the gradient of the CLIP similarity f(x) . g(c) of image and caption embeddings (unit vectors).

From the score view (lesson 04's eq. 14 with the classifier's log-probability replaced by the
similarity): the guided score is grad log p(x_t) + s grad_{x_t} (f . g), so as a noise predictor

    eps_hat = eps_theta(x_t) - s sqrt(1 - alpha_bar_t) grad_{x_t} [ f(x_t, t) . g(c) ].

Two ways to get f at a noisy x_t (both `clip_guided_eps`):

- form="noisy": a noise-aware CLIP f(x_t, t) (models.clip.NoisyCLIP), trained on q_sample
  images as GLIDE did; the gradient is taken at x_t directly. Cost per step: one model forward,
  one CLIP image forward and backward.
- form="x0": a clean CLIP applied to the model's predicted x0 = (x_t - sqrt(1 - alpha_bar_t) eps)
  / sqrt(alpha_bar_t) (clamped to [-1, 1]). through_model=True differentiates through the model
  too (the chain rule in full: a model backward per step, more compute); through_model=False
  treats eps as a constant, so d x0 / d x_t = 1 / sqrt(alpha_bar_t) (the noisy form's compute),
  a factor that is about 2e4 at t = 999 of the cosine schedule.

cond is the captions' text embeddings g(c), (B, D) unit vectors (`text_embeddings`), or the
captions themselves (encoded once and cached). Like every wrapper here it returns a noise predictor,
so DDPM, DDIM and DPM-Solver run it unchanged. For a respaced schedule, pass the respaced one and
`timesteps=r.timesteps` so the noise-aware CLIP sees the original t it was trained on.
Used by lesson 06.
"""
from __future__ import annotations

import torch

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule
from course_lib.guidance._checks import check_image, check_scale, join_output
from course_lib.guidance.classifier import score_guided_eps

FORMS = ("noisy", "x0")


@torch.no_grad()
def text_embeddings(clip, captions) -> torch.Tensor:
    """g(c): the captions' unit text embeddings (B, D) from a CLIP (ShapesCLIP or NoisyCLIP)."""
    if isinstance(captions, str):
        captions = [captions]
    return clip.encode_text(list(captions)).float()


def _check_text(text, batch: int, dim: int | None = None) -> torch.Tensor:
    if not isinstance(text, torch.Tensor) or not text.dtype.is_floating_point or text.dim() != 2:
        raise TypeError("CLIP guidance needs cond = text embeddings (B, D), a float tensor, or a list of captions; "
                        f"got {getattr(text, 'shape', type(text).__name__)}")
    if text.shape[0] == 1 and batch != 1:
        text = text.expand(batch, -1)
    if text.shape[0] != batch:
        raise ValueError(f"CLIP guidance: {text.shape[0]} text embeddings for a batch of {batch}")
    if dim is not None and text.shape[1] != dim:
        raise ValueError(f"text embeddings have {text.shape[1]} dimensions, the CLIP's images {dim}")
    return text


def similarity_grad(image_fn, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """grad_x [ image_fn(x) . text ] per sample, shaped like x. image_fn returns (B, D) unit vectors."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("CLIP guidance differentiates CLIP, and autograd is off under torch.inference_mode(); "
                           "sample under torch.no_grad() instead (loop.sample does)")
    with torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        f = image_fn(x_in)                                            # (B, D)
        sim = (f.float() * _check_text(text, x.shape[0], f.shape[1]).to(f.device)).sum()
        (grad,) = torch.autograd.grad(sim, x_in)
    return grad.detach()


def clip_guided_eps(eps_fn, clip, schedule: NoiseSchedule, scale: float, *, form: str = "noisy",
                    through_model: bool = True, timesteps=None, model_uses_cond: bool = False):
    """CLIP guidance as a noise predictor: eps - s sqrt(1 - alpha_bar_t) grad_{x_t} (f . g(c)).

    clip: a NoisyCLIP (form="noisy": encode_image(x_t, t)) or a ShapesCLIP (form="x0":
    encode_image(x0)). cond: text embeddings (B, D) or captions. through_model: form "x0" only
    (see the module docstring). timesteps: the original t of each index of a respaced `schedule`,
    for the noise-aware CLIP. model_uses_cond: also pass cond to the model (a text-conditional one).
    A learned-variance output keeps v and moves eps; scale 0 returns the model's output.
    """
    scale = check_scale(scale)
    if form not in FORMS:
        raise ValueError(f"unknown CLIP guidance form {form!r}; choose one of {FORMS}")
    ts = None if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long)
    cache = {}

    def text_of(cond, batch):
        if isinstance(cond, (list, tuple, str)):
            key = (cond,) if isinstance(cond, str) else tuple(cond)
            if key not in cache:
                cache.clear()
                cache[key] = text_embeddings(clip, key)
            cond = cache[key]
        if cond is None:
            raise ValueError("CLIP guidance needs the captions: pass cond = text embeddings (B, D) or a list "
                             "of captions to the guided noise predictor (loop.sample(..., cond=...))")
        return _check_text(cond, batch)

    def guided(x_t, t, cond=None):
        check_image(x_t)
        formulas.check_t(schedule, t, x_t.shape[0])
        text = text_of(cond, x_t.shape[0])
        inner = (lambda x: eps_fn(x, t, cond)) if model_uses_cond else (lambda x: eps_fn(x, t, None))
        if scale == 0:
            return inner(x_t)
        a = formulas.extract(schedule.alpha_bar.to(x_t.device), t, x_t).to(x_t.dtype)   # float64 stays float64
        if form == "noisy":
            out = inner(x_t)
            t_clip = t if ts is None else ts.to(t.device)[t]
            g = similarity_grad(lambda x: clip.encode_image(x, t_clip), x_t, text)
        elif through_model:
            box = {}

            def image_fn(x):
                box["out"] = inner(x)
                eps, _ = formulas.split_model_output(box["out"], x.shape[1])
                return clip.encode_image(((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1))
            g = similarity_grad(image_fn, x_t, text)
            out = box["out"].detach()
        else:
            out = inner(x_t)
            eps0, _ = formulas.split_model_output(out, x_t.shape[1])
            g = similarity_grad(lambda x: clip.encode_image(((x - (1 - a).sqrt() * eps0) / a.sqrt()).clamp(-1, 1)),
                                x_t, text)
        eps, v = formulas.split_model_output(out, x_t.shape[1])
        return join_output(score_guided_eps(schedule, x_t, t, eps, g.to(eps.dtype), scale), v)
    return guided
