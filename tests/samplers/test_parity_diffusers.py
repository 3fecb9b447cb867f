"""Parity of our samplers with diffusers' schedulers (an outside reference, as nanoGPT checks
against `from_pretrained`): whole trajectories of a deterministic fake model, same betas, same
noise, in float64, within 1e-5.

How the two are put on the same footing:
- diffusers builds its betas, alphas and alphas_cumprod in float32 whatever `trained_betas` is;
  `float64_buffers` puts the float64 values of our schedule in their place (the same formulas
  diffusers' constructor applies), after checking that diffusers' own float32 values agree.
- DPMSolverMultistepScheduler.set_timesteps also rounds its sigmas to float32; they are recomputed
  in float64 with diffusers' own code path (`_convert_to_karras` for Karras) and checked against
  the float32 ones. Its `step` still casts the sample to float32 for the update (diffusers'
  "upcast" line), so its trajectories carry float32 rounding: that is the floor of those tests.
- Noise: DDIM takes it explicitly (`variance_noise`); for DDPM both sides draw from generators
  seeded alike, in the same order and dtype.
Each test prints the max abs difference it achieved (`pytest -s` shows them, prefixed PARITY).
Skipped when diffusers is not installed (it is a dev dependency).
"""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
# numpy 2 warns when diffusers' set_timesteps turns a torch tensor into an array: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from course_lib.diffusion.schedules import NoiseSchedule, linear_betas  # noqa: E402
from course_lib.samplers import ddim  # noqa: E402
from course_lib.samplers import dpm_solver as dpm  # noqa: E402
from course_lib.samplers.ddim import ddim_step  # noqa: E402
from course_lib.samplers.ddpm import ddpm_step  # noqa: E402
from course_lib.samplers.loop import sample  # noqa: E402
from course_lib.samplers.respace import respace, respaced_model  # noqa: E402

T, TOL, SHAPE = 1000, 1e-5, (2, 3, 8, 8)
BETAS = linear_betas(T)
SCHEDULE = NoiseSchedule.from_betas(BETAS)


def eps_fn(x, t, cond=None):
    """A deterministic fake model that keeps samples on the scale of images: the exact eps of data
    x0 ~ N(0.2, 0.25) per pixel, plus 0.1 sin(t). t is our (B,) tensor or diffusers' scalar timestep.
    (With 0.1 x + sin(t) samples grow to |x| ~ 300; DDPM and DDIM still agree to 1e-12 there,
    DPM-Solver++ to ~1e-4, the float32 rounding of diffusers' DPM-Solver step at that scale.)"""
    t = torch.as_tensor(t).reshape(-1)
    a = SCHEDULE.alpha_bar[t].to(x.dtype).reshape(-1, 1, 1, 1)
    exact = (1 - a).sqrt() * (x - a.sqrt() * 0.2) / (a * 0.25 + 1 - a)
    return exact + 0.1 * torch.sin(t.to(x.dtype)).reshape(-1, 1, 1, 1)


def learned_fn(x, t, cond=None):
    """The same with a learned-variance half, v in [-1, 1] (ADM's learned range)."""
    return torch.cat([eps_fn(x, t), torch.tanh(x)], dim=1)


def x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def check(label, ours, theirs, tol=TOL):
    diff = float((ours - theirs).abs().max())
    print(f"PARITY {label}: max abs diff {diff:.2e} (|x| up to {float(theirs.abs().max()):.2f})")
    assert diff < tol, f"{label}: max abs diff {diff:.2e} vs diffusers, tolerance {tol:.0e}"


def float64_buffers(sched):
    """Replace diffusers' float32 schedule tensors by our float64 ones (after checking they agree)."""
    torch.testing.assert_close(sched.alphas_cumprod.double(), SCHEDULE.alpha_bar, rtol=1e-5, atol=1e-7)
    sched.betas, sched.alphas, sched.alphas_cumprod = BETAS.clone(), 1 - BETAS, SCHEDULE.alpha_bar.clone()
    if hasattr(sched, "lambda_t"):   # DPMSolverMultistepScheduler's derived tensors
        ab = SCHEDULE.alpha_bar
        sched.alpha_t, sched.sigma_t = ab.sqrt(), (1 - ab).sqrt()
        sched.lambda_t = sched.alpha_t.log() - sched.sigma_t.log()
        sched.sigmas = ((1 - ab) / ab).sqrt()
    return sched


