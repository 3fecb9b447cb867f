"""The metrics a checkpoint's card records, measured by `course train` / `course evaluate`.

Everything runs on the model's device (or `device=`); noise comes from CPU generators and is moved
there, so the numbers do not depend on the device beyond floating-point rounding."""
from __future__ import annotations

import time

import torch

from course_lib.eval.features import FashionEvaluator
from course_lib.eval.sweep import balanced_labels


def _device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def classifier_accuracy(model, images, labels, batch_size: int = 1000) -> float:
    model.eval()
    dev = _device_of(model)
    correct = sum(int((model(images[i:i + batch_size].to(dev)).argmax(1).cpu() == labels[i:i + batch_size]).sum())
                  for i in range(0, images.shape[0], batch_size))
    return correct / images.shape[0]


def sample_images(recipe, model, n: int, steps: int, *, variance=None, seed: int = 0, batch_size: int = 250,
                  y=None, progress: bool = True, device=None):
    """n samples of a diffusion recipe's model with `steps` respaced DDPM steps, on `device` (default:
    the model's), from a CPU generator seeded by `seed`."""
    from course_lib import runtime
    from course_lib.samplers import loop, respace
    from course_lib.samplers.ddpm import ddpm_step
    variance = variance or ("learned" if model.config.learn_sigma else "small")
    spaced = respace.respace(recipe.noise_schedule(), respace.even_timesteps(recipe.T, steps))
    eps_fn = respace.respaced_model(loop.model_fn(model, bf16=recipe.bf16), spaced.timesteps)
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device) if device is not None else _device_of(model)
    runtime.ensure_threads()
    size, c = model.config.image_size, model.config.in_channels
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        cond = None if y is None else y[i:i + b].to(dev)
        out.append(loop.sample(eps_fn, spaced.schedule, (b, c, size, size), step=ddpm_step, cond=cond,
                               generator=g, variance=variance, progress=progress, device=dev))
    return torch.cat(out)


NOISY_ACCURACY_TS = (0, 100, 250, 500, 750, 900, 999)


@torch.no_grad()
def noisy_accuracy(recipe, model, images, labels, ts=NOISY_ACCURACY_TS, *, seed: int = 0,
                   batch_size: int = 500) -> dict:
    """Accuracy of a noise-aware classifier p(y | x_t, t) on x_t = q_sample(x0, t) at each t in ts.

    The noise is drawn from one generator seeded by `seed`, so the numbers are reproducible.
    Returns {t: accuracy}.
    """
    from course_lib.diffusion import formulas
    sched = recipe.noise_schedule()
    model.eval()
    dev = _device_of(model)
    out = {}
    for t_val in ts:
        if not 0 <= int(t_val) < sched.T:
            raise ValueError(f"t must lie in [0, {sched.T - 1}], got {t_val}")
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(t_val))
        correct = 0
        for i in range(0, images.shape[0], batch_size):
            x0 = images[i:i + batch_size]
            noise = torch.randn(x0.shape, generator=g).to(dev)
            x0 = x0.to(dev)
            t = torch.full((x0.shape[0],), int(t_val), dtype=torch.long, device=dev)
            x_t = formulas.q_sample(sched, x0, t, noise)
            correct += int((model(x_t, t).argmax(1).cpu() == labels[i:i + batch_size]).sum())
        out[int(t_val)] = correct / images.shape[0]
    return out


def measure(recipe, model, *, device=None) -> dict:
    """The card's metrics of a trained recipe's model, on `device` (default: the model's)."""
    if device is not None:
        model = model.to(device)
    if recipe.task == "classify":
        images, labels = recipe.load_data("test")
        return {"test_accuracy": round(classifier_accuracy(model, images, labels), 4), "test_images": images.shape[0]}
    if recipe.task in ("clip", "noisy_clip"):
        from course_lib.models.clip import clip_metrics
        return clip_metrics(model, recipe)
    if recipe.task == "attributes":
        from course_lib.eval.attributes import judge_metrics
        return judge_metrics(model, seed=recipe.seed)
    if recipe.task == "noisy_classify":
        images, labels = recipe.load_data("test")
        acc = noisy_accuracy(recipe, model, images, labels)
        return {"test_accuracy_by_t": {str(t): round(a, 4) for t, a in acc.items()}, "test_images": images.shape[0],
                "noise": "x_t = q_sample(x0, t) with the recipe's schedule, one fixed seed per t"}
    if recipe.task == "glide":
        from course_lib.models.glide import glide_metrics
        return glide_metrics(recipe, model)
    if recipe.task == "glide_inpaint":
        from course_lib.models.glide import inpaint_metrics
        from course_lib.training.checkpoints import load_pretrained
        return inpaint_metrics(recipe, model, base=load_pretrained("shapes_glide", device=_device_of(model)))
    if recipe.task == "glide_upsample":
        from course_lib.models.glide import upsample_metrics
        return upsample_metrics(recipe, model)
    if recipe.task == "diffusion" and recipe.data == "shapes":
        from course_lib.eval.attributes import diffusion_metrics
        return diffusion_metrics(recipe, model)
    if recipe.task == "diffusion" and getattr(model.config, "num_classes", None):
        ev = FashionEvaluator()
        n = recipe.eval_samples
        y = balanced_labels(n, model.config.num_classes)
        t0 = time.time()
        x_c = sample_images(recipe, model, n, recipe.eval_steps, y=y)
        seconds = time.time() - t0
        x_u = sample_images(recipe, model, n, recipe.eval_steps, seed=1)   # y=None: the null class
        variance = "learned" if model.config.learn_sigma else "small"
        return {"fid_conditional": round(ev.fid(x_c), 3),
                "accuracy_conditional": round(float((ev.predict(x_c) == y).float().mean()), 4),
                "fid_unconditional": round(ev.fid(x_u), 3), "real_vs_real_fid": round(ev.real_fid(n), 3),
                "fid_samples": n, "fid_reference": "Fashion-MNIST test set (10,000), eval-classifier features",
                "sampler": f"DDPM, {recipe.eval_steps} respaced steps, {variance} variance, no guidance "
                           "(conditional: balanced labels; unconditional: the null class)",
                "class_histogram_conditional": ev.class_histogram(x_c),
                "class_histogram_unconditional": ev.class_histogram(x_u),
                "seconds_per_sample": round(seconds / n, 4)}
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
