"""Every public entry point, tried with bad inputs: wrong shapes, dtypes, devices, NaN/inf, empty
batches, out-of-range t and parameters, damaged files. Each case must give either a clear error
raised by course_lib itself (ValueError, TypeError, KeyError, CheckpointError, DatasetNotFoundError,
with a message naming what is wrong; never an error from inside torch, never a silent broadcast)
or a correct result. The table is the spec: add a row for every new public function.

Devices are tried with the "meta" device, so a CPU-only run checks them too (a meta tensor beside
a CPU tensor is the same mistake as a CUDA tensor beside a CPU one).

`test_count` prints the tally that issue 15 asks for: cases, and how many expect a library error.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch

from course_lib import cli
from course_lib.data import fashion_mnist
from course_lib.diffusion import formulas, losses
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas, schedule
from course_lib.eval import fid
from course_lib.guidance import (cfg_eps, cfg_scale_to_weight, cfg_weight_to_scale, classifier_grad,
                                 classifier_guided_eps, classifier_guided_mean, dynamic_threshold,
                                 respaced_classifier, static_threshold, threshold, threshold_eps)
from course_lib.nn.classifier import (ClassifierConfig, FashionClassifier, NoisyClassifier,
                                      NoisyClassifierConfig)
from course_lib.nn.unet import UNet, preset
from course_lib.samplers import ddim, dpm_solver, loop, respace
from course_lib.samplers.config import SamplerConfig, run
from course_lib.samplers.ddpm import ddpm_step
from course_lib.training import checkpoints, recipes, trainer
from course_lib.training.checkpoints import CheckpointError
from course_lib.training.ema import EMA

LIBRARY_ERRORS = (ValueError, TypeError, KeyError, CheckpointError, fashion_mnist.DatasetNotFoundError)
NAN, INF = float("nan"), float("inf")


class Case(NamedTuple):
    id: str
    fn: Callable            # fn(env) -> result; env.tmp a fresh folder, env.mp a monkeypatch
    error: type | None      # the library error expected, or None for "a correct result"
    match: str | None       # a regex the message must match
    check: Callable | None  # for error=None: check(result) -> bool


CASES: list[Case] = []


def bad(id, fn, error=ValueError, match=None):
    CASES.append(Case(id, fn, error, match, None))


def ok(id, fn, check):
    CASES.append(Case(id, fn, None, None, check))


# ---------------------------------------------------------------------------- shared small things

S = schedule("cosine", 50)                               # T = 50
X = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
T2 = torch.tensor([3, 7])
META = torch.empty(2, 1, 4, 4, device="meta")


def _finite(x) -> bool:
    return isinstance(x, torch.Tensor) and bool(torch.isfinite(x).all())


_MODELS = {}


def unet(**kw):
    key = ("unet", tuple(sorted(kw.items())))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = UNet(preset("tiny", **kw)).eval()
    return _MODELS[key]


def noisy_classifier():
    if "clf" not in _MODELS:
        torch.manual_seed(0)
        cfg = NoisyClassifierConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(),
                                    head_channels=8, norm_groups=4, num_classes=3)
        _MODELS["clf"] = NoisyClassifier(cfg).eval()
    return _MODELS["clf"]


def fashion_classifier():
    if "fc" not in _MODELS:
        _MODELS["fc"] = FashionClassifier(ClassifierConfig(width=4, feature_dim=8, num_classes=3)).eval()
    return _MODELS["fc"]


def eps_zero(x_t, t, cond=None):
    return torch.zeros_like(x_t)


def eps_learned(x_t, t, cond=None):
    return torch.cat([torch.zeros_like(x_t), torch.zeros_like(x_t)], 1)


XI = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))   # UNet / classifier size
TI = torch.tensor([1, 40])
Y = torch.tensor([0, 2])


# ---------------------------------------------------------------------------- schedules

bad("linear_betas T float", lambda e: linear_betas(10.5), TypeError, "T")
bad("linear_betas T str", lambda e: linear_betas("10"), TypeError, "T")
bad("linear_betas T bool", lambda e: linear_betas(True), TypeError, "T")
bad("linear_betas T 0", lambda e: linear_betas(0), ValueError, "T must be")
bad("linear_betas beta_start nan", lambda e: linear_betas(10, NAN, 0.02), ValueError, "beta_start")
bad("linear_betas beta_end 1", lambda e: linear_betas(10, 1e-4, 1.0), ValueError, "beta_start")
bad("linear_betas beta_end inf", lambda e: linear_betas(10, 1e-4, INF), ValueError, "beta_end")
bad("linear_betas beta_start str", lambda e: linear_betas(10, "a", 0.02), TypeError, "beta_start")
bad("cosine_betas s negative", lambda e: cosine_betas(10, s=-0.5), ValueError, r"s .*\[0.0, 1.0\]")
bad("cosine_betas s nan", lambda e: cosine_betas(10, s=NAN), ValueError, "finite")
bad("cosine_betas max_beta 0", lambda e: cosine_betas(10, max_beta=0.0), ValueError, "max_beta")
bad("cosine_betas max_beta 2", lambda e: cosine_betas(10, max_beta=2.0), ValueError, "max_beta")
bad("cosine_betas T float", lambda e: cosine_betas(12.5), TypeError, "T")
bad("from_betas empty", lambda e: NoiseSchedule.from_betas([]), ValueError, r"\(0, 1\)")
bad("from_betas beta 1", lambda e: NoiseSchedule.from_betas([0.5, 1.0]), ValueError, r"\(0, 1\)")
bad("from_betas beta 0", lambda e: NoiseSchedule.from_betas([0.0, 0.1]), ValueError, r"\(0, 1\)")
bad("from_betas beta above 1", lambda e: NoiseSchedule.from_betas([0.1, 1.5]), ValueError, r"\(0, 1\)")
bad("from_betas nan", lambda e: NoiseSchedule.from_betas([NAN]), ValueError, r"\(0, 1\)")
bad("from_betas inf", lambda e: NoiseSchedule.from_betas([INF]), ValueError, r"\(0, 1\)")
bad("from_betas str", lambda e: NoiseSchedule.from_betas("abc"), TypeError, "betas")
bad("from_alpha_bar increasing", lambda e: NoiseSchedule.from_alpha_bar([0.5, 0.9]), ValueError, "decreasing")
bad("from_alpha_bar of 1", lambda e: NoiseSchedule.from_alpha_bar([1.0, 0.5]), ValueError, r"\(0, 1\)")
bad("schedule unknown name", lambda e: schedule("quadratic"), ValueError, "cosine")
bad("schedule name None", lambda e: schedule(None), ValueError, "cosine")
bad("schedule T 0", lambda e: schedule("linear", 0), ValueError, "T must be")
ok("from_betas nested list is flattened", lambda e: NoiseSchedule.from_betas([[0.1, 0.2]]).T, lambda r: r == 2)

# ---------------------------------------------------------------------------- formulas

bad("q_sample x0 int", lambda e: formulas.q_sample(S, X.long(), T2), TypeError, "floating-point")
bad("q_sample x0 unbatched", lambda e: formulas.q_sample(S, torch.zeros(4), torch.tensor([1] * 4)), ValueError, "batched")
bad("q_sample t float", lambda e: formulas.q_sample(S, X, T2.float()), TypeError, "integer")
bad("q_sample t list", lambda e: formulas.q_sample(S, X, [3, 7]), TypeError, "integer tensor")
bad("q_sample t int", lambda e: formulas.q_sample(S, X, 3), TypeError, "integer tensor")
bad("q_sample t batch", lambda e: formulas.q_sample(S, X, torch.tensor([3])), ValueError, r"shape \(2,\)")
bad("q_sample t = T", lambda e: formulas.q_sample(S, X, torch.tensor([3, 50])), ValueError, r"\[0, 49\]")
bad("q_sample t negative", lambda e: formulas.q_sample(S, X, torch.tensor([-1, 3])), ValueError, r"\[0, 49\]")
bad("q_sample noise shape", lambda e: formulas.q_sample(S, X, T2, X[:1]), ValueError, "noise shape")
bad("q_sample noise int", lambda e: formulas.q_sample(S, X, T2, X.long()), TypeError, "noise")
bad("q_sample noise device", lambda e: formulas.q_sample(S, X, T2, META), ValueError, "device")
bad("q_mean_variance t bool", lambda e: formulas.q_mean_variance(S, X, torch.tensor([True, False])), TypeError, "integer")
bad("q_posterior x_t int", lambda e: formulas.q_posterior(S, X, X.long(), T2), TypeError, "x_t")
bad("q_posterior x_t shape", lambda e: formulas.q_posterior(S, X, X[:, :, :2], T2), ValueError, "x_t shape")
bad("q_posterior t range", lambda e: formulas.q_posterior(S, X, X, torch.tensor([0, 99])), ValueError, r"\[0, 49\]")
bad("x0_from_eps eps 2C", lambda e: formulas.x0_from_eps(S, X, T2, torch.cat([X, X], 1)), ValueError, "split")
bad("x0_from_eps eps batch 1", lambda e: formulas.x0_from_eps(S, X, T2, X[:1]), ValueError, "eps shape")
bad("x0_from_eps eps int", lambda e: formulas.x0_from_eps(S, X, T2, X.long()), TypeError, "eps")
bad("x0_from_eps eps None", lambda e: formulas.x0_from_eps(S, X, T2, None), TypeError, "eps")
bad("x0_from_eps eps device", lambda e: formulas.x0_from_eps(S, X, T2, META), ValueError, "device")
bad("x0_from_eps x_t int", lambda e: formulas.x0_from_eps(S, X.long(), T2, X), TypeError, "x_t")
bad("eps_from_x0 x0 batch 1", lambda e: formulas.eps_from_x0(S, X, T2, X[:1]), ValueError, "x0 shape")
bad("eps_from_x0 x0 more channels", lambda e: formulas.eps_from_x0(S, X, T2, torch.cat([X, X], 1)), ValueError, "x0 shape")
bad("p_mean_from_eps eps 2C", lambda e: formulas.p_mean_from_eps(S, X, T2, torch.cat([X, X], 1)), ValueError, "eps shape")
bad("p_mean_from_eps eps batch 1", lambda e: formulas.p_mean_from_eps(S, X, T2, X[:1]), ValueError, "eps shape")
bad("learned_log_variance t int", lambda e: formulas.learned_log_variance(S, X, 3), TypeError, "integer tensor")
bad("learned_log_variance v int", lambda e: formulas.learned_log_variance(S, X.long(), T2), TypeError, "v")
bad("split_model_output 3C", lambda e: formulas.split_model_output(torch.cat([X, X, X], 1), 1), ValueError, "channels")
bad("split_model_output None", lambda e: formulas.split_model_output(None, 1), TypeError, "floating-point")
bad("simple_loss shapes", lambda e: losses.simple_loss(X, X[:1]), ValueError, "differs")
bad("diffusion_loss 3C output", lambda e: losses.diffusion_loss(S, torch.cat([X] * 3, 1), X, X, T2, X), ValueError, "channels")
ok("q_posterior float64 stays float64", lambda e: formulas.q_posterior(S, X.double(), X.double(), T2)[0].dtype,
   lambda r: r == torch.float64)

# ---------------------------------------------------------------------------- DDPM step

bad("ddpm_step eps 2C", lambda e: ddpm_step(S, X, T2, T2 - 1, torch.cat([X, X], 1)), ValueError, "eps shape")
bad("ddpm_step eps batch 1", lambda e: ddpm_step(S, X, T2, T2 - 1, X[:1]), ValueError, "eps shape")
bad("ddpm_step t batch 3", lambda e: ddpm_step(S, X, torch.tensor([3, 7, 9]), T2 - 1, X), ValueError, r"shape \(2,\)")
bad("ddpm_step t float", lambda e: ddpm_step(S, X, T2.float(), T2 - 1, X), TypeError, "integer")
bad("ddpm_step t int", lambda e: ddpm_step(S, X, 3, T2 - 1, X), TypeError, "integer tensor")
bad("ddpm_step skips a step", lambda e: ddpm_step(S, X, T2, T2 - 2, X), ValueError, "one step at a time")
bad("ddpm_step v channels", lambda e: ddpm_step(S, X, T2, T2 - 1, X, variance="learned", v=torch.cat([X, X], 1)),
    ValueError, "v shape")
bad("ddpm_step v batch", lambda e: ddpm_step(S, X, T2, T2 - 1, X, variance="learned", v=X[:1]), ValueError, "v shape")
bad("ddpm_step learned without v", lambda e: ddpm_step(S, X, T2, T2 - 1, X, variance="learned"), ValueError, "learn")
bad("ddpm_step unknown variance", lambda e: ddpm_step(S, X, T2, T2 - 1, X, variance="medium"), ValueError, "unknown variance")
bad("ddpm_step noise shape", lambda e: ddpm_step(S, X, T2, T2 - 1, X, noise=X[:1]), ValueError, "noise shape")
bad("ddpm_step noise int", lambda e: ddpm_step(S, X, T2, T2 - 1, X, noise=X.long()), TypeError, "noise")
bad("ddpm_step x_t int", lambda e: ddpm_step(S, X.long(), T2, T2 - 1, X), TypeError, "x_t")

# ---------------------------------------------------------------------------- DDIM

bad("ddim_step eta nan", lambda e: ddim.ddim_step(S, X, T2, T2 - 1, X, eta=NAN), ValueError, "eta")
bad("ddim_step eta inf", lambda e: ddim.ddim_step(S, X, T2, T2 - 1, X, eta=INF), ValueError, "eta")
bad("ddim_step eta negative", lambda e: ddim.ddim_step(S, X, T2, T2 - 1, X, eta=-1.0), ValueError, "eta must be >= 0")
bad("ddim_step eta str", lambda e: ddim.ddim_step(S, X, T2, T2 - 1, X, eta="0.5"), TypeError, "eta")
bad("ddim_step eta too large", lambda e: ddim.ddim_step(S, X, T2, torch.tensor([0, 2]), X, eta=50.0), ValueError, "eta")
bad("ddim_step eps 2C", lambda e: ddim.ddim_step(S, X, T2, T2 - 1, torch.cat([X, X], 1)), ValueError, "split")
bad("ddim_step eps device", lambda e: ddim.ddim_step(S, X, T2, T2 - 1, META), ValueError, "device")
bad("ddim_step t_prev after t", lambda e: ddim.ddim_step(S, X, T2, T2, X), ValueError, "t_prev < t")
bad("ddim_step t_prev -2", lambda e: ddim.ddim_step(S, X, T2, torch.tensor([-2, 0]), X), ValueError, r"\[-1, 49\]")
bad("ddim_step noise shape", lambda e: ddim.ddim_step(S, X, T2, T2 - 1, X, eta=1.0, noise=X[:1]), ValueError, "noise shape")
bad("ddim_step x_t int", lambda e: ddim.ddim_step(S, X.long(), T2, T2 - 1, X), TypeError, "x_t")
bad("ddim_sigma eta nan", lambda e: ddim.ddim_sigma(0.5, 0.9, NAN), ValueError, "eta")
bad("timesteps n float", lambda e: ddim.timesteps(100, 10.5), TypeError, "n ")
bad("timesteps T str", lambda e: ddim.timesteps("100", 10), TypeError, "T")
bad("timesteps n 0", lambda e: ddim.timesteps(100, 0), ValueError, "n <= T")
bad("timesteps n > T", lambda e: ddim.timesteps(100, 101), ValueError, "n <= T")
bad("timesteps spacing", lambda e: ddim.timesteps(100, 10, "uniform"), ValueError, "unknown spacing")
bad("timesteps offset negative", lambda e: ddim.timesteps(100, 10, offset=-1), ValueError, "offset")
bad("timesteps offset float", lambda e: ddim.timesteps(100, 10, offset=1.5), TypeError, "offset")
bad("invert x0 int", lambda e: ddim.invert(eps_zero, S, X.long(), [0, 10], progress=False), TypeError, "floating-point")
bad("invert fractional timesteps", lambda e: ddim.invert(eps_zero, S, X, [0.9, 1.7], progress=False), ValueError, "whole numbers")
bad("invert timesteps past T", lambda e: ddim.invert(eps_zero, S, X, [0, 60], progress=False), ValueError, r"\[0, 49\]")
bad("invert timesteps empty", lambda e: ddim.invert(eps_zero, S, X, [], progress=False), ValueError, "empty")
bad("reconstruct x_T int", lambda e: ddim.reconstruct(eps_zero, S, X.long(), [0, 10], progress=False), TypeError, "x_T")
bad("ddim_invert_step backwards", lambda e: ddim.ddim_invert_step(S, X, T2, T2 - 1, X), ValueError, "t < t_next")
bad("slerp zero vector", lambda e: ddim.slerp(torch.zeros(2, 4), torch.ones(2, 4), 0.5), ValueError, "zero vector")
bad("slerp shapes", lambda e: ddim.slerp(torch.ones(2, 4), torch.ones(2, 5), 0.5), ValueError, "one shape")
bad("slerp opposite", lambda e: ddim.slerp(torch.ones(1, 4), -torch.ones(1, 4), 0.5), ValueError, "opposite")
bad("slerp alpha nan", lambda e: ddim.slerp(torch.ones(2, 4), torch.rand(2, 4) + 1, NAN), ValueError, "alpha")
bad("slerp alpha batch", lambda e: ddim.slerp(torch.ones(2, 4), torch.rand(2, 4) + 1, torch.rand(3)), ValueError, "alpha")
bad("slerp int", lambda e: ddim.slerp(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), 0.5),
    TypeError, "floating-point")
bad("slerp nan input", lambda e: ddim.slerp(torch.full((2, 4), NAN), torch.ones(2, 4), 0.5), ValueError, "finite")
bad("slerp device", lambda e: ddim.slerp(torch.ones(2, 4), torch.ones(2, 4, device="meta"), 0.5), ValueError, "device")

# ---------------------------------------------------------------------------- DPM-Solver++ and Karras

bad("karras rho nan", lambda e: dpm_solver.karras_sigmas(10, 0.01, 80.0, rho=NAN), ValueError, "rho")
bad("karras rho 0", lambda e: dpm_solver.karras_sigmas(10, 0.01, 80.0, rho=0.0), ValueError, "rho")
bad("karras rho inf", lambda e: dpm_solver.karras_sigmas(10, 0.01, 80.0, rho=INF), ValueError, "rho")
bad("karras sigma_max inf", lambda e: dpm_solver.karras_sigmas(10, 0.01, INF), ValueError, "sigma_max")
bad("karras sigma_min nan", lambda e: dpm_solver.karras_sigmas(10, NAN, 80.0), ValueError, "sigma_min")
bad("karras sigma_min 0", lambda e: dpm_solver.karras_sigmas(10, 0.0, 80.0), ValueError, "sigma_min")
bad("karras n float", lambda e: dpm_solver.karras_sigmas(2.5, 0.01, 80.0), TypeError, "n")
bad("karras n 0", lambda e: dpm_solver.karras_sigmas(0, 0.01, 80.0), ValueError, "n >= 1")
bad("karras_timesteps rho nan", lambda e: dpm_solver.karras_timesteps(S, 10, rho=NAN), ValueError, "rho")
bad("karras_schedule sigma_max inf", lambda e: dpm_solver.karras_schedule(S, 10, sigma_max=INF), ValueError, "sigma_max")
bad("sigmas_to_timesteps nan", lambda e: dpm_solver.sigmas_to_timesteps(S, [NAN]), ValueError, "finite")
bad("sigmas_to_timesteps negative", lambda e: dpm_solver.sigmas_to_timesteps(S, [-1.0]), ValueError, ">= 0")
bad("DPMSolverPP2M eta", lambda e: dpm_solver.DPMSolverPP2M().step(S, X, T2, T2 - 1, X, eta=0.5), ValueError, "eta must be 0")
bad("DPMSolverPP2M eps shape", lambda e: dpm_solver.DPMSolverPP2M().step(S, X, T2, T2 - 1, X[:1]), ValueError, "eps shape")
bad("DPMSolverPP2M x_t int", lambda e: dpm_solver.DPMSolverPP2M().step(S, X.long(), T2, T2 - 1, X), TypeError, "x_t")

# ---------------------------------------------------------------------------- respacing

bad("respace fractional", lambda e: respace.respace(S, [0.9, 1.7]), ValueError, "whole numbers")
bad("respace empty", lambda e: respace.respace(S, []), ValueError, "non-empty")
bad("respace past T", lambda e: respace.respace(S, [0, 60]), ValueError, "subset")
bad("respace decreasing", lambda e: respace.respace(S, [3, 2]), ValueError, "increasing")
bad("respace str", lambda e: respace.respace(S, ["a"]), TypeError, "integers")
bad("respace bool", lambda e: respace.respace(S, [True, False]), TypeError, "integers")
bad("even_timesteps K float", lambda e: respace.even_timesteps(50, 2.5), TypeError, "K")
bad("even_timesteps K 0", lambda e: respace.even_timesteps(50, 0), ValueError, "K <= T")
bad("even_timesteps K > T", lambda e: respace.even_timesteps(50, 51), ValueError, "K <= T")
bad("respaced_model int t", lambda e: respace.respaced_model(eps_zero, torch.tensor([0, 10]))(X, 1), TypeError, "integer tensor")
bad("respaced_model float t", lambda e: respace.respaced_model(eps_zero, torch.tensor([0, 10]))(X, torch.tensor([0.0, 1.0])),
    TypeError, "integer tensor")
bad("respaced_model t out of range", lambda e: respace.respaced_model(eps_zero, torch.tensor([0, 10]))(X, torch.tensor([0, 2])),
    ValueError, r"\[0, 1\]")

# ---------------------------------------------------------------------------- SamplerConfig and run

bad("SamplerConfig steps float", lambda e: SamplerConfig(steps=2.5), TypeError, "steps")
bad("SamplerConfig steps str", lambda e: SamplerConfig(steps="abc"), TypeError, "steps")
bad("SamplerConfig steps 0", lambda e: SamplerConfig(steps=0), ValueError, "at least one")
bad("SamplerConfig eta negative", lambda e: SamplerConfig(eta=-1), ValueError, "eta must be >= 0")
bad("SamplerConfig eta nan", lambda e: SamplerConfig(eta=NAN), ValueError, "eta")
bad("SamplerConfig eta on ddpm", lambda e: SamplerConfig("ddpm", eta=1.0), ValueError, "eta = 0 only")
bad("SamplerConfig method", lambda e: SamplerConfig("euler"), ValueError, "unknown method")
bad("SamplerConfig spacing", lambda e: SamplerConfig(spacing="quadratic"), ValueError, "unknown spacing")
bad("SamplerConfig variance", lambda e: SamplerConfig("ddpm", variance="medium"), ValueError, "unknown variance")
bad("SamplerConfig rho nan", lambda e: SamplerConfig(spacing="karras", rho=NAN), ValueError, "rho")
bad("SamplerConfig sigma_max inf", lambda e: SamplerConfig(spacing="karras", sigma_max=INF), ValueError, "sigma_max")
bad("SamplerConfig clip_x0 str", lambda e: SamplerConfig(clip_x0="yes"), TypeError, "clip_x0")
bad("run x_T int", lambda e: run(SamplerConfig(steps=2), eps_zero, S, X.long()), TypeError, "floating-point")
bad("run eps_fn wrong shape", lambda e: run(SamplerConfig(steps=2), lambda x, t, c: x[:1], S, X), ValueError, "eps shape")
bad("loop.sample empty timesteps", lambda e: loop.sample(eps_zero, S, X.shape, timesteps=[], progress=False),
    ValueError, "empty")

# ---------------------------------------------------------------------------- classifier-free guidance

bad("cfg_weight_to_scale nan", lambda e: cfg_weight_to_scale(NAN), ValueError, "w must be")
bad("cfg_weight_to_scale inf", lambda e: cfg_weight_to_scale(INF), ValueError, "w must be")
bad("cfg_weight_to_scale below -1", lambda e: cfg_weight_to_scale(-2.0), ValueError, ">= -1")
bad("cfg_weight_to_scale str", lambda e: cfg_weight_to_scale("1"), TypeError, "real number")
bad("cfg_scale_to_weight nan", lambda e: cfg_scale_to_weight(NAN), ValueError, "finite")
bad("cfg_eps scale nan", lambda e: cfg_eps(eps_zero, NAN, 10), ValueError, "finite")
bad("cfg_eps scale negative", lambda e: cfg_eps(eps_zero, -1.0, 10), ValueError, ">= 0")
bad("cfg_eps null_class float", lambda e: cfg_eps(eps_zero, 1.0, 2.5), TypeError, "null_class")
bad("cfg_eps null_class negative", lambda e: cfg_eps(eps_zero, 1.0, -1), ValueError, "null_class")
_CFG = lambda: cfg_eps(eps_zero, 3.0, 3)   # noqa: E731
bad("cfg_eps cond None", lambda e: _CFG()(X, T2, None), ValueError, "needs class labels")
bad("cfg_eps cond float", lambda e: _CFG()(X, T2, Y.float()), TypeError, "integer")
bad("cfg_eps cond list", lambda e: _CFG()(X, T2, [0, 1]), TypeError, "tensor of class labels")
bad("cfg_eps cond shape", lambda e: _CFG()(X, T2, torch.tensor([0, 1, 2])), ValueError, r"shape \(2,\)")
bad("cfg_eps cond negative", lambda e: _CFG()(X, T2, torch.tensor([-1, 0])), ValueError, ">= 0")
bad("cfg_eps cond above null", lambda e: _CFG()(X, T2, torch.tensor([0, 4])), ValueError, "above null_class")
bad("cfg_eps cond device", lambda e: _CFG()(X, T2, torch.tensor([0, 1], device="meta")), ValueError, "device")
bad("cfg_eps t float", lambda e: _CFG()(X, T2.float(), Y), TypeError, "integer tensor")
bad("cfg_eps t int", lambda e: _CFG()(X, 3, Y), TypeError, "integer tensor")
bad("cfg_eps t shape", lambda e: _CFG()(X, torch.tensor([1]), Y), ValueError, r"shape \(2,\)")
bad("cfg_eps t negative", lambda e: _CFG()(X, torch.tensor([-1, 2]), Y), ValueError, ">= 0")
bad("cfg_eps x_t int", lambda e: _CFG()(X.long(), T2, Y), TypeError, "x_t")
bad("cfg_eps model batch", lambda e: cfg_eps(lambda x, t, c: x[:1], 3.0, 3)(X, T2, Y), ValueError, "batch of 1")
bad("cfg_eps UNet dtype", lambda e: cfg_eps(unet(num_classes=3), 2.0, 3)(XI.double(), TI, Y), TypeError, "float64")
bad("cfg_eps UNet t past the model", lambda e: cfg_eps(unet(num_classes=3), 2.0, 3)(XI, torch.tensor([-3, 1]), Y),
    ValueError, ">= 0")

# ---------------------------------------------------------------------------- classifier guidance

_clf = lambda: noisy_classifier()   # noqa: E731
XC = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
bad("classifier_grad y None", lambda e: classifier_grad(_clf(), XC, TI, None), ValueError, "needs class labels")
bad("classifier_grad y float", lambda e: classifier_grad(_clf(), XC, TI, Y.float()), TypeError, "integer")
bad("classifier_grad y shape", lambda e: classifier_grad(_clf(), XC, TI, torch.tensor([0])), ValueError, r"shape \(2,\)")
bad("classifier_grad y out of range", lambda e: classifier_grad(_clf(), XC, TI, torch.tensor([0, 3])), ValueError, "out of range")
bad("classifier_grad x_t int", lambda e: classifier_grad(_clf(), XC.long(), TI, Y), TypeError, "x_t")
bad("classifier_grad dtype", lambda e: classifier_grad(_clf(), XC.double(), TI, Y), TypeError, "float64")
bad("classifier_grad t float", lambda e: classifier_grad(_clf(), XC, TI.float(), Y), TypeError, "integer")
bad("classifier_grad t negative", lambda e: classifier_grad(_clf(), XC, torch.tensor([-1, 0]), Y), ValueError, ">= 0")
bad("classifier_grad x_t device", lambda e: classifier_grad(_clf(), XC.to("meta"), TI, Y),
    ValueError, "device")
bad("classifier_grad inference mode", lambda e: _in_inference(lambda: classifier_grad(_clf(), XC, TI, Y)),
    RuntimeError, "no_grad")
ok("classifier_grad empty batch", lambda e: classifier_grad(_clf(), XC[:0], TI[:0], Y[:0]),
   lambda r: r.shape == (0, 1, 28, 28))
bad("classifier_guided_eps scale nan", lambda e: classifier_guided_eps(eps_zero, _clf(), S, NAN), ValueError, "finite")
bad("classifier_guided_eps scale str", lambda e: classifier_guided_eps(eps_zero, _clf(), S, "2"), TypeError, "real number")
bad("classifier_guided_eps t past T", lambda e: classifier_guided_eps(eps_zero, _clf(), S, 1.0)(XC, torch.tensor([0, 50]), Y),
    ValueError, r"\[0, 49\]")
bad("classifier_guided_eps t int", lambda e: classifier_guided_eps(eps_zero, _clf(), S, 1.0)(XC, 3, Y), TypeError, "integer tensor")
bad("classifier_guided_eps cond None", lambda e: classifier_guided_eps(eps_zero, _clf(), S, 1.0)(XC, TI, None),
    ValueError, "needs class labels")
bad("classifier_guided_mean variance", lambda e: classifier_guided_mean(eps_zero, _clf(), S, 1.0, variance="medium"),
    ValueError, "unknown variance")
bad("classifier_guided_mean scale inf", lambda e: classifier_guided_mean(eps_zero, _clf(), S, INF), ValueError, "finite")
bad("classifier_guided_mean learned without v", lambda e: classifier_guided_mean(eps_zero, _clf(), S, 1.0,
                                                                                 variance="learned")(XC, TI, Y),
    ValueError, "learned")
bad("respaced_classifier int t", lambda e: respaced_classifier(_clf(), [0, 10])(XC, 1), TypeError, "integer tensor")
bad("respaced_classifier t out of range", lambda e: respaced_classifier(_clf(), [0, 10])(XC, torch.tensor([0, 5])),
    ValueError, r"\[0, 1\]")


def _in_inference(fn):
    with torch.inference_mode():
        return fn()


# ---------------------------------------------------------------------------- thresholding

bad("dynamic_threshold percentile 0", lambda e: dynamic_threshold(X, 0.0), ValueError, "fraction")
bad("dynamic_threshold percentile 1.5", lambda e: dynamic_threshold(X, 1.5), ValueError, "fraction")
bad("dynamic_threshold percentile nan", lambda e: dynamic_threshold(X, NAN), ValueError, "fraction")
bad("dynamic_threshold percentile str", lambda e: dynamic_threshold(X, "p"), TypeError, "percentile")
bad("dynamic_threshold x0 int", lambda e: dynamic_threshold(X.long()), TypeError, "x0")
bad("dynamic_threshold x0 unbatched", lambda e: dynamic_threshold(torch.ones(3)), ValueError, "batched")
ok("dynamic_threshold empty batch", lambda e: dynamic_threshold(X[:0]), lambda r: r.shape == (0, 1, 4, 4))
bad("static_threshold int", lambda e: static_threshold(X.long()), TypeError, "x0")
bad("threshold method", lambda e: threshold(X, "soft"), ValueError, "unknown thresholding method")
bad("threshold_eps method", lambda e: threshold_eps(eps_zero, S, "soft"), ValueError, "unknown thresholding method")
bad("threshold_eps t past T", lambda e: threshold_eps(eps_zero, S)(X, torch.tensor([0, 50])), ValueError, r"\[0, 49\]")
bad("threshold_eps x_t int", lambda e: threshold_eps(eps_zero, S)(X.long(), T2), TypeError, "x_t")
bad("threshold_eps model output 3C", lambda e: threshold_eps(lambda x, t, c: torch.cat([x] * 3, 1), S)(X, T2),
    ValueError, "channels")

# ---------------------------------------------------------------------------- the UNet

bad("UNet channels", lambda e: unet()(torch.randn(2, 3, 28, 28), TI), ValueError, r"\(B, 1, H, W\)")
bad("UNet 3-D x_t", lambda e: unet()(torch.randn(2, 28, 28), TI), ValueError, r"\(B, 1, H, W\)")
bad("UNet x_t list", lambda e: unet()([[0.0]], TI), TypeError, "x_t must be a tensor")
bad("UNet x_t int", lambda e: unet()(XI.long(), TI), TypeError, "floating-point")
bad("UNet x_t float64", lambda e: unet()(XI.double(), TI), TypeError, "float64")
bad("UNet x_t bf16", lambda e: unet()(XI.bfloat16(), TI), TypeError, "bfloat16")
bad("UNet x_t device", lambda e: unet()(XI.to("meta"), TI.to("meta")), ValueError, "device")
bad("UNet empty batch", lambda e: unet()(XI[:0], TI[:0]), ValueError, "empty batch")
bad("UNet empty batch with y", lambda e: unet(num_classes=3)(XI[:0], TI[:0], Y[:0]), ValueError, "empty batch")
bad("UNet size", lambda e: unet()(torch.randn(2, 1, 27, 27), TI), ValueError, "divisible by 2")
bad("UNet t float", lambda e: unet()(XI, TI.float()), TypeError, "integer")
bad("UNet t fractional", lambda e: unet()(XI, torch.tensor([0.5, 1.5])), TypeError, "integer")
bad("UNet t negative", lambda e: unet()(XI, torch.tensor([-1, 3])), ValueError, ">= 0")
bad("UNet t shape", lambda e: unet()(XI, torch.tensor([1, 2, 3])), ValueError, r"shape \(2,\)")
bad("UNet t list", lambda e: unet()(XI, [1, 2]), ValueError, "t must be a tensor")
bad("UNet t device", lambda e: unet()(XI, TI.to("meta")), ValueError, "device")
bad("UNet y list", lambda e: unet(num_classes=3)(XI, TI, [1, 2]), TypeError, "tensor of integer class indices")
bad("UNet y float", lambda e: unet(num_classes=3)(XI, TI, Y.float()), ValueError, "integer class indices")
bad("UNet y bool", lambda e: unet(num_classes=3)(XI, TI, torch.tensor([True, False])), ValueError, "integer class indices")
bad("UNet y range", lambda e: unet(num_classes=3)(XI, TI, torch.tensor([0, 4])), ValueError, r"\[0, 3\]")
bad("UNet y negative", lambda e: unet(num_classes=3)(XI, TI, torch.tensor([-1, 0])), ValueError, r"\[0, 3\]")
bad("UNet y shape", lambda e: unet(num_classes=3)(XI, TI, torch.tensor([0, 1, 2])), ValueError, "integer class indices")
bad("UNet y to unconditional", lambda e: unet()(XI, TI, Y), ValueError, "unconditional")
bad("UNet context to a model without", lambda e: unet()(XI, TI, context=torch.randn(2, 3, 8)), ValueError, "no context")
bad("UNet context width", lambda e: unet(context_dim=8)(XI, TI, context=torch.randn(2, 3, 5)), ValueError, r"\(2, L, 8\)")
bad("UNet context int", lambda e: unet(context_dim=8)(XI, TI, context=torch.ones(2, 3, 8, dtype=torch.long)),
    TypeError, "context")
bad("UNet context_mask shape", lambda e: unet(context_dim=8)(XI, TI, context=torch.randn(2, 3, 8),
                                                             context_mask=torch.ones(2, 4, dtype=torch.bool)),
    ValueError, "context_mask")
bad("UNet preset", lambda e: preset("huge"), ValueError, "unknown UNet preset")
ok("UNet under autocast takes fp32 input", lambda e: _autocast(lambda: unet()(XI, TI)),
   lambda r: r.shape == XI.shape and _finite(r.float()))


def _autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


# ---------------------------------------------------------------------------- the classifiers

bad("FashionClassifier shape", lambda e: fashion_classifier()(torch.zeros(2, 1, 32, 32)), ValueError, r"\(B, 1, 28, 28\)")
bad("FashionClassifier unbatched", lambda e: fashion_classifier()(torch.zeros(1, 28, 28)), ValueError, r"\(B, 1, 28, 28\)")
bad("FashionClassifier int", lambda e: fashion_classifier()(torch.zeros(2, 1, 28, 28, dtype=torch.long)), TypeError, "floating")
bad("FashionClassifier float64", lambda e: fashion_classifier()(torch.zeros(2, 1, 28, 28, dtype=torch.float64)),
    TypeError, "float64")
bad("FashionClassifier empty", lambda e: fashion_classifier()(torch.zeros(0, 1, 28, 28)), ValueError, "empty batch")
bad("NoisyClassifier shape", lambda e: _clf()(torch.zeros(2, 1, 32, 32), TI), ValueError, r"\(B, 1, 28, 28\)")
bad("NoisyClassifier t list", lambda e: _clf()(XC, [1, 2]), ValueError, "t must be a tensor")
bad("NoisyClassifier t float", lambda e: _clf()(XC, TI.float()), TypeError, "integer")
bad("NoisyClassifier float64", lambda e: _clf()(XC.double(), TI), TypeError, "float64")

# ---------------------------------------------------------------------------- FID

bad("fid statistics NaN", lambda e: fid.statistics(torch.tensor([[0.0, NAN], [1.0, 2.0], [3.0, 4.0]])), ValueError, "NaN")
bad("fid statistics one sample", lambda e: fid.statistics(torch.zeros(1, 4)), ValueError, "N >= 2")
bad("fid statistics 1-D", lambda e: fid.statistics(torch.zeros(8)), ValueError, r"\(N, D\)")
bad("fid statistics list", lambda e: fid.statistics([[0.0, 1.0]]), TypeError, "tensor")
bad("fid of features of different sizes", lambda e: fid.fid_from_features(torch.randn(10, 4), torch.randn(10, 5)),
    ValueError, "different sizes")
bad("frechet_distance inf", lambda e: fid.frechet_distance(torch.zeros(2), torch.eye(2) * INF, torch.zeros(2), torch.eye(2)),
    ValueError, "finite")
bad("frechet_distance covariance shape", lambda e: fid.frechet_distance(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2)),
    ValueError, r"\(D, D\)")


# ---------------------------------------------------------------------------- checkpoints and cards

NAME = "tiny_ddpm"


def _tiny_model():
    return recipes.get(NAME).build_model()


def _shipped(e):
    """A fake shipped checkpoint in env.tmp, which becomes CHECKPOINT_DIR."""
    e.mp.setattr(checkpoints, "CHECKPOINT_DIR", e.tmp)
    path = e.tmp / f"{NAME}.safetensors"
    checkpoints.save_pair(path, _tiny_model(), {"name": NAME})
    return path


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _then(first, second):
    first()
    return second()


bad("load_pretrained unknown", lambda e: checkpoints.load_pretrained("nosuch"), KeyError, "known")
bad("load_pretrained no card", lambda e: _then(lambda: e.mp.setattr(checkpoints, "CHECKPOINT_DIR", e.tmp),
                                               lambda: checkpoints.load_pretrained(NAME)), CheckpointError, "not been built")
bad("load_pretrained malformed card", lambda e: _then(lambda: (_shipped(e), (e.tmp / f"{NAME}.json").write_text("{oops")),
                                                      lambda: checkpoints.load_pretrained(NAME)),
    CheckpointError, f"not valid JSON.*course train {NAME}")
bad("load_pretrained card is a list", lambda e: _then(lambda: (_shipped(e), (e.tmp / f"{NAME}.json").write_text("[1]")),
                                                      lambda: checkpoints.load_pretrained(NAME)), CheckpointError, "JSON object")
bad("load_pretrained folder for the weights", lambda e: _then(
    lambda: (_shipped(e), (e.tmp / f"{NAME}.safetensors").unlink(), (e.tmp / f"{NAME}.safetensors").mkdir()),
    lambda: checkpoints.load_pretrained(NAME)), CheckpointError, "folder")
bad("load_pretrained flipped byte", lambda e: _then(lambda: _flip_byte(_shipped(e)),
                                                    lambda: checkpoints.load_pretrained(NAME)), CheckpointError, "sha256")
bad("load_pretrained truncated", lambda e: _then(lambda: _shipped(e).write_bytes(b"12345678"),
                                                 lambda: checkpoints.load_pretrained(NAME)), CheckpointError, "damaged")
bad("save_checkpoint card list", lambda e: checkpoints.save_checkpoint(e.tmp / "m.safetensors", _tiny_model(), [1, 2]),
    TypeError, "card must be a dict")
bad("save_checkpoint card nan", lambda e: checkpoints.save_checkpoint(e.tmp / "m.safetensors", _tiny_model(), {"a": NAN}),
    TypeError, "JSON")
bad("save_checkpoint empty path", lambda e: checkpoints.save_checkpoint("", _tiny_model()), ValueError, "non-empty")
bad("save_checkpoint folder path", lambda e: checkpoints.save_checkpoint(e.tmp, _tiny_model()), CheckpointError, "folder")
bad("save_checkpoint not a model", lambda e: checkpoints.save_checkpoint(e.tmp / "m.safetensors", {"w": 1}), TypeError, "Module")
bad("save_pair card list", lambda e: checkpoints.save_pair(e.tmp / "m.safetensors", _tiny_model(), [1]), TypeError, "card")
bad("write_card str", lambda e: checkpoints.write_card(e.tmp / "m.json", "card"), TypeError, "card must be a dict")
bad("load_weights missing names the recipe", lambda e: checkpoints.load_weights(_tiny_model(), e.tmp / f"{NAME}.safetensors"),
    CheckpointError, f"missing.*course train {NAME}")
bad("load_weights missing, not a recipe", lambda e: checkpoints.load_weights(_tiny_model(), e.tmp / "m.safetensors"),
    CheckpointError, "save_checkpoint")
bad("load_weights wrong model", lambda e: _then(
    lambda: checkpoints.save_checkpoint(e.tmp / "m.safetensors", recipes.get("fashion_classifier").build_model()),
    lambda: checkpoints.load_weights(_tiny_model(), e.tmp / "m.safetensors")), CheckpointError, "does not fit")
bad("load_training_state damaged", lambda e: _then(lambda: (e.tmp / "s.safetensors").write_bytes(b"junk" * 4),
                                                   lambda: _load_state(e.tmp / "s.safetensors")),
    CheckpointError, "damaged.*Delete it")
bad("check_out_dir empty", lambda e: checkpoints.check_out_dir(""), ValueError, "non-empty")
bad("check_out_dir a file", lambda e: _then(lambda: (e.tmp / "f").write_text("x"),
                                            lambda: checkpoints.check_out_dir(e.tmp / "f")), ValueError, "not a folder")
ok("save_checkpoint gives the usual file mode", lambda e: _mode_after_save(e.tmp),
   lambda r: r == (0o666 & ~_umask()))
ok("a dead writer's temporary is removed by the next save", lambda e: _stale_tmp_cleanup(e.tmp), lambda r: r == [])


def _load_state(path):
    model = _tiny_model()
    return checkpoints.load_training_state(path, model=model, ema=EMA(model),
                                           optimizer=torch.optim.AdamW(model.parameters()))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_after_save(tmp):
    path = tmp / "m.safetensors"
    checkpoints.save_checkpoint(path, _tiny_model())
    return path.stat().st_mode & 0o777


def _stale_tmp_cleanup(tmp):
    dead = 2 ** 22 + 12345   # above the default pid_max: no such process
    (tmp / f"m.safetensors.{dead}.abc.tmp").write_bytes(b"half")
    checkpoints.save_checkpoint(tmp / "m.safetensors", _tiny_model())
    return sorted(p.name for p in tmp.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------- training

def _recipe(**kw):
    return dataclasses.replace(recipes.get(NAME), **({"steps": 2, "batch_size": 2, "checkpoint_every": 1,
                                                      "warmup": 1} | kw))


def _data(n=4, nan=False):
    images = torch.zeros(n, 1, 28, 28)
    if nan:
        images[:] = NAN
    return images, torch.zeros(n, dtype=torch.long)


def _train(e, **kw):
    return trainer.train(_recipe(), kw.pop("out", e.tmp), data=kw.pop("data", _data()), progress=False, **kw)


bad("train steps float", lambda e: _train(e, steps=2.5), ValueError, "steps must be >= 0")
bad("train steps str", lambda e: _train(e, steps="2"), ValueError, "steps must be >= 0")
bad("train steps negative", lambda e: _train(e, steps=-1), ValueError, "steps must be >= 0")
bad("train out empty", lambda e: _train(e, out=""), ValueError, "non-empty")
bad("train out a file", lambda e: _then(lambda: (e.tmp / "f").write_text("x"), lambda: _train(e, out=e.tmp / "f")),
    ValueError, "not a folder")
bad("train empty data", lambda e: _train(e, data=_data(0)), ValueError, "non-empty")
bad("train images and labels differ", lambda e: _train(e, data=(torch.zeros(4, 1, 28, 28), torch.zeros(3, dtype=torch.long))),
    ValueError, "one length")
bad("train NaN data stops at step 0", lambda e: _train(e, data=_data(nan=True)), ValueError, "at step 0")
bad("train resume with fewer steps", lambda e: _then(lambda: _train(e, steps=2), lambda: _train(e, steps=1)),
    ValueError, "already at step 2")


# ---------------------------------------------------------------------------- data

def _env(e, value):
    e.mp.setenv("COURSE_DATA_DIR", str(value))
    return value


def _bad_gz(e, content: bytes):
    folder = _env(e, e.tmp / "data")
    folder.mkdir()
    for name in fashion_mnist.FILES["test"]:
        (folder / name).write_bytes(content)
    return fashion_mnist.load("test", download=False)


bad("load split", lambda e: fashion_mnist.load("val"), ValueError, "'train' or 'test'")
bad("load limit negative", lambda e: fashion_mnist.load("test", limit=-5), ValueError, "limit")
bad("load limit float", lambda e: fashion_mnist.load("test", limit=2.5), ValueError, "limit")
bad("load COURSE_DATA_DIR empty", lambda e: _then(lambda: _env(e, e.tmp), lambda: fashion_mnist.load("test", download=False)),
    fashion_mnist.DatasetNotFoundError, "COURSE_DATA_DIR=.* holds no")
bad("load COURSE_DATA_DIR missing", lambda e: _then(lambda: _env(e, e.tmp / "nowhere"),
                                                    lambda: fashion_mnist.load("test", download=False)),
    fashion_mnist.DatasetNotFoundError, "COURSE_DATA_DIR")
bad("load not gzip", lambda e: _bad_gz(e, b"not gzip at all"), ValueError, "t10k-.*not a readable .gz")
bad("load short gz", lambda e: _bad_gz(e, gzip.compress(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\0" * 10)),
    ValueError, "t10k-.*needs")
bad("load truncated gz", lambda e: _bad_gz(e, gzip.compress(b"\0" * 1000)[:20]), ValueError, "t10k-.*not a readable")


def _failed_download_leaves_nothing(e):
    root = _env(e, e.tmp / "cache" / "fm")
    e.mp.setattr(fashion_mnist, "_torchvision", lambda split, r: (Path(r, "FashionMNIST", "raw").mkdir(parents=True),
                                                                  1 / 0))
    with pytest.raises(fashion_mnist.DatasetNotFoundError):
        fashion_mnist.load("test")
    return root.exists()


ok("a failed download leaves no empty folder", _failed_download_leaves_nothing, lambda r: r is False)


# ---------------------------------------------------------------------------- the course command

def _course(e, *argv):
    """(exit status, stderr) of `course ARGV`."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(argv))
        except SystemExit as exc:   # argparse's usage errors
            rc = exc.code
    return rc, err.getvalue()


