"""Lesson 02's checkers accept right answers (written in several styles) and name each typical
slip, written here the way a learner would write it, not copied from the checker's catalogue."""
import pytest
import torch

from course_lib.diffusion import formulas
from course_lib.exercises import Verdict
from course_lib.exercises import ddpm as ex
from course_lib.samplers.ddpm import ddpm_step


def _b(v, x):
    return v.to(x.dtype).view(-1, 1, 1, 1)


# ---- Exercise 1: posterior mean -------------------------------------------------------------

def posterior_right(s, x0, x_t, t):
    ab, ab_prev, a, b = _b(s.alpha_bar[t], x0), _b(s.alpha_bar_prev[t], x0), _b(s.alphas[t], x0), _b(s.betas[t], x0)
    return ab_prev.sqrt() * b / (1 - ab) * x0 + a.sqrt() * (1 - ab_prev) / (1 - ab) * x_t


def posterior_by_cat(s, x0, x_t, t):
    # builds alpha_bar_{t-1} itself from alpha_bar, in float64, and returns float64
    prev = torch.cat([torch.ones(1, dtype=torch.float64), s.alpha_bar[:-1]])[t][:, None, None, None]
    ab, b = s.alpha_bar[t][:, None, None, None], s.betas[t][:, None, None, None]
    return (prev.sqrt() * b * x0 + (1 - b).sqrt() * (1 - prev) * x_t) / (1 - ab)


def posterior_swapped(s, x0, x_t, t):
    ab, ab_prev, a, b = _b(s.alpha_bar[t], x0), _b(s.alpha_bar_prev[t], x0), _b(s.alphas[t], x0), _b(s.betas[t], x0)
    return ab_prev.sqrt() * b / (1 - ab) * x_t + a.sqrt() * (1 - ab_prev) / (1 - ab) * x0


def posterior_one_step_alpha(s, x0, x_t, t):
    ab, ab_prev, a, b = _b(s.alpha_bar[t], x0), _b(s.alpha_bar_prev[t], x0), _b(s.alphas[t], x0), _b(s.betas[t], x0)
    a_prev = _b(s.alphas[(t - 1).clamp(min=0)], x0)
    return ab_prev.sqrt() * b / (1 - ab) * x0 + a.sqrt() * (1 - a_prev) / (1 - ab) * x_t


def posterior_off_by_one(s, x0, x_t, t):
    ab, a, b = _b(s.alpha_bar[t], x0), _b(s.alphas[t], x0), _b(s.betas[t], x0)
    return ab.sqrt() * b / (1 - ab) * x0 + a.sqrt() * (1 - ab) / (1 - ab) * x_t


def posterior_no_sqrt_prev(s, x0, x_t, t):
    ab, ab_prev, a, b = _b(s.alpha_bar[t], x0), _b(s.alpha_bar_prev[t], x0), _b(s.alphas[t], x0), _b(s.betas[t], x0)
    return ab_prev * b / (1 - ab) * x0 + a.sqrt() * (1 - ab_prev) / (1 - ab) * x_t


def posterior_no_reshape(s, x0, x_t, t):
    ab, ab_prev, a, b = s.alpha_bar[t], s.alpha_bar_prev[t], s.alphas[t], s.betas[t]
    return ab_prev.sqrt() * b / (1 - ab) * x0 + a.sqrt() * (1 - ab_prev) / (1 - ab) * x_t


@pytest.mark.parametrize("fn", [posterior_right, posterior_by_cat, ex.posterior_mean_reference])
def test_posterior_mean_accepts_right_answers(fn):
    verdict = ex.check_posterior_mean(fn)
    assert isinstance(verdict, Verdict) and verdict.ok, verdict.message
    assert str(verdict).startswith("Correct!")


