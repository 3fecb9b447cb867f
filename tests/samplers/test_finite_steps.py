"""Property (hypothesis): random valid inputs never give NaN or inf, from any sampler step and from
guidance up to scale 1e6 with clipping of x0 on. Valid means: a linear or cosine schedule of any
length, any 0 <= t_prev < t < T (or t_prev = -1), x_t and eps of any magnitude up to 1e3, eta in
[0, 1], v in [-1, 1], float32 or float64. The bad-input suite (tests/test_bad_inputs.py) covers
the invalid ones."""
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from course_lib.diffusion.schedules import schedule
from course_lib.guidance import cfg_eps, classifier_guided_eps, classifier_guided_mean, threshold_eps
from course_lib.samplers import ddim, dpm_solver
from course_lib.samplers.ddpm import ddpm_step

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def step_inputs(draw):
    sched = schedule(draw(st.sampled_from(["linear", "cosine"])), draw(st.integers(2, 1000)))
    B = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    scale_x, scale_eps = draw(st.floats(1e-3, 1e3)), draw(st.floats(1e-3, 1e3))
    x_t = (torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64) * scale_x).to(dtype)
    eps = (torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64) * scale_eps).to(dtype)
    t = torch.tensor(draw(st.lists(st.integers(1, sched.T - 1), min_size=B, max_size=B)))
    t_prev = torch.tensor([draw(st.integers(-1, int(ti) - 1)) for ti in t])
    return sched, x_t, t, t_prev, eps, g


def _finite(x):
    return bool(torch.isfinite(x).all())


@SETTINGS
@given(step_inputs(), st.floats(0.0, 1.0), st.booleans())
def test_ddim_step_is_finite(inputs, eta, clip):
    sched, x_t, t, t_prev, eps, g = inputs
    out = ddim.ddim_step(sched, x_t, t, t_prev, eps, eta=eta, clip_x0=clip, generator=g)
    assert _finite(out.x_prev) and _finite(out.x0)


@SETTINGS
@given(step_inputs(), st.sampled_from(["small", "large", "learned"]), st.floats(-1.0, 1.0))
def test_ddpm_step_is_finite(inputs, variance, v_value):
    sched, x_t, t, _, eps, g = inputs
    v = torch.full_like(x_t, v_value) if variance == "learned" else None
    out = ddpm_step(sched, x_t, t, t - 1, eps, variance=variance, v=v, clip_x0=True, generator=g)
    assert _finite(out.x_prev) and _finite(out.x0)


@SETTINGS
@given(step_inputs(), st.booleans())
def test_dpm_solver_steps_are_finite(inputs, clip):
    sched, x_t, t, t_prev, eps, _ = inputs
    solver = dpm_solver.DPMSolverPP2M()
    first = solver(sched, x_t, t, t_prev, eps, clip_x0=clip)
    assert _finite(first.x_prev)
    if bool((t_prev > 0).all()):   # a second, multistep (second-order) step from where the first ended
        t_next = torch.div(t_prev - 1, 2, rounding_mode="floor")
        second = solver(sched, first.x_prev, t_prev, t_next, eps, clip_x0=clip)
        assert _finite(second.x_prev)


def _linear_classifier(K: int, seed: int):
    w = torch.randn(2 * 4 * 4, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def classifier(x, t):
        return x.flatten(1) @ w.to(x.dtype)
    return classifier


@SETTINGS
@given(step_inputs(), st.floats(0.0, 1e6), st.sampled_from(["clip", "dynamic"]), st.integers(0, 1000))
def test_classifier_guidance_up_to_1e6_with_clipping_is_finite(inputs, scale, method, seed):
    sched, x_t, t, t_prev, eps, g = inputs
    y = torch.randint(0, 3, (x_t.shape[0],), generator=g)
    model = lambda x, tt, c: eps   # noqa: E731  (a fixed noise prediction)
    clf = _linear_classifier(3, seed)
    for guided in (classifier_guided_eps(model, clf, sched, scale),
                   classifier_guided_mean(model, clf, sched, scale, variance="small")):
        clipped = threshold_eps(guided, sched, method)
        e = clipped(x_t, t, y)
        assert _finite(e)
        assert _finite(ddim.ddim_step(sched, x_t, t, t_prev, e, clip_x0=True).x_prev)
        assert _finite(ddpm_step(sched, x_t, t, t - 1, e, clip_x0=True, generator=g).x_prev)


@SETTINGS
@given(step_inputs(), st.floats(0.0, 1e6), st.sampled_from(["clip", "dynamic"]))
def test_classifier_free_guidance_up_to_1e6_with_clipping_is_finite(inputs, scale, method):
    sched, x_t, t, t_prev, eps, g = inputs
    y = torch.randint(0, 3, (x_t.shape[0],), generator=g)
    other = torch.randn(eps.shape, generator=g, dtype=torch.float64).to(eps.dtype)

    def model(x, tt, labels):   # conditional rows see eps, null rows another prediction
        B = x.shape[0] // 2
        return torch.cat([eps, other])[:2 * B]

    e = threshold_eps(cfg_eps(model, scale, 3), sched, method)(x_t, t, y)
    assert _finite(e)
    assert _finite(ddim.ddim_step(sched, x_t, t, t_prev, e, clip_x0=True).x_prev)