def run_diffusers(sched, model, x, *, noise_for=None, generator=None, **step_kwargs):
    """The diffusers sampling loop: model then scheduler.step at every scheduler timestep."""
    for i, t in enumerate(sched.timesteps):
        extra = {"variance_noise": noise_for(i)} if noise_for else {}
        if generator is not None:
            extra["generator"] = generator
        x = sched.step(model(x, t), t, x, **extra, **step_kwargs).prev_sample
    return x


def test_our_linear_betas_are_diffusers_linear_betas():
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    torch.testing.assert_close(sched.betas.double(), BETAS, rtol=1e-6, atol=0)   # float32 rounding


# ---------------------------------------------------------------------------- DDPM

@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance_type, ours", [("fixed_small", "small"), ("fixed_small_log", "small"),
                                                 ("fixed_large", "large"), ("learned_range", "learned")])
def test_ddpm_all_steps_matches_ddpmscheduler(variance_type, ours, clip):
    sched = float64_buffers(diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=BETAS.numpy(),
                                                    variance_type=variance_type, clip_sample=clip))
    sched.set_timesteps(T)
    model = learned_fn if ours == "learned" else eps_fn
    theirs = run_diffusers(sched, model, x_T(), generator=gen())
    mine = sample(model, SCHEDULE, SHAPE, x_T=x_T(), generator=gen(), progress=False,
                  step=ddpm_step, variance=ours, clip_x0=clip)
    check(f"DDPM T={T} {variance_type} clip={clip}", mine, theirs)


@pytest.mark.parametrize("spacing, variance_type, ours", [
    ("leading", "fixed_small", "small"), ("trailing", "fixed_small", "small"), ("linspace", "fixed_small", "small"),
    ("leading", "fixed_large", "large"), ("linspace", "fixed_large", "large"), ("leading", "learned_range", "learned"),
])
def test_respaced_ddpm_matches_ddpmscheduler_with_fewer_steps(spacing, variance_type, ours):
    """diffusers' DDPM with 50 inference steps is ADM's respacing (beta'_i from the kept alpha_bar).
    Not compared: trailing with fixed_large, where diffusers adds noise of variance
    1 - alpha_bar_t at the final step (its `t > 0` test looks at the original t, 19 there)."""
    n = 50
    sched = float64_buffers(diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=BETAS.numpy(),
                                                    variance_type=variance_type, timestep_spacing=spacing))
    sched.set_timesteps(n)
    ts = ddim.timesteps(T, n, spacing)
    assert torch.equal(sched.timesteps, ts.flip(0))
    model = learned_fn if ours == "learned" else eps_fn
    theirs = run_diffusers(sched, model, x_T(), generator=gen())
    r = respace(SCHEDULE, ts)
    mine = sample(respaced_model(model, r.timesteps), r.schedule, SHAPE, x_T=x_T(), generator=gen(),
                  progress=False, step=ddpm_step, variance=ours, clip_x0=True)
    check(f"DDPM respaced n={n} {spacing} {variance_type}", mine, theirs)


# ---------------------------------------------------------------------------- DDIM

def ddim_scheduler(spacing, offset=0, clip=False):
    return float64_buffers(diffusers.DDIMScheduler(
        num_train_timesteps=T, trained_betas=BETAS.numpy(), clip_sample=clip, set_alpha_to_one=True,
        steps_offset=offset, timestep_spacing=spacing))


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing, offset, n", [("leading", 0, 10), ("leading", 0, 7), ("leading", 1, 50),
                                                ("trailing", 0, 10), ("trailing", 0, 50)])
