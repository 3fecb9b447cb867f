"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) and Karras sigmas (Karras et al. 2022, eq. 5)."""
import math

import pytest
import torch

from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from course_lib.samplers import ddim
from course_lib.samplers import dpm_solver as dpm
from course_lib.samplers.ddim import ddim_step
from course_lib.samplers.dpm_solver import DPMSolverPP2M, dpm_solver_pp_2m_update
from course_lib.samplers.loop import sample
from course_lib.samplers.respace import respaced_model

T = 1000
SCHEDULES = {"linear": NoiseSchedule.from_betas(linear_betas(T)),
             "cosine": NoiseSchedule.from_betas(cosine_betas(T))}


def full(t, B=2):
    return torch.full((B,), t, dtype=torch.long)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gaussian_problem(s: NoiseSchedule, m=0.2, v=0.25, seed=0):
    """Data x0 ~ N(m, v) per pixel: the exact eps, an x_T, and the exact probability-flow ODE solution
    x_t = sqrt(a_t) (m + (y_T - m) sqrt((v + sigma_t^2) / (v + sigma_T^2))), y = x / sqrt(a), sigma^2 = 1/a - 1."""
    def eps_fn(x, t, cond=None):
        a = ddim.per_sample(s.alpha_bar[t], x)
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * v + 1 - a)
    x_T = rand(2, 1, 4, 4, seed=seed)
    sig2 = dpm.schedule_sigmas(s) ** 2
    y_T = x_T / s.alpha_bar[-1].sqrt()
    exact = lambda t: s.alpha_bar[t].sqrt() * (m + (y_T - m) * ((v + sig2[t]) / (v + sig2[-1])).sqrt())  # noqa: E731
    return eps_fn, x_T, exact


def run(step, s, eps_fn, x, ts):
    """Drive `step` over the decreasing timesteps ts, stopping at ts[-1] (not the end of the chain)."""
    for t, tp in zip(ts[:-1].tolist(), ts[1:].tolist()):
        x = step(s, x, full(t), full(tp), eps_fn(x, full(t))).x_prev
    return x


# ---------------------------------------------------------------------------- the solver

def test_first_step_of_a_fresh_solver_is_ddim_with_eta_0():
    s, x, eps = SCHEDULES["cosine"], rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1)
    ours = DPMSolverPP2M().step(s, x, full(900), full(700), eps)
    ref = ddim_step(s, x, full(900), full(700), eps)
    torch.testing.assert_close(ours.x_prev, ref.x_prev, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.x0, ref.x0)


def test_last_step_lands_on_the_x0_prediction_even_with_a_previous_x0():
    s, solver = SCHEDULES["linear"], DPMSolverPP2M()
    x = rand(2, 3, 4, 4)
    x = solver.step(s, x, full(500), full(20), rand(2, 3, 4, 4, seed=1)).x_prev
    out = solver.step(s, x, full(20), full(-1), rand(2, 3, 4, 4, seed=2))
    torch.testing.assert_close(out.x_prev, out.x0, rtol=1e-12, atol=1e-12)


def test_second_step_uses_the_previous_x0_as_algorithm_2_writes_it():
    """x_{t_i} = sigma_i / sigma_{i-1} x - alpha_i (e^{-h_i} - 1) ((1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2})."""
    s, solver = SCHEDULES["cosine"], DPMSolverPP2M()
    x, e1, e2 = rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2)
    first = solver.step(s, x, full(800), full(500), e1)
    second = solver.step(s, first.x_prev, full(500), full(200), e2)
    lam = lambda t: 0.5 * math.log(s.alpha_bar[t] / (1 - s.alpha_bar[t]))  # noqa: E731
    h, r = lam(200) - lam(500), (lam(500) - lam(800)) / (lam(200) - lam(500))
    D = (1 + 1 / (2 * r)) * second.x0 - 1 / (2 * r) * first.x0
    a2, s2, s5 = math.sqrt(s.alpha_bar[200]), math.sqrt(1 - s.alpha_bar[200]), math.sqrt(1 - s.alpha_bar[500])
    torch.testing.assert_close(second.x_prev, s2 / s5 * first.x_prev - a2 * (math.exp(-h) - 1) * D)


