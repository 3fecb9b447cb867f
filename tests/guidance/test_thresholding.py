"""Thresholding the predicted x0 (Imagen, Saharia et al. 2022, sec. 2.3): clipping lands in
[-1, 1]; dynamic thresholding matches a hand computation and leaves in-range x0 alone; as a noise
predictor wrapper it thresholds the implied x0 and keeps v; with guidance scale 20 (CFG and
classifier guidance, DDPM and DDIM) sampling stays finite, and in [-1, 1] when thresholded."""
import pytest
import torch

from course_lib.diffusion import formulas, schedules
from course_lib.guidance import (cfg_eps, classifier_guided_eps, classifier_guided_mean, dynamic_threshold,
                                 static_threshold, threshold, threshold_eps)
from course_lib.samplers.ddim import ddim_step
from course_lib.samplers.ddpm import ddpm_step
from course_lib.samplers.loop import sample

K = 3
SHAPE = (1, 4, 4)


def test_clip_lands_in_minus_one_one():
    x0 = 5 * torch.randn(3, *SHAPE)
    out = threshold(x0, "clip")
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, static_threshold(x0))
    inside = x0.abs() <= 1
    assert torch.equal(out[inside], x0[inside])


def test_dynamic_threshold_by_hand():
    x0 = torch.tensor([[[[0.5, 3.0], [-2.0, 1.0]]],            # |x0| sorted: 0.5, 1, 2, 3
                       [[[0.2, -0.9], [0.5, 0.1]]]])           # inside [-1, 1]: left alone
    # the 75th percentile of 4 values sits at position 0.75 * 3 = 2.25: 2 + 0.25 * (3 - 2) = 2.25
    s = 2.25
    expected = torch.stack([torch.tensor([[[0.5, s], [-2.0, 1.0]]]) / s, x0[1]])
    torch.testing.assert_close(dynamic_threshold(x0, percentile=0.75), expected)
    # default p = 0.995: position 2.985 -> 2 + 0.985 = 2.985; 3.0 is clipped to it
    s = 2.985
    expected = torch.stack([torch.tensor([[[0.5, s], [-2.0, 1.0]]]) / s, x0[1]])
    torch.testing.assert_close(dynamic_threshold(x0), expected)


@pytest.mark.parametrize("method", ["clip", "dynamic"])
def test_in_range_x0_is_unchanged(method):
    x0 = torch.rand(4, *SHAPE) * 2 - 1
    assert torch.equal(threshold(x0, method), x0)