def test_ddim_trajectory_matches_ddimscheduler(spacing, offset, n, eta, clip):
    """Through our sampling loop (t paired with the next visited step) for the spacings where
    diffusers' `prev_timestep = t - T // n` is that next step: leading always, trailing when n divides T.
    clip=True is ADM's clipping (eps re-derived from the clipped x0): use_clipped_model_output=True."""
    sched = ddim_scheduler(spacing, offset, clip)
    sched.set_timesteps(n)
    ts = ddim.timesteps(T, n, spacing, offset=offset)
    assert torch.equal(sched.timesteps, ts.flip(0))
    theirs = run_diffusers(sched, eps_fn, x_T(), generator=gen(), eta=eta, use_clipped_model_output=clip)
    mine = sample(eps_fn, SCHEDULE, SHAPE, x_T=x_T(), generator=gen(), progress=False,
                  step=ddim_step, timesteps=ts, eta=eta, clip_x0=clip)
    check(f"DDIM n={n} {spacing} offset={offset} eta={eta} clip={clip}", mine, theirs)


def diffusers_ddim_prev(sched, t: int, n: int) -> int:
    """The step DDIMScheduler.step goes to from t: diffusers 0.42 uses t - T // n for every spacing
    (diffusers issues #12633, #11347); a scheduler with `previous_timestep` says so itself."""
    if hasattr(sched, "previous_timestep"):
        return int(sched.previous_timestep(t))
    return t - T // n


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing, n", [("linspace", 10), ("linspace", 50), ("trailing", 7)])
def test_ddim_step_matches_ddimscheduler_where_its_previous_step_is_not_the_next_visited(spacing, n, eta):
    """For linspace (and trailing when n does not divide T) diffusers' DDIM steps from t to t - T // n,
    not to the next visited step as the DDIM paper and our loop do: drive our ddim_step with the same
    pairs to compare the step itself (our timesteps still equal diffusers')."""
    sched = ddim_scheduler(spacing)
    sched.set_timesteps(n)
    assert torch.equal(sched.timesteps, ddim.timesteps(T, n, spacing).flip(0))
    noise = [torch.randn(SHAPE, generator=gen(100 + i), dtype=torch.float64) for i in range(n)]
    theirs = run_diffusers(sched, eps_fn, x_T(), noise_for=noise.__getitem__, eta=eta)
    x = x_T()
    for i, t in enumerate(sched.timesteps.tolist()):
        t_prev = max(diffusers_ddim_prev(sched, t, n), -1)
        B = SHAPE[0]
        x = ddim_step(SCHEDULE, x, torch.full((B,), t), torch.full((B,), t_prev), eps_fn(x, t), eta=eta,
                      noise=noise[i]).x_prev
    check(f"DDIM step n={n} {spacing} eta={eta} (diffusers' previous step)", x, theirs)


# ---------------------------------------------------------------------------- DPM-Solver++(2M)

def dpm_scheduler(**config):
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS.numpy(), algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, **{"solver_order": 2, **config})
    return float64_buffers(sched)


def set_timesteps_float64(sched, n=None, timesteps=None):
    """set_timesteps, then its sigmas (rounded to float32 by diffusers) recomputed in float64."""
    sched.set_timesteps(n, timesteps=timesteps)
    all_sigmas = dpm.schedule_sigmas(SCHEDULE).numpy()
    if sched.config.use_karras_sigmas:
        sigmas = sched._convert_to_karras(in_sigmas=np.flip(all_sigmas).copy(), num_inference_steps=n)
    else:
        sigmas = all_sigmas[sched.timesteps.numpy()]
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]))
    torch.testing.assert_close(sched.sigmas.double(), sigmas, rtol=1e-6, atol=0)
    sched.sigmas = sigmas