def test_steps_ending_the_chain_are_first_order_per_sample():
    s, x, x0, x0_last = SCHEDULES["linear"], rand(2, 3), rand(2, 3, seed=1), rand(2, 3, seed=2)
    t, t_prev, t_last = torch.tensor([30, 30]), torch.tensor([-1, 10]), torch.tensor([60, 60])
    mixed = dpm_solver_pp_2m_update(s, x, t, t_prev, x0, x0_last, t_last)
    torch.testing.assert_close(mixed[0], x0[0])
    alone = dpm_solver_pp_2m_update(s, x[1:], t[1:], t_prev[1:], x0[1:], x0_last[1:], t_last[1:])
    torch.testing.assert_close(mixed[1:], alone)


@pytest.mark.parametrize("name", SCHEDULES)
def test_ddim_is_first_order_and_dpm_solver_pp_2m_second_order_on_an_exact_ode(name):
    """On Gaussian data the probability-flow ODE has a closed form: halving the step halves DDIM's
    error and quarters DPM-Solver++(2M)'s (uniform steps from T-1 to t = 300)."""
    s = SCHEDULES[name]
    eps_fn, x_T, exact = gaussian_problem(s)
    err = {"ddim": [], "dpm": []}
    for n in (12, 24, 48):
        ts = torch.linspace(300, T - 1, n + 1).round().long().flip(0)
        err["ddim"].append(float((run(ddim_step, s, eps_fn, x_T, ts) - exact(300)).abs().max()))
        err["dpm"].append(float((run(DPMSolverPP2M(), s, eps_fn, x_T, ts) - exact(300)).abs().max()))
    ddim_rates = [a / b for a, b in zip(err["ddim"], err["ddim"][1:])]
    dpm_rates = [a / b for a, b in zip(err["dpm"], err["dpm"][1:])]
    assert all(1.7 < q < 2.3 for q in ddim_rates), err
    assert all(q > 3.2 for q in dpm_rates), err
    assert all(d < e for d, e in zip(err["dpm"], err["ddim"])), err


def test_a_reused_solver_starts_each_chain_afresh():
    s = SCHEDULES["cosine"]
    eps_fn = lambda x, t, cond=None: 0.1 * x + torch.sin(t.double()).view(-1, 1, 1, 1)  # noqa: E731
    ts, x_T = ddim.timesteps(T, 8, "trailing"), rand(2, 1, 4, 4)
    solver = DPMSolverPP2M()
    a = sample(eps_fn, s, x_T.shape, step=solver, timesteps=ts, x_T=x_T, progress=False)
    run(solver, s, eps_fn, x_T, torch.tensor([999, 700, 500]))          # an interrupted chain
    b = sample(eps_fn, s, x_T.shape, step=solver, timesteps=ts, x_T=x_T, progress=False)
    c = sample(eps_fn, s, x_T.shape, step=DPMSolverPP2M(), timesteps=ts, x_T=x_T, progress=False)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_solver_is_deterministic_and_rejects_eta():
    s, x, eps = SCHEDULES["linear"], rand(2, 3), rand(2, 3, seed=1)
    with pytest.raises(ValueError, match="eta must be 0"):
        DPMSolverPP2M().step(s, x, full(10), full(5), eps, eta=0.5)
    with pytest.raises(ValueError, match="t_prev < t"):
        DPMSolverPP2M().step(s, x, full(10), full(10), eps)


def test_clip_x0_bounds_the_prediction():
    s, x = SCHEDULES["linear"], rand(2, 3, 4, 4)
    out = DPMSolverPP2M().step(s, x, full(30), full(10), 5 * rand(2, 3, 4, 4, seed=1), clip_x0=True)
    assert float(out.x0.abs().max()) <= 1.0


# ---------------------------------------------------------------------------- Karras sigmas

