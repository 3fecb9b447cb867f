"""A sampler as data: which step function, which of the model's T steps it visits, and its knobs,
so that a lesson can list samplers in a table and run each one the same way from the same x_T
(lesson 03's steps-vs-FID table, the DDIM paper's Table 1 in miniature).

    SamplerConfig("ddim", steps=50, eta=0.0)                 DDIM eq. (12), sigma of eq. (16)
    SamplerConfig("dpm_solver_pp_2m", steps=20, spacing="karras")   Lu et al. 2022, Algorithm 2
    SamplerConfig("ddpm", steps=100, variance="learned")     respaced ancestral sampling (Improved DDPM sec. 4)

`run(config, eps_fn, schedule, x_T)` draws the samples. DDIM and DPM-Solver++ visit the chosen
steps of the full schedule directly (a step may jump from any t to any t_prev < t); DDPM's step
moves one index at a time, so its schedule is respaced to the chosen steps first. Every method
uses the same `timesteps(schedule)`, so rows of a table differ only in the update rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from course_lib.diffusion._checks import check_int, check_real
from course_lib.diffusion.schedules import NoiseSchedule
from course_lib.samplers import ddim, dpm_solver, loop, respace
from course_lib.samplers.ddpm import VARIANCES, ddpm_step

METHODS = ("ddim", "dpm_solver_pp_2m", "ddpm")
SPACINGS = ddim.SPACINGS + ("karras",)
_NAMES = {"ddim": "DDIM", "dpm_solver_pp_2m": "DPM-Solver++(2M)", "ddpm": "DDPM"}


@dataclass(frozen=True)
class SamplerConfig:
    method: str = "ddim"              # "ddim", "dpm_solver_pp_2m" or "ddpm" (METHODS)
    steps: int = 50                   # sampling steps asked for (= model evaluations; karras may drop repeats)
    eta: float = 0.0                  # DDIM's eta of eq. (16): 0 deterministic, 1 DDPM's beta_tilde; ddim only
    spacing: str = "linspace"         # which of the T steps: ddim.timesteps' spacings, or "karras" (Karras eq. 5)
    variance: str = "learned"         # ddpm only: "small", "large" or "learned" (samplers.ddpm)
    clip_x0: bool = True              # clamp the predicted x0 to [-1, 1] at every step (ADM's clip_denoised)
    rho: float = 7.0                  # karras only: Karras's rho
    sigma_max: float | None = 80.0    # karras only: the largest sigma (None: the schedule's own, sigma_{T-1})
    first_eta: float | None = None    # ddim only: eta of the first step (from the largest t) alone, `eta` after it;
                                      # None: `eta` throughout (lesson 03: does fresh noise at t = T-1 alone matter?)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; choose one of {SPACINGS}")
        if check_int("steps", self.steps) < 1:
            raise ValueError(f"need at least one sampling step, got {self.steps}")
        ddim.check_eta(self.eta)                      # finite and >= 0, for every method
        if self.eta != 0 and self.method != "ddim":
            raise ValueError(f"eta={self.eta}: eta is DDIM's knob; {self.method} takes eta = 0 only")
        check_real("rho", self.rho, low=0.0, low_open=True)
        if self.sigma_max is not None:
            check_real("sigma_max", self.sigma_max, low=0.0, low_open=True)
        if self.first_eta is not None:
            if self.method != "ddim":
                raise ValueError(f"first_eta={self.first_eta}: first_eta is DDIM's knob; {self.method} takes None only")
            ddim.check_eta(self.first_eta)
        if not isinstance(self.clip_x0, bool):
            raise TypeError(f"clip_x0 must be True or False, got {self.clip_x0!r}")
        if self.method == "ddpm" and self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; choose one of {VARIANCES}")

    @property
    def label(self) -> str:
        """A short name for tables and legends, e.g. 'DDIM eta=0, 50 steps' (linspace spacing and clipping,
        the defaults, go unnamed)."""
        knob = {"ddim": f" eta={self.eta:g}", "ddpm": f" {self.variance} var.", "dpm_solver_pp_2m": ""}[self.method]
        where = f", {self.spacing}" if self.spacing != "linspace" else ""
        clip = "" if self.clip_x0 else ", no clip"
        first = "" if self.first_eta is None else f", eta={self.first_eta:g} at the first step"
        return f"{_NAMES[self.method]}{knob}, {self.steps} steps{where}{clip}{first}"

    def timesteps(self, schedule: NoiseSchedule) -> torch.Tensor:
        """The increasing indices into `schedule` this sampler visits."""
        if self.spacing == "karras":
            return dpm_solver.karras_timesteps(schedule, self.steps, self.rho, sigma_max=self.sigma_max)
        return ddim.timesteps(schedule.T, self.steps, self.spacing)


def run(config: SamplerConfig, eps_fn, schedule: NoiseSchedule, x_T: torch.Tensor, *, cond=None,
        generator=None, progress: bool = False) -> torch.Tensor:
    """Samples from x_T with `config`'s sampler over config.timesteps(schedule). `generator` feeds the
    noise of stochastic samplers (DDIM eta > 0, DDPM); deterministic ones never touch it."""
    ts = config.timesteps(schedule)
    kw = dict(cond=cond, x_T=x_T, generator=generator, progress=progress, clip_x0=config.clip_x0)
    if config.method == "ddim":
        step = ddim.ddim_step if config.first_eta is None else _FirstStepEta(config.first_eta, int(ts.max()))
        return loop.sample(eps_fn, schedule, x_T.shape, step=step, timesteps=ts, eta=config.eta, **kw)
    if config.method == "dpm_solver_pp_2m":
        return loop.sample(eps_fn, schedule, x_T.shape, step=dpm_solver.DPMSolverPP2M(), timesteps=ts, **kw)
    spaced = respace.respace(schedule, ts)                       # ddpm_step moves one (respaced) index at a time
    return loop.sample(respace.respaced_model(eps_fn, spaced.timesteps), spaced.schedule, x_T.shape,
                       step=ddpm_step, variance=config.variance, **kw)


class _FirstStepEta:
    """ddim_step with eta = first_eta on the step that starts at t_first (the chain's first) and the
    loop's eta on every other step. Its noise is drawn from the generator on the generator's own
    device (loop.randn), as the loop does for steps it knows draw noise."""

    def __init__(self, first_eta: float, t_first: int):
        self.first_eta, self.t_first = ddim.check_eta(first_eta), t_first

    def __call__(self, schedule, x_t, t, t_prev, eps, *, eta: float = 0.0, clip_x0: bool = False,
                 noise=None, generator=None) -> ddim.StepOutput:
        if int(t[0]) == self.t_first:
            eta = self.first_eta
            if eta > 0 and noise is None:
                noise = loop.randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return ddim.ddim_step(schedule, x_t, t, t_prev, eps, eta=eta, clip_x0=clip_x0, noise=noise,
                              generator=generator)