@pytest.mark.parametrize("fn, named", [
    (posterior_swapped, "swapped"),
    (posterior_one_step_alpha, "1 - alpha_{t-1} (one step)"),
    (posterior_off_by_one, "off by one"),
    (posterior_no_sqrt_prev, "square root on alpha_bar_{t-1}"),
    (lambda s, x0, x_t, t: posterior_right(s, x0, x_t, t) - posterior_right(s, torch.zeros_like(x0), x_t, t),
     "only the x0 term"),
    (posterior_no_reshape, "(B, 1, 1, 1)"),
    (lambda s, x0, x_t, t: None, "return"),
])
def test_posterior_mean_names_each_mistake(fn, named):
    verdict = ex.check_posterior_mean(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_the_swapped_coefficients_fail_the_t1_sanity_check():
    """The hint's sanity check holds: at code index t = 0 the posterior mean is x0 itself."""
    s = ex._schedules()[1]
    x0, x_t, _ = ex._images(0, 2)
    t = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(ex.posterior_mean_reference(s, x0, x_t, t), x0)
    assert not torch.allclose(posterior_swapped(s, x0, x_t, t), x0)


# ---- Exercise 2: one ancestral step -----------------------------------------------------------

def step_right(s, x_t, t, eps, z):
    a, ab, b = _b(s.alphas[t], x_t), _b(s.alpha_bar[t], x_t), _b(s.betas[t], x_t)
    mean = (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt()
    return torch.where(_b(t, x_t) > 0, mean + b.sqrt() * z, mean)


def step_via_x0(s, x_t, t, eps, z):
    """The library's route: predict x0, take the posterior mean at it (no clipping), add sigma_t z."""
    return ddpm_step(s, x_t, t, t - 1, eps, variance="large", clip_x0=False, noise=z).x_prev


def step_variance_not_std(s, x_t, t, eps, z):
    a, ab, b = _b(s.alphas[t], x_t), _b(s.alpha_bar[t], x_t), _b(s.betas[t], x_t)
    mean = (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt()
    return torch.where(_b(t, x_t) > 0, mean + b * z, mean)


def step_noise_everywhere(s, x_t, t, eps, z):
    a, ab, b = _b(s.alphas[t], x_t), _b(s.alpha_bar[t], x_t), _b(s.betas[t], x_t)
    return (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt() + b.sqrt() * z


def step_paper_t1(s, x_t, t, eps, z):
    # reads "if t > 1" from the paper literally, with code indices: keeps noise at code t = 1 too
    a, ab, b = _b(s.alphas[t], x_t), _b(s.alpha_bar[t], x_t), _b(s.betas[t], x_t)
    mean = (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt()
    return torch.where(_b(t, x_t) > 1, mean + b.sqrt() * z, mean)


def step_small_variance(s, x_t, t, eps, z):
    return ddpm_step(s, x_t, t, t - 1, eps, variance="small", clip_x0=False, noise=z).x_prev


def step_no_sqrt_in_coef(s, x_t, t, eps, z):
    a, ab, b = _b(s.alphas[t], x_t), _b(s.alpha_bar[t], x_t), _b(s.betas[t], x_t)
    mean = (x_t - b / (1 - ab) * eps) / a.sqrt()
    return torch.where(_b(t, x_t) > 0, mean + b.sqrt() * z, mean)


def step_alpha_bar(s, x_t, t, eps, z):
    a, ab, b = _b(s.alphas[t], x_t), _b(s.alpha_bar[t], x_t), _b(s.betas[t], x_t)
    mean = (x_t - b / (1 - ab).sqrt() * eps) / ab.sqrt()
    return torch.where(_b(t, x_t) > 0, mean + b.sqrt() * z, mean)


def step_clipped(s, x_t, t, eps, z):
    return ddpm_step(s, x_t, t, t - 1, eps, variance="large", clip_x0=True, noise=z).x_prev


@pytest.mark.parametrize("fn", [step_right, step_via_x0, ex.ancestral_step_reference])
def test_ancestral_step_accepts_right_answers(fn):
    verdict = ex.check_ancestral_step(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (step_variance_not_std, "sqrt was forgotten"),
    (step_noise_everywhere, "noise was added at the last step"),
    (step_small_variance, "small variance"),
    (step_no_sqrt_in_coef, "a square root is missing"),
    (step_alpha_bar, "divided by sqrt(alpha_bar_t)"),
    (lambda s, x_t, t, eps, z: step_right(s, x_t, t, -eps, z), "must be subtracted"),
])
def test_ancestral_step_names_each_mistake(fn, named):
    verdict = ex.check_ancestral_step(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


@pytest.mark.parametrize("fn", [step_paper_t1, step_clipped])
def test_ancestral_step_rejects_near_misses(fn):
    """Off-by-one on where the noise stops, and clipping x0 (not part of Algorithm 2), are rejected."""
    assert not ex.check_ancestral_step(fn).ok


# ---- Exercise 3: L_simple -------------------------------------------------------------------

def loss_right(eps_fn, s, x0, t, noise):
    ab = _b(s.alpha_bar[t], x0)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return ((noise - eps_fn(x_t, t)) ** 2).mean(dim=(1, 2, 3))


def loss_with_library(eps_fn, s, x0, t, noise):
    return torch.nn.functional.mse_loss(eps_fn(formulas.q_sample(s, x0, t, noise), t), noise,
                                        reduction="none").flatten(1).mean(1)


def loss_fed_x0(eps_fn, s, x0, t, noise):
    return ((noise - eps_fn(x0, t)) ** 2).mean(dim=(1, 2, 3))


def loss_target_x0(eps_fn, s, x0, t, noise):
    ab = _b(s.alpha_bar[t], x0)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return ((x0 - eps_fn(x_t, t)) ** 2).mean(dim=(1, 2, 3))


def loss_summed(eps_fn, s, x0, t, noise):
    ab = _b(s.alpha_bar[t], x0)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return ((noise - eps_fn(x_t, t)) ** 2).sum(dim=(1, 2, 3))


def loss_alpha_t(eps_fn, s, x0, t, noise):
    a = _b(s.alphas[t], x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return ((noise - eps_fn(x_t, t)) ** 2).mean(dim=(1, 2, 3))


def loss_batch_mean(eps_fn, s, x0, t, noise):
    return loss_right(eps_fn, s, x0, t, noise).mean()


def loss_per_pixel(eps_fn, s, x0, t, noise):
    ab = _b(s.alpha_bar[t], x0)
    return (noise - eps_fn(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t)) ** 2


@pytest.mark.parametrize("fn", [loss_right, loss_with_library, ex.simple_loss_reference])
def test_simple_loss_accepts_right_answers(fn):
    verdict = ex.check_simple_loss(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (loss_fed_x0, "you fed x0 to the model"),
    (loss_target_x0, "compared the model's output with x0"),
    (loss_summed, "summed the squared error"),
    (lambda f, s, x0, t, e: (e - f(formulas.q_sample(s, x0, t, e), t)).abs().mean(dim=(1, 2, 3)), "not squared"),
    (loss_alpha_t, "alpha_t (one step)"),
    (loss_batch_mean, "one number for the whole batch"),
    (loss_per_pixel, "per pixel"),
])
def test_simple_loss_names_each_mistake(fn, named):
    verdict = ex.check_simple_loss(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_toy_eps_fn_depends_on_its_inputs():
    """The stand-in network must tell x0 from x_t and one t from another, or slips would pass."""
    x = torch.randn(2, 1, 6, 5)
    assert not torch.allclose(ex.toy_eps_fn(x, torch.tensor([0, 0])), ex.toy_eps_fn(x, torch.tensor([500, 500])))
    assert not torch.allclose(ex.toy_eps_fn(x, torch.tensor([3, 3])), ex.toy_eps_fn(2 * x, torch.tensor([3, 3])))


def test_an_exception_in_the_learners_code_is_reported_not_raised():
    def broken(s, x_t, t, eps, z):
        raise KeyError("oops")
    verdict = ex.check_ancestral_step(broken)
    assert not verdict.ok and "KeyError" in verdict.message


@pytest.mark.parametrize("check, catalogue", [
    (ex.check_posterior_mean, ex._posterior_mistakes),
    (ex.check_ancestral_step, ex._step_mistakes),
    (ex.check_simple_loss, ex._simple_loss_mistakes),
])
def test_every_catalogued_slip_is_told_apart_from_the_others(check, catalogue):
    """No slip in a checker's catalogue is shadowed by an earlier one: each is named as itself."""
    for description, slip in catalogue().items():
        verdict = check(slip)
        assert not verdict.ok and description in verdict.message, (description, verdict.message)