@pytest.mark.parametrize("n", [5, 10, 25])
@pytest.mark.parametrize("spacing", ddim.SPACINGS)
def test_dpm_solver_pp_2m_matches_dpmsolvermultistep_on_our_spacings(spacing, n):
    ts = ddim.timesteps(T, n, spacing)
    sched = dpm_scheduler()
    set_timesteps_float64(sched, timesteps=ts.flip(0).tolist())
    theirs = run_diffusers(sched, eps_fn, x_T())
    mine = sample(eps_fn, SCHEDULE, SHAPE, x_T=x_T(), progress=False, step=dpm.DPMSolverPP2M(), timesteps=ts)
    check(f"DPM-Solver++(2M) n={n} our {spacing}", mine, theirs)


@pytest.mark.parametrize("spacing", ddim.SPACINGS)
def test_dpm_solver_pp_2m_matches_on_diffusers_own_spacing(spacing):
    """DPMSolverMultistepScheduler spaces n + 1 points and drops t = 0 (its linspace and leading)."""
    n = 20
    sched = dpm_scheduler(timestep_spacing=spacing)
    set_timesteps_float64(sched, n)
    theirs = run_diffusers(sched, eps_fn, x_T())
    mine = sample(eps_fn, SCHEDULE, SHAPE, x_T=x_T(), progress=False, step=dpm.DPMSolverPP2M(),
                  timesteps=sched.timesteps)
    check(f"DPM-Solver++(2M) n={n} diffusers' {spacing}", mine, theirs)


@pytest.mark.parametrize("order", [2, 1])
@pytest.mark.parametrize("n", [10, 25])
def test_karras_sigmas_match_use_karras_sigmas(n, order):
    """use_karras_sigmas=True: our karras_schedule (exact Karras sigmas, the model at rounded t) with
    DPM-Solver++(2M), and with DDIM eta = 0, which is the first-order solver (solver_order=1)."""
    sched = dpm_scheduler(use_karras_sigmas=True, solver_order=order)
    set_timesteps_float64(sched, n)
    r = dpm.karras_schedule(SCHEDULE, n)
    assert torch.equal(sched.timesteps, r.timesteps.flip(0))
    torch.testing.assert_close(dpm.schedule_sigmas(r.schedule).flip(0), sched.sigmas[:-1], rtol=1e-10, atol=0)
    theirs = run_diffusers(sched, eps_fn, x_T())
    step = dpm.DPMSolverPP2M() if order == 2 else ddim_step
    mine = sample(respaced_model(eps_fn, r.timesteps), r.schedule, SHAPE, x_T=x_T(), progress=False, step=step)
    check(f"{'DPM-Solver++(2M)' if order == 2 else 'DDIM (solver_order=1)'} Karras n={n}", mine, theirs)


class _Float64Torch:
    """`torch` as diffusers' DPM-Solver module sees it, with float32 meaning float64 (test only)."""
    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("spacing", [*ddim.SPACINGS, "karras"])
def test_dpm_solver_pp_2m_matches_to_rounding_without_diffusers_float32_cast(spacing, monkeypatch):
    """The ~1e-7 differences above are diffusers' `sample.to(torch.float32)` in step: with that cast
    made a float64 one, the two solvers agree to float64 rounding."""
    import diffusers.schedulers.scheduling_dpmsolver_multistep as module
    monkeypatch.setattr(module, "torch", _Float64Torch())
    n = 25
    if spacing == "karras":
        sched = dpm_scheduler(use_karras_sigmas=True)
        set_timesteps_float64(sched, n)
        r = dpm.karras_schedule(SCHEDULE, n)
        model, schedule, ts = respaced_model(eps_fn, r.timesteps), r.schedule, None
    else:
        ts = ddim.timesteps(T, n, spacing)
        sched = dpm_scheduler()
        set_timesteps_float64(sched, timesteps=ts.flip(0).tolist())
        model, schedule = eps_fn, SCHEDULE
    theirs = run_diffusers(sched, eps_fn, x_T())
    mine = sample(model, schedule, SHAPE, x_T=x_T(), progress=False, step=dpm.DPMSolverPP2M(), timesteps=ts)
    check(f"DPM-Solver++(2M) n={n} {spacing}, diffusers without its float32 cast", mine, theirs, tol=1e-12)
