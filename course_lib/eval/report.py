"""The metrics a checkpoint's card records, measured by `course train` / `course evaluate`."""
from __future__ import annotations

import time

import torch

from course_lib.eval.features import FashionEvaluator


@torch.no_grad()
def classifier_accuracy(model, images, labels, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, images.shape[0], batch_size))
    return correct / images.shape[0]


def sample_images(recipe, model, n: int, steps: int, *, variance=None, seed: int = 0, batch_size: int = 250,
                  y=None, progress: bool = True):
    """n samples of a diffusion recipe's model with `steps` respaced DDPM steps."""
    from course_lib.samplers import loop, respace
    from course_lib.samplers.ddpm import ddpm_step
    variance = variance or ("learned" if model.config.learn_sigma else "small")
    spaced = respace.respace(recipe.noise_schedule(), respace.even_timesteps(recipe.T, steps))
    eps_fn = respace.respaced_model(loop.model_fn(model, bf16=recipe.bf16), spaced.timesteps)
    g = torch.Generator().manual_seed(seed)
    size, c = model.config.image_size, model.config.in_channels
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        cond = None if y is None else y[i:i + b]
        out.append(loop.sample(eps_fn, spaced.schedule, (b, c, size, size), step=ddpm_step, cond=cond,
                               generator=g, variance=variance, progress=progress))
    return torch.cat(out)


def measure(recipe, model) -> dict:
    if recipe.task == "classify":
        images, labels = recipe.load_data("test")
        return {"test_accuracy": round(classifier_accuracy(model, images, labels), 4), "test_images": images.shape[0]}
    if recipe.task == "diffusion":
        ev = FashionEvaluator()
        t0 = time.time()
        x = sample_images(recipe, model, recipe.eval_samples, recipe.eval_steps)
        seconds = time.time() - t0
        variance = "learned" if model.config.learn_sigma else "small"
        return {"fid": round(ev.fid(x), 3), "real_vs_real_fid": round(ev.real_fid(recipe.eval_samples), 3),
                "fid_samples": recipe.eval_samples, "fid_reference": "Fashion-MNIST test set (10,000), eval-classifier features",
                "sampler": f"DDPM, {recipe.eval_steps} respaced steps, {variance} variance",
                "class_histogram": ev.class_histogram(x), "seconds_per_sample": round(seconds / x.shape[0], 4)}
    raise ValueError(f"no metrics for task {recipe.task!r}")