def test_karras_sigmas_run_from_sigma_max_to_sigma_min_and_rho_1_is_linear():
    sig = dpm.karras_sigmas(10, 0.002, 80.0)
    assert sig.dtype == torch.float64 and sig.shape == (10,)
    torch.testing.assert_close(sig[[0, -1]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    assert bool((sig[1:] < sig[:-1]).all())
    linear = torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64)
    torch.testing.assert_close(dpm.karras_sigmas(5, 1.0, 5.0, rho=1.0), linear)
    assert dpm.karras_sigmas(1, 0.1, 10.0).tolist() == pytest.approx([10.0])


@pytest.mark.parametrize("args, match", [((0, 0.1, 1.0), "n >= 1"), ((5, 1.0, 0.5), "sigma_min < sigma_max"),
                                         ((5, 0.0, 1.0), "sigma_min"), ((5, 0.1, 1.0, -7.0), "rho")])
def test_karras_sigmas_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        dpm.karras_sigmas(*args)


@pytest.mark.parametrize("name", SCHEDULES)
def test_sigmas_to_timesteps_inverts_the_schedule_and_interpolates_in_log_sigma(name):
    s = SCHEDULES[name]
    sig = dpm.schedule_sigmas(s)
    assert torch.equal(dpm.sigmas_to_timesteps(s, sig), torch.arange(T))
    mid = (0.5 * (sig[[10, 500]].log() + sig[[11, 501]].log())).exp()
    halfway = torch.tensor([10.5, 500.5], dtype=torch.float64)
    torch.testing.assert_close(dpm.sigmas_to_timesteps(s, mid, interpolate=True), halfway)
    out = dpm.sigmas_to_timesteps(s, torch.tensor([1e-6, 1e9], dtype=torch.float64))
    assert out.tolist() == [0, T - 1]                                     # clamped beyond the schedule


def test_karras_timesteps_are_unique_increasing_and_span_the_schedule():
    s = SCHEDULES["linear"]
    ts = dpm.karras_timesteps(s, 20)
    assert ts.dtype == torch.int64 and bool((ts[1:] > ts[:-1]).all())
    assert int(ts[0]) == 0 and int(ts[-1]) == T - 1 and len(ts) <= 20
    assert len(dpm.karras_timesteps(s, 200)) < 200                       # Karras steps finer than the grid near 0


def test_karras_schedule_keeps_the_exact_sigmas_and_the_model_sees_rounded_t():
    s, n = SCHEDULES["linear"], 12
    r = dpm.karras_schedule(s, n)
    sig = dpm.karras_sigmas(n, float(dpm.schedule_sigmas(s)[0]), float(dpm.schedule_sigmas(s)[-1])).flip(0)
    torch.testing.assert_close(dpm.schedule_sigmas(r.schedule), sig, rtol=1e-10, atol=0)
    assert torch.equal(r.timesteps, dpm.sigmas_to_timesteps(s, sig))
    assert r.schedule.T == n and bool((r.timesteps[1:] >= r.timesteps[:-1]).all())


def test_samplers_converge_on_karras_spacing_snapped_or_with_exact_sigmas():
    """Both ways of running on Karras spacing (snapped to the grid, or exact sigmas with the model at
    rounded t) converge to the exact ODE solution, nearly alike, DPM-Solver++(2M) ahead of DDIM."""
    s = SCHEDULES["linear"]
    eps_fn, x_T, _ = gaussian_problem(s)
    err = {}
    for n in (10, 20, 40):
        r = dpm.karras_schedule(s, n)
        for name, step in (("ddim", ddim_step), ("dpm", DPMSolverPP2M())):
            snapped = sample(eps_fn, s, x_T.shape, step=step, timesteps=dpm.karras_timesteps(s, n), x_T=x_T,
                             progress=False)
            exact_sig = sample(respaced_model(eps_fn, r.timesteps), r.schedule, x_T.shape, step=step, x_T=x_T,
                               progress=False)
            err[name, n] = [float((x - exact_end(s, x_T)).abs().max()) for x in (snapped, exact_sig)]
    for name in ("ddim", "dpm"):
        for way in (0, 1):
            seq = [err[name, n][way] for n in (10, 20, 40)]
            assert all(b < 0.6 * a for a, b in zip(seq, seq[1:])), err
        assert all(abs(a - b) < 0.2 * max(a, b) for a, b in (err[name, n] for n in (10, 20, 40))), err
    assert all(err["dpm", n][w] < err["ddim", n][w] for n in (10, 20, 40) for w in (0, 1)), err


def exact_end(s, x_T, m=0.2, v=0.25):
    """The Gaussian ODE's end point (sigma = 0): m + (y_T - m) sqrt(v / (v + sigma_T^2))."""
    sig2_T = float(dpm.schedule_sigmas(s)[-1]) ** 2
    return m + (x_T / s.alpha_bar[-1].sqrt() - m) * math.sqrt(v / (v + sig2_T))
