"""The sampling loop: with an oracle noise predictor for a point-mass data distribution every
sampler must land on that point; the callback and learned-variance plumbing are checked too."""
import pytest
import torch

from course_lib.diffusion import formulas, schedules
from course_lib.nn.unet import UNet, preset
from course_lib.samplers import loop, respace
from course_lib.samplers.ddpm import ddpm_step


def _oracle(sched, x0):
    """The exact eps(x_t, t) when the data is the single image x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""
    def eps_fn(x_t, t, cond=None):
        return formulas.eps_from_x0(sched, x_t, t, x0.expand_as(x_t).to(x_t.dtype))
    return eps_fn


X0 = torch.tensor([[-0.8, 0.1], [0.5, 0.9]]).reshape(1, 1, 2, 2)


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_oracle_on_a_point_mass_returns_the_point(variance, name):
    sched = schedules.schedule(name, 25)
    out = loop.sample(_oracle(sched, X0), sched, (3, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                      progress=False, variance=variance)
    torch.testing.assert_close(out, X0.expand(3, -1, -1, -1), rtol=1e-4, atol=1e-4)


def test_oracle_on_a_respaced_schedule_returns_the_point():
    sched = schedules.schedule("cosine", 200)
    spaced = respace.respace(sched, respace.even_timesteps(200, 7))
    eps_fn = respace.respaced_model(_oracle(sched, X0), spaced.timesteps)
    out = loop.sample(eps_fn, spaced.schedule, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                      progress=False)
    torch.testing.assert_close(out, X0.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)


def test_one_step_respaced_schedule_samples():
    """Respacing to K = 1 gives a T = 1 schedule; the loop must still run."""
    sched = schedules.schedule("cosine", 100)
    spaced = respace.respace(sched, [99])
    eps_fn = respace.respaced_model(_oracle(sched, X0), spaced.timesteps)
    for variance in ("small", "large"):
        out = loop.sample(eps_fn, spaced.schedule, (2, 1, 2, 2), progress=False, variance=variance,
                          generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, X0.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)


def test_trajectory_collects_one_entry_per_step():
    sched = schedules.schedule("linear", 12)
    traj = loop.Trajectory()
    out = loop.sample(_oracle(sched, X0), sched, (2, 1, 2, 2), callback=traj, progress=False,
                      generator=torch.Generator().manual_seed(0))
    assert traj.t == list(range(11, -1, -1))
    assert len(traj.x_t) == len(traj.x0) == 12
    assert all(x.shape == (2, 1, 2, 2) for x in traj.x_t + traj.x0)
    torch.testing.assert_close(traj.x0[-1], out)  # at t=0 the step returns its x_0 prediction
    sparse = loop.Trajectory(every=5)
    loop.sample(_oracle(sched, X0), sched, (1, 1, 2, 2), callback=sparse, progress=False)
    assert sparse.t == [11, 6, 1, 0]  # i = 0, 5, 10, and always the last step


def test_x_T_and_generator_make_sampling_deterministic():
    sched = schedules.schedule("linear", 10)
    eps_fn = lambda x, t, cond: 0.1 * x  # noqa: E731
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    a = loop.sample(eps_fn, sched, x_T.shape, x_T=x_T, generator=torch.Generator().manual_seed(2), progress=False)
    b = loop.sample(eps_fn, sched, x_T.shape, x_T=x_T, generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(a, b)
    # without x_T the start is randn(shape, generator=...): the same x_T as above
    c = loop.sample(eps_fn, sched, x_T.shape, generator=torch.Generator().manual_seed(1), progress=False,
                    variance="small", clip_x0=False, noise=torch.zeros_like(x_T))
    d = loop.sample(eps_fn, sched, x_T.shape, x_T=x_T, progress=False,
                    variance="small", clip_x0=False, noise=torch.zeros_like(x_T))
    assert torch.equal(c, d)


def test_learned_variance_output_is_split_and_v_passed():
    sched = schedules.schedule("linear", 6)
    v_out = torch.full((2, 1, 2, 2), 0.25)
    calls = []

    def eps_fn(x, t, cond):
        assert cond == "c"
        return torch.cat([torch.zeros_like(x), v_out], dim=1)  # (B, 2C): eps then v

    def step(schedule, x_t, t, t_prev, eps, *, v=None, generator=None, variance="learned"):
        calls.append((eps.shape, v))
        return ddpm_step(schedule, x_t, t, t_prev, eps, v=v, variance=variance, generator=generator)

    out = loop.sample(eps_fn, sched, (2, 1, 2, 2), step=step, cond="c", progress=False)
    assert out.shape == (2, 1, 2, 2) and len(calls) == 6
    assert all(shape == (2, 1, 2, 2) and v is not None and torch.equal(v, v_out) for shape, v in calls)
    # and ddpm_step itself, with variance="learned", takes it directly
    out = loop.sample(eps_fn, sched, (2, 1, 2, 2), cond="c", variance="learned", progress=False)
    assert torch.isfinite(out).all()


def test_steps_without_v_are_not_given_v():
    sched = schedules.schedule("linear", 4)

    def step(schedule, x_t, t, t_prev, eps, *, generator=None):
        return ddpm_step(schedule, x_t, t, t_prev, eps, generator=generator)

    out = loop.sample(lambda x, t, c: torch.zeros(x.shape[0], 2, *x.shape[2:]), sched, (1, 1, 2, 2),
                      step=step, progress=False)
    assert out.shape == (1, 1, 2, 2)


def test_timesteps_in_either_order_and_errors():
    sched = schedules.schedule("linear", 5)
    seen = []
    loop.sample(lambda x, t, c: seen.append(int(t[0])) or torch.zeros_like(x), sched, (1, 1, 1, 1),
                timesteps=[0, 1, 2, 3, 4], progress=False)
    assert seen == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="empty"):
        loop.sample(lambda x, t, c: x, sched, (1, 1, 1, 1), timesteps=[], progress=False)
    with pytest.raises(ValueError, match="one step at a time"):  # ddpm_step cannot skip steps
        loop.sample(lambda x, t, c: x, sched, (1, 1, 1, 1), timesteps=[0, 2, 4], progress=False)


def test_model_fn_wraps_a_unet():
    unet = UNet(preset("tiny", num_classes=3)).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([0, 999])
    eps_fn = loop.model_fn(unet)
    with torch.no_grad():
        assert torch.equal(eps_fn(x, t, torch.tensor([0, 3])), unet(x, t, torch.tensor([0, 3])))
        out = loop.model_fn(unet, bf16=True)(x, t)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 28, 28)


def test_shape_that_disagrees_with_x_T_is_an_error():
    from course_lib.diffusion.schedules import NoiseSchedule, linear_betas
    from course_lib.samplers import loop as loop_mod
    sched = NoiseSchedule.from_betas(linear_betas(10))
    with pytest.raises(ValueError, match="disagree"):
        loop_mod.sample(lambda x, t, c=None: torch.zeros_like(x), sched, (2, 1, 4, 4), x_T=torch.zeros(3, 1, 4, 4),
                        progress=False)
