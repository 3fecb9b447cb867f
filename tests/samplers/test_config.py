"""SamplerConfig: each method runs the same update as the sampler it names, over the same steps."""
import pytest
import torch

from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas
from course_lib.samplers import config as sc
from course_lib.samplers import ddim, dpm_solver, loop, respace
from course_lib.samplers.ddpm import ddpm_step

SCHEDULE = NoiseSchedule.from_betas(cosine_betas(1000))


def eps_fn(x, t, cond=None):
    """A smooth stand-in network that depends on x and t."""
    return 0.3 * torch.tanh(x) + 0.05 * torch.cos(t.double() / 100).view(-1, 1, 1, 1).to(x.dtype)


def learned_fn(x, t, cond=None):
    """The same with a variance channel after eps (a learn_sigma model)."""
    return torch.cat([eps_fn(x, t), torch.tanh(x + 0.2)], 1)


def x_T(seed=0):
    return torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_config_is_the_ddim_loop_over_its_timesteps(eta):
    cfg = sc.SamplerConfig("ddim", steps=10, eta=eta)
    ours = sc.run(cfg, eps_fn, SCHEDULE, x_T(), generator=torch.Generator().manual_seed(1))
    ref = loop.sample(eps_fn, SCHEDULE, (3, 1, 6, 6), step=ddim.ddim_step,
                      timesteps=ddim.timesteps(1000, 10, "linspace"), x_T=x_T(), eta=eta, clip_x0=True,
                      generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(ours, ref)


def test_eta_0_ignores_the_generator_and_eta_1_uses_it():
    a = sc.run(sc.SamplerConfig(steps=5), eps_fn, SCHEDULE, x_T(), generator=torch.Generator().manual_seed(1))
    b = sc.run(sc.SamplerConfig(steps=5), eps_fn, SCHEDULE, x_T(), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = sc.run(sc.SamplerConfig(steps=5, eta=1.0), eps_fn, SCHEDULE, x_T(), generator=torch.Generator().manual_seed(1))
    d = sc.run(sc.SamplerConfig(steps=5, eta=1.0), eps_fn, SCHEDULE, x_T(), generator=torch.Generator().manual_seed(2))
    assert not torch.equal(c, d)


def test_ddim_eta_1_over_all_steps_is_ddpm_with_the_small_variance():
    """DDIM sec. 4.1 through the configs: eta = 1 over every step is DDPM with sigma^2 = beta_tilde."""
    s = NoiseSchedule.from_betas(cosine_betas(40))
    a = sc.run(sc.SamplerConfig("ddim", steps=40, eta=1.0), eps_fn, s, x_T(),
               generator=torch.Generator().manual_seed(3))
    b = sc.run(sc.SamplerConfig("ddpm", steps=40, variance="small"), eps_fn, s, x_T(),
               generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-5)


def test_ddpm_config_is_the_respaced_ancestral_loop():
    ts = ddim.timesteps(1000, 8, "linspace")
    spaced = respace.respace(SCHEDULE, ts)
    ref = loop.sample(respace.respaced_model(learned_fn, spaced.timesteps), spaced.schedule, (3, 1, 6, 6),
                      step=ddpm_step, variance="learned", x_T=x_T(), generator=torch.Generator().manual_seed(4),
                      progress=False)
    ours = sc.run(sc.SamplerConfig("ddpm", steps=8), learned_fn, SCHEDULE, x_T(),
                  generator=torch.Generator().manual_seed(4))
    assert torch.equal(ours, ref)


def test_dpm_solver_config_is_the_solver_loop_and_karras_spacing_is_used():
    cfg = sc.SamplerConfig("dpm_solver_pp_2m", steps=10, spacing="karras")
    ts = dpm_solver.karras_timesteps(SCHEDULE, 10, 7.0, sigma_max=80.0)
    assert torch.equal(cfg.timesteps(SCHEDULE), ts) and len(ts) == 10
    ref = loop.sample(eps_fn, SCHEDULE, (3, 1, 6, 6), step=dpm_solver.DPMSolverPP2M(), timesteps=ts, x_T=x_T(),
                      clip_x0=True, progress=False)
    assert torch.equal(sc.run(cfg, eps_fn, SCHEDULE, x_T()), ref)


def test_a_learned_variance_output_works_with_every_method():
    for method in sc.METHODS:
        out = sc.run(sc.SamplerConfig(method, steps=4), learned_fn, SCHEDULE, x_T(),
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, 1, 6, 6) and bool(torch.isfinite(out).all())


def test_labels_name_the_method_its_knob_steps_and_spacing():
    assert sc.SamplerConfig("ddim", steps=50, eta=1.0).label == "DDIM eta=1, 50 steps"
    label = sc.SamplerConfig("dpm_solver_pp_2m", steps=20, spacing="karras").label
    assert label == "DPM-Solver++(2M), 20 steps, karras"
    assert sc.SamplerConfig("ddpm", steps=100).label == "DDPM learned var., 100 steps"
    assert sc.SamplerConfig(steps=10, clip_x0=False).label == "DDIM eta=0, 10 steps, no clip"


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="euler"), "unknown method"),
    (dict(spacing="quadratic"), "unknown spacing"),
    (dict(steps=0), "at least one"),
    (dict(eta=-0.5), "eta"),
    (dict(method="dpm_solver_pp_2m", eta=1.0), "eta = 0 only"),
    (dict(method="ddpm", eta=1.0), "eta = 0 only"),
    (dict(method="ddpm", variance="medium"), "unknown variance"),
])
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sc.SamplerConfig(**kwargs)


def test_configs_are_frozen_and_hashable():
    cfg = sc.SamplerConfig(steps=10)
    with pytest.raises(Exception):
        cfg.steps = 20
    assert {cfg: 1}[sc.SamplerConfig(steps=10)] == 1


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_first_eta_applies_to_the_first_step_alone(eta):
    """first_eta=1 with eta: the first step (from the largest t) is DDIM eta=1 with the generator's
    first draw, every later step DDIM with eta, checked against the steps written out."""
    cfg = sc.SamplerConfig("ddim", steps=6, eta=eta, first_eta=1.0)
    ours = sc.run(cfg, eps_fn, SCHEDULE, x_T(), generator=torch.Generator().manual_seed(1))
    ts = cfg.timesteps(SCHEDULE).flip(0).tolist() + [-1]
    g = torch.Generator().manual_seed(1)
    x = x_T()
    for i, (t, tp) in enumerate(zip(ts[:-1], ts[1:])):
        tt, tpp = torch.full((3,), t), torch.full((3,), tp)
        e = 1.0 if i == 0 else eta
        x = ddim.ddim_step(SCHEDULE, x, tt, tpp, eps_fn(x, tt), eta=e, clip_x0=True, generator=g).x_prev
    torch.testing.assert_close(ours, x)
    plain = sc.run(sc.SamplerConfig("ddim", steps=6, eta=eta), eps_fn, SCHEDULE, x_T(),
                   generator=torch.Generator().manual_seed(1))
    if eta == 0.0:                   # the fresh first step changes an eta = 0 chain
        assert (ours - plain).abs().max() > 1e-3
    else:                            # and is a no-op when every step has eta = 1 anyway
        torch.testing.assert_close(ours, plain)


def test_first_eta_label_and_bad_values():
    assert sc.SamplerConfig(steps=20, first_eta=1.0).label == "DDIM eta=0, 20 steps, eta=1 at the first step"
    with pytest.raises(ValueError, match="first_eta is DDIM's knob"):
        sc.SamplerConfig("ddpm", steps=10, first_eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        sc.SamplerConfig(steps=10, first_eta=-1.0)