def test_dynamic_keeps_a_sample_with_a_few_outliers_near_the_clip():
    """Only the top 0.5% of |x0| sets s: one huge pixel among many in range is simply clipped."""
    x0 = torch.rand(1, 1, 20, 20) * 2 - 1
    x0[0, 0, 0, 0] = 50.0
    out = dynamic_threshold(x0)
    assert out.abs().max() <= 1 + 1e-6 and out[0, 0, 0, 0] > 0.9
    torch.testing.assert_close(out[0, 0, 1:], x0[0, 0, 1:] / out[0, 0, 0, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["clip", "dynamic"])
@pytest.mark.parametrize("learned", [False, True])
def test_threshold_eps_thresholds_the_implied_x0(method, learned):
    sched = schedules.schedule("linear", 50)
    x_t = torch.randn(4, *SHAPE, dtype=torch.float64)
    t = torch.tensor([0, 10, 25, 49])

    def wild(x, t, cond=None):                                  # implies x0 far outside [-1, 1]
        eps = -3 * x
        return torch.cat([eps, torch.full_like(eps, 0.7)], 1) if learned else eps
    out = threshold_eps(wild, sched, method)(x_t, t)
    eps, v = formulas.split_model_output(out, 1)
    raw_x0 = formulas.x0_from_eps(sched, x_t, t, wild(x_t, t)[:, :1])
    torch.testing.assert_close(formulas.x0_from_eps(sched, x_t, t, eps), threshold(raw_x0, method),
                               rtol=1e-9, atol=1e-9)
    if learned:
        assert torch.equal(v, torch.full_like(v, 0.7))


def test_threshold_eps_leaves_an_in_range_model_alone():
    sched = schedules.schedule("linear", 50)
    x0 = torch.rand(4, *SHAPE, dtype=torch.float64) * 1.8 - 0.9
    noise = torch.randn(4, *SHAPE, dtype=torch.float64)
    t = torch.tensor([0, 10, 25, 49])
    x_t = formulas.q_sample(sched, x0, t, noise)
    oracle = lambda x, t, cond=None: noise                      # the true eps: x0 is in range
    torch.testing.assert_close(threshold_eps(oracle, sched, "dynamic")(x_t, t), noise, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- large guidance weights

class LoudModel:
    """A class-conditional toy with large outputs: eps = 0.5 x + 4 offset[y] (null class: 0)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.offsets = 4 * torch.randn(K + 1, *SHAPE, generator=g)
        self.offsets[K] = 0

    def __call__(self, x_t, t, y=None):
        return 0.5 * x_t + self.offsets[y]


def _loud_classifier():
    W = 3 * torch.randn(K, SHAPE[0] * SHAPE[1] * SHAPE[2], generator=torch.Generator().manual_seed(1))
    return lambda x, t: x.flatten(1) @ W.T


def _guided(kind, sched):
    model = LoudModel()
    if kind == "cfg":
        return cfg_eps(model, 20.0, K)
    wrap = classifier_guided_eps if kind == "classifier-eps" else classifier_guided_mean
    return wrap(model, _loud_classifier(), sched, 20.0)


@pytest.mark.parametrize("kind", ["cfg", "classifier-eps", "classifier-mean"])
@pytest.mark.parametrize("step", [ddpm_step, ddim_step])
@pytest.mark.parametrize("method", [None, "clip", "dynamic"])
def test_scale_20_stays_finite(kind, step, method):
    sched = schedules.schedule("linear", 20)
    guided = _guided(kind, sched)
    if method is not None:
        guided = threshold_eps(guided, sched, method)
    y = torch.arange(6) % K
    x = sample(guided, sched, (6, *SHAPE), step=step, cond=y, clip_x0=False, progress=False,
               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    if method is not None:
        assert x.abs().max() <= 1 + 1e-4                         # the last step returns the thresholded x0
    else:
        assert x.abs().max() > 1                                 # unthresholded, the samples leave [-1, 1]


def test_bad_input_fails_clearly():
    sched = schedules.schedule("linear", 10)
    x0 = torch.randn(2, *SHAPE)
    with pytest.raises(ValueError, match="unknown thresholding method"):
        threshold(x0, "static")
    with pytest.raises(ValueError, match="unknown thresholding method"):
        threshold_eps(LoudModel(), sched, "percentile")
    with pytest.raises(ValueError, match="fraction"):
        dynamic_threshold(x0, percentile=99.5)
    with pytest.raises(ValueError, match="fraction"):
        threshold_eps(LoudModel(), sched, "dynamic", percentile=0.0)
    with pytest.raises(ValueError, match="lie in"):
        threshold_eps(lambda x, t, c=None: x, sched, "clip")(x0, torch.full((2,), 10))


@pytest.mark.parametrize("method", ["clip", "dynamic"])
def test_only_below_skips_the_steps_at_and_above_it(method):
    sched = schedules.schedule("linear", 50)
    x_t = torch.randn(4, *SHAPE, dtype=torch.float64)
    t = torch.tensor([49, 48, 10, 49])

    def wild(x, t, cond=None):                                  # implies x0 far outside [-1, 1]
        return torch.cat([-3 * x, torch.full_like(x, 0.7)], 1)
    everywhere = threshold_eps(wild, sched, method)(x_t, t)
    out = threshold_eps(wild, sched, method, only_below=49)(x_t, t)
    raw = wild(x_t, t)
    skipped = t >= 49
    assert torch.equal(out[skipped], raw[skipped])              # t = 49: untouched, v included
    torch.testing.assert_close(out[~skipped], everywhere[~skipped], rtol=0, atol=0)
    assert not torch.allclose(everywhere[skipped], raw[skipped])  # (thresholding would have changed them)
    torch.testing.assert_close(threshold_eps(wild, sched, method, only_below=50)(x_t, t), everywhere, rtol=0, atol=0)


def test_only_below_bad_input_fails_clearly():
    sched = schedules.schedule("linear", 10)
    with pytest.raises(ValueError, match=r"1\.\.10"):
        threshold_eps(LoudModel(), sched, "clip", only_below=0)
    with pytest.raises(ValueError, match=r"1\.\.10"):
        threshold_eps(LoudModel(), sched, "clip", only_below=11)
    with pytest.raises(TypeError, match="only_below"):
        threshold_eps(LoudModel(), sched, "clip", only_below=9.5)
