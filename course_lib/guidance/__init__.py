"""Guidance: wrappers that take a noise predictor eps_fn(x_t, t, cond) and return one, so DDPM,
DDIM and DPM-Solver (samplers.loop.sample) run guided models unchanged.

    classifier.py    classifier guidance (Dhariwal & Nichol 2021): eps form (Algorithm 2, any
                     sampler) and mean form (Algorithm 1, for ddpm_step); lesson 04
    cfg.py           classifier-free guidance (Ho & Salimans 2022), one batched pass; lesson 05
    clip.py          CLIP guidance (GLIDE sec. 2.4): a noise-aware CLIP at x_t, or a clean CLIP
                     on the predicted x0; lesson 06
    thresholding.py  clipping and Imagen's dynamic thresholding of the predicted x0

Conventions shared by every wrapper:
- cond is what the sampler passes on (loop.sample(..., cond=y)): for class guidance the labels y (B,).
- A wrapper that needs the schedule takes the one the sampler uses, and t are the sampler's indices
  into it; the model (and classifier) it wraps are called with those same t. For a respaced
  schedule wrap respaced_model(eps_fn, r.timesteps) and respaced_classifier(classifier, r.timesteps)
  and pass r.schedule (classifier.py's docstring shows it).
- Learned-variance outputs (eps and v stacked along channels) come back stacked, v unchanged.
- Wrappers nest: threshold_eps(classifier_guided_eps(cfg_eps(model, 3.0, 10), clf, sched, 1.0), sched).
"""
from course_lib.guidance.cfg import cfg_combine, cfg_eps, cfg_scale_to_weight, cfg_weight_to_scale
from course_lib.guidance.classifier import (classifier_grad, classifier_guided_eps, classifier_guided_mean,
                                            mean_guided_eps, respaced_classifier, score_guided_eps,
                                            step_variance)
from course_lib.guidance.clip import clip_guided_eps, similarity_grad, text_embeddings
from course_lib.guidance.thresholding import dynamic_threshold, static_threshold, threshold, threshold_eps

__all__ = [
    "classifier_grad", "classifier_guided_eps", "classifier_guided_mean", "respaced_classifier",
    "score_guided_eps", "mean_guided_eps", "step_variance",
    "cfg_eps", "cfg_combine", "cfg_weight_to_scale", "cfg_scale_to_weight",
    "clip_guided_eps", "similarity_grad", "text_embeddings",
    "static_threshold", "dynamic_threshold", "threshold", "threshold_eps",
]