def _course_ok(match):
    import re
    return lambda r: r[0] == 2 and re.search(match, r[1]) is not None


ok("course train unknown recipe", lambda e: _course(e, "train", "nosuch"), _course_ok("course: .*known"))
ok("course train --steps float", lambda e: _course(e, "train", NAME, "--steps", "2.5"), _course_ok("invalid int"))
ok("course train --out empty", lambda e: _course(e, "train", NAME, "--out", ""), _course_ok("course: .*non-empty"))
ok("course train --out a file", lambda e: _then(lambda: (e.tmp / "f").write_text("x"),
                                                lambda: _course(e, "train", NAME, "--out", str(e.tmp / "f"))),
   _course_ok("course: .*not a folder"))
ok("course train keeps a shipped checkpoint", lambda e: _then(lambda: _shipped(e), lambda: _course(e, "train", NAME)),
   _course_ok("course: .*shipped.*--force"))
ok("course evaluate missing", lambda e: _course(e, "evaluate", NAME, "--out", str(e.tmp)),
   _course_ok(f"course: .*missing.*course train {NAME}"))
ok("course evaluate flipped byte", lambda e: _then(lambda: _flip_byte(_shipped(e)),
                                                   lambda: _course(e, "evaluate", NAME, "--out", str(e.tmp))),
   _course_ok("course: .*sha256"))
