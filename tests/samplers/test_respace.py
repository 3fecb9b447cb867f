"""Respacing: a K-step schedule that keeps alpha_bar at the chosen steps."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from course_lib.diffusion import schedules
from course_lib.samplers import respace


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_all_steps_reproduce_the_schedule(name):
    sched = schedules.schedule(name, 100)
    spaced = respace.respace(sched, torch.arange(100))
    assert spaced.schedule.T == 100 and torch.equal(spaced.timesteps, torch.arange(100))
    for field in ("betas", "alphas", "alpha_bar", "alpha_bar_prev"):
        torch.testing.assert_close(getattr(spaced.schedule, field), getattr(sched, field), rtol=1e-9, atol=1e-12)


def test_subset_keeps_alpha_bar_and_rebuilds_betas():
    sched = schedules.schedule("cosine", 100)
    kept = torch.tensor([0, 9, 40, 41, 99])
    spaced = respace.respace(sched, kept)
    torch.testing.assert_close(spaced.schedule.alpha_bar, sched.alpha_bar[kept], rtol=1e-9, atol=0)
    # beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}: the product of the skipped alphas
    for i in range(1, 5):
        skipped = sched.alphas[kept[i - 1] + 1: kept[i] + 1].prod()
        torch.testing.assert_close(spaced.schedule.betas[i], 1 - skipped)
    torch.testing.assert_close(spaced.schedule.betas[0], sched.betas[0])


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 1000), st.data())
def test_even_timesteps(T, data):
    K = data.draw(st.integers(2, T))
    ts = respace.even_timesteps(T, K)
    assert ts.dtype == torch.long and ts.shape == (K,)
    assert ts[0] == 0 and ts[-1] == T - 1
    assert bool((ts.diff() > 0).all())
    gaps = ts.diff().float()
    assert gaps.max() - gaps.min() <= 1  # even: the gaps differ by at most one step


def test_even_timesteps_errors():
    for T, K in [(10, 0), (10, 11), (0, 0)]:
        with pytest.raises(ValueError, match="1 <= K <= T"):
            respace.even_timesteps(T, K)


def test_respaced_model_maps_indices_to_original_steps():
    seen = []

    def eps_fn(x, t, cond):
        seen.append((t.clone(), cond))
        return x + t.float()[:, None]

    timesteps = torch.tensor([0, 10, 50, 99])
    wrapped = respace.respaced_model(eps_fn, timesteps)
    out = wrapped(torch.zeros(3, 1), torch.tensor([3, 0, 2]), "label")
    assert torch.equal(seen[0][0], torch.tensor([99, 0, 50])) and seen[0][1] == "label"
    torch.testing.assert_close(out, torch.tensor([[99.0], [0.0], [50.0]]))


@pytest.mark.parametrize("bad,match", [([], "non-empty"), ([0, 100], "subset"), ([-1, 3], "subset"),
                                        ([3, 2], "increasing"), ([2, 2], "increasing")])
def test_respace_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        respace.respace(schedules.schedule("linear", 100), torch.tensor(bad, dtype=torch.long))
