"""The sampling loop every sampler shares: x_T ~ N(0, I), then step after step from the
largest t to the end of the chain (t_prev = -1), with a progress bar and a callback.

A model is any noise predictor eps_fn(x_t, t, cond) -> output; a learned-variance output
(2C channels) is split into eps and v, and v is passed to steps that take it.

Devices: the samples live on `device` (or x_T's). A generator may live elsewhere (the course's
generators are CPU ones): x_T and the steps' noise are then drawn on the generator's device and moved,
so a CUDA run starts from, and adds, the same noise as a CPU run with the same seed.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from course_lib.diffusion import formulas
from course_lib.samplers.ddpm import ddpm_step


class Trajectory:
    """A callback that keeps x_t and the predicted x_0 every `every` steps (for plots and widgets)."""

    def __init__(self, every: int = 1):
        self.every, self.t, self.x_t, self.x0 = every, [], [], []

    def __call__(self, i, t, x_t, out):
        if i % self.every == 0 or int(t[0]) == 0:
            self.t.append(int(t[0]))
            self.x_t.append(x_t.detach().cpu())
            self.x0.append(out.x0.detach().cpu())


def _takes(step, name):
    return name in inspect.signature(step).parameters


randn = formulas.randn   # N(0, I) drawn on the generator's own device, then moved


def _elsewhere(generator, device) -> bool:
    """Whether a generator lives on another device than the samples (a CPU generator, CUDA samples)."""
    return generator is not None and generator.device != torch.device(device)


def _draws_noise(step, kwargs) -> bool:
    """Whether `step` would draw z from its generator: steps with an eta only when eta > 0 (DDIM,
    DPM-Solver), other steps that take noise always (DDPM draws at every step, the last included)."""
    if "noise" in kwargs or not _takes(step, "noise"):
        return False
    return kwargs.get("eta", 0) > 0 if _takes(step, "eta") else True


@torch.no_grad()
def sample(eps_fn: Callable, schedule, shape, *, step=ddpm_step, timesteps=None, cond=None,
           x_T=None, generator=None, device=None, progress: bool = True, callback=None, **step_kwargs):
    """Draw samples of `shape` (B, C, H, W) by running `step` over `timesteps` (default: T-1..0).

    timesteps: increasing or decreasing sequence of indices into `schedule`; they are visited
    from largest to smallest, each paired with the next (the last with -1).
    callback(i, t, x_t, StepOutput) is called after every step.
    """
    ts = torch.arange(schedule.T) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long)
    ts = ts.sort(descending=True).values
    if ts.numel() == 0:
        raise ValueError("timesteps is empty")
    from course_lib import runtime
    runtime.ensure_threads()
    device = torch.device(device) if device is not None else (x_T.device if x_T is not None else torch.device("cpu"))
    if x_T is not None and shape is not None and tuple(shape) != tuple(x_T.shape):
        raise ValueError(f"shape {tuple(shape)} and x_T {tuple(x_T.shape)} disagree; pass x_T.shape "
                         "(or shape alone to draw x_T here)")
    x = randn(shape, generator, device) if x_T is None else x_T.to(device)
    B = x.shape[0]
    kwargs = dict(step_kwargs)
    predraw = _elsewhere(generator, x.device) and _draws_noise(step, kwargs)
    steps_prev = torch.cat([ts[1:], torch.tensor([-1])])
    for i, (t_i, tp_i) in enumerate(tqdm(list(zip(ts.tolist(), steps_prev.tolist())), disable=not progress,
                                         desc="sampling")):
        t = torch.full((B,), t_i, dtype=torch.long, device=x.device)
        t_prev = torch.full((B,), tp_i, dtype=torch.long, device=x.device)
        eps, v = formulas.split_model_output(eps_fn(x, t, cond), x.shape[1])
        if v is not None and _takes(step, "v"):
            kwargs["v"] = v
        if predraw:   # what the step would have drawn from the generator, drawn where the generator is
            kwargs["noise"] = randn(x.shape, generator, x.device, x.dtype)
        out = step(schedule, x, t, t_prev, eps, generator=generator, **kwargs)
        if callback is not None:
            callback(i, t, x, out)
        x = out.x_prev
    return x


def model_fn(model, *, bf16: bool = False):
    """The noise predictor of a UNet: eps_fn(x_t, t, cond) with cond a class index tensor or None.
    bf16=True runs it under bf16 autocast where that is fast (runtime.bf16_is_fast), else in fp32."""
    from course_lib import runtime

    def eps_fn(x_t, t, cond=None):
        with runtime.autocast(x_t.device.type, bf16):
            out = model(x_t, t, cond)
        return out.float()
    return eps_fn