ok("course evaluate without a card", lambda e: _then(lambda: (_shipped(e), (e.tmp / f"{NAME}.json").unlink()),
                                                     lambda: _course(e, "evaluate", NAME, "--out", str(e.tmp))),
   _course_ok("course: .*no card"))


# ---------------------------------------------------------------------------- the test

@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    return SimpleNamespace(tmp=tmp_path, mp=monkeypatch)


def _raised_in_library(info) -> bool:
    """The exception was raised by course_lib code (the innermost frame), not inside torch or numpy."""
    return "course_lib" in str(info.traceback[-1].path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env):
    if case.error is None:
        result = case.fn(env)
        assert case.check(result), f"{case.id}: unexpected result {result!r}"
        return
    with pytest.raises(case.error, match=case.match) as info:
        case.fn(env)
    assert isinstance(info.value, LIBRARY_ERRORS + (RuntimeError,))
    assert _raised_in_library(info), f"{case.id}: raised inside {info.traceback[-1].path}, not by course_lib"


def test_count(capsys):
    """The tally issue 15 asks for (printed with -s): every case, and those that expect a library error."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    errors = sum(c.error is not None for c in CASES)
    cli_errors = sum(c.id.startswith("course ") for c in CASES)
    with capsys.disabled():
        print(f"\nbad-input cases: {len(CASES)}; library errors: {errors + cli_errors} "
              f"({errors} raised, {cli_errors} `course` exit status 2); correct results: "
              f"{len(CASES) - errors - cli_errors}")
    assert len(CASES) >= 200
