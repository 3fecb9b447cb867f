"""Lesson 06's checkers (course_lib.exercises.clip) accept right answers (written several ways) and name
each typical slip, written here the way a learner would write it, not copied from the checker's catalogue."""
import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.diffusion import formulas
from course_lib.exercises import Verdict
from course_lib.exercises import clip as ex
from course_lib.guidance import clip as guidance_clip
from course_lib.models.clip import contrastive_loss


def _b(v, x):
    return v.to(x.dtype).view(-1, 1, 1, 1)


def assert_close(actual, expected, rtol=1e-5, atol=1e-8):
    """torch.allclose with a message (torch.testing.assert_close's first call costs about a second)."""
    assert actual.shape == expected.shape and torch.allclose(actual.double(), expected.double(), rtol=rtol,
                                                            atol=atol), (actual, expected)


def broken(*args):
    raise KeyError("oops")


# ---- Exercise 1: CLIP's symmetric InfoNCE -----------------------------------------------------

def nce_right(image_emb, text_emb, logit_scale):
    i = image_emb / image_emb.norm(dim=-1, keepdim=True)
    t = text_emb / text_emb.norm(dim=-1, keepdim=True)
    logits = logit_scale.exp().clamp(max=100) * i @ t.T
    labels = torch.arange(len(i))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def nce_by_log_softmax(image_emb, text_emb, logit_scale):
    """By hand: the diagonal of the row-wise and the column-wise log-softmax."""
    i, t = F.normalize(image_emb, dim=1), F.normalize(text_emb, dim=1)
    logits = torch.clamp(logit_scale, max=math.log(100)).exp() * (i @ t.T)
    rows = -logits.log_softmax(dim=1).diagonal().mean()
    cols = -logits.log_softmax(dim=0).diagonal().mean()
    return 0.5 * (rows + cols)


def nce_in_place(image_emb, text_emb, logit_scale):
    """Normalises its arguments in place: the checker must not be fooled by it."""
    image_emb /= image_emb.norm(dim=-1, keepdim=True)
    text_emb /= text_emb.norm(dim=-1, keepdim=True)
    return nce_right(image_emb, text_emb, logit_scale).item()


def nce_captions_first(image_emb, text_emb, logit_scale):
    """The roles of images and captions swapped throughout: the symmetric loss does not change."""
    return nce_right(text_emb, image_emb, logit_scale)


def nce_with(*, norm=lambda x: F.normalize(x, dim=-1), scale=lambda ls: ls.exp().clamp(max=100),
             labels=torch.arange, rows=True, cols=True, reduction="mean", average=True):
    def fn(image_emb, text_emb, logit_scale):
        logits = scale(logit_scale) * norm(image_emb) @ norm(text_emb).T
        y = labels(len(image_emb))
        terms = ([F.cross_entropy(logits, y, reduction=reduction)] if rows else []) + \
                ([F.cross_entropy(logits.T, y, reduction=reduction)] if cols else [])
        return sum(terms) / (len(terms) if average else 1)
    return fn


def nce_wrong_axis_both(image_emb, text_emb, logit_scale):
    """The softmax over the wrong axis in both directions: both terms normalise over the images."""
    i, t = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * i @ t.T
    rows = -logits.log_softmax(dim=0).diagonal().mean()           # images -> captions, over the wrong axis
    cols = -logits.T.log_softmax(dim=1).diagonal().mean()         # captions -> images, over the wrong axis
    return (rows + cols) / 2


@pytest.mark.parametrize("fn", [nce_right, nce_by_log_softmax, nce_in_place, nce_captions_first,
                                ex.info_nce_reference])
def test_info_nce_accepts_right_answers(fn):
    verdict = ex.check_info_nce(fn)
    assert isinstance(verdict, Verdict) and verdict.ok, verdict.message
    assert str(verdict).startswith("Correct!")


@pytest.mark.parametrize("fn, named", [
    (nce_with(norm=lambda x: x), "not normalised"),
    (nce_with(norm=lambda x: x / x.norm(dim=0, keepdim=True)), "normalised over the batch (dim=0)"),
    (nce_with(norm=lambda x: x / x.norm()), "one norm of the whole batch"),
    (nce_with(cols=False), "only one direction, images -> captions"),
    (nce_with(rows=False), "only one direction, captions -> images"),
    (nce_wrong_axis_both, "the same axis"),
    (nce_with(scale=lambda ls: ls), "logit_scale is used raw"),
    (nce_with(scale=lambda ls: 1.0), "the temperature is missing"),
    (lambda i, t, ls: nce_with(scale=lambda _: 1.0)(i / ls.exp(), t, ls), "the temperature is missing"),
    (nce_with(scale=lambda ls: 1 / ls.exp()), "divided by exp(logit_scale)"),
    (nce_with(scale=lambda ls: ls.exp()), "not clipped at 100"),
    (nce_with(reduction="sum"), "summed over the batch"),
    (nce_with(average=False), "the two directions are added"),
    (nce_with(labels=lambda b: torch.arange(b - 1, -1, -1)), "not reversed"),
    (nce_with(labels=lambda b: torch.zeros(b, dtype=torch.long)), "not all 0"),
    (lambda i, t, ls: -nce_right(i, t, ls), "the sign is flipped"),
    (lambda i, t, ls: nce_with(reduction="none")(i, t, ls), "one value per pair"),
    (lambda i, t, ls: ls.exp() * F.normalize(i, dim=-1) @ F.normalize(t, dim=-1).T, "shape (B, B)"),
    (lambda i, t, ls: nce_right(i, t, ls).reshape(1), "return one number"),
    (lambda i, t, ls: nce_right(i, t, ls) * float("nan"), "NaN"),
    (lambda i, t, ls: None, "return"),
    (broken, "raised KeyError"),
])
def test_info_nce_names_each_mistake(fn, named):
    verdict = ex.check_info_nce(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_info_nce_softmax_before_cross_entropy_is_named():
    def fn(i, t, ls):
        logits = ls.exp().clamp(max=100) * F.normalize(i, dim=-1) @ F.normalize(t, dim=-1).T
        y = torch.arange(len(i))
        return (F.cross_entropy(logits.softmax(-1), y) + F.cross_entropy(logits.T.softmax(-1), y)) / 2
    verdict = ex.check_info_nce(fn)
    assert not verdict.ok and "a softmax is applied before F.cross_entropy" in verdict.message, verdict.message


@pytest.mark.parametrize("k", range(4))
def test_info_nce_reference_is_the_librarys_contrastive_loss(k):
    args = ex._info_nce_inputs()[k]
    assert_close(ex.info_nce_reference(*args), contrastive_loss(*args).double(), rtol=1e-5)


def test_info_nce_when_nothing_tells_the_pairs_apart_is_chance():
    """All images alike and all captions alike: each softmax is uniform over the B candidates, loss log B."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 7, generator=g, dtype=torch.float64), torch.randn(1, 7, generator=g, dtype=torch.float64)
    loss = ex.info_nce_reference(img.expand(6, 7), txt.expand(6, 7), torch.tensor(2.0))
    assert_close(loss, torch.tensor(math.log(6), dtype=torch.float64))


def test_info_nce_of_matched_orthogonal_pairs_falls_with_the_scale():
    """Image i = caption i, all pairs orthogonal: the loss is log(1 + (B - 1) e^-s), s = exp(logit_scale)."""
    emb = torch.eye(4, 7, dtype=torch.float64) * 3.0
    for logit_scale in (0.0, 1.0, 2.5):
        s = math.exp(logit_scale)
        expected = torch.tensor(math.log(1 + 3 * math.exp(-s)), dtype=torch.float64)
        assert_close(ex.info_nce_reference(emb, emb, torch.tensor(logit_scale)), expected)


# ---- Exercise 2: the CLIP-guided eps ----------------------------------------------------------

def eps_right(s, x_t, t, eps, grad, scale):
    return eps - scale * _b(1 - s.alpha_bar[t], x_t).sqrt() * grad


def eps_with_extract(s, x_t, t, eps, grad, scale):
    return eps - scale * formulas.extract((1 - s.alpha_bar).sqrt(), t, x_t) * grad


def eps_via_score(s, x_t, t, eps, grad, scale):
    """Through the score: eps -> score, add s grad (f . g), score -> eps."""
    std = (1 - s.alpha_bar[t]).sqrt()[:, None, None, None]
    return -std * (-eps / std + scale * grad)


def eps_with(coef, sign=-1):
    """eps + sign * scale * coef(schedule, t) * grad, written as a learner would slip."""
    def fn(s, x_t, t, eps, grad, scale):
        return eps + sign * scale * _b(coef(s, t), x_t) * grad
    return fn


@pytest.mark.parametrize("fn", [eps_right, eps_with_extract, eps_via_score, ex.clip_guided_eps_reference])
def test_clip_guided_eps_accepts_right_answers(fn):
    verdict = ex.check_clip_guided_eps(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (eps_with(lambda s, t: (1 - s.alpha_bar[t]).sqrt(), sign=1), "the sign is flipped"),
    (eps_with(lambda s, t: s.alpha_bar[t].sqrt()), "you used sqrt(alpha_bar_t)"),
    (eps_with(lambda s, t: 1 - s.alpha_bar[t]), "the square root is missing"),
    (lambda s, x_t, t, eps, g, scale: eps - scale * g / _b(1 - s.alpha_bar[t], x_t).sqrt(), "divided the gradient"),
    (lambda s, x_t, t, eps, g, scale: eps - _b(1 - s.alpha_bar[t], x_t).sqrt() * g, "the scale s is missing"),
    (eps_with(lambda s, t: (1 - s.alpha_bar[t + 1]).sqrt()), "alpha_bar at t + 1"),
    (eps_with(lambda s, t: (1 - s.alpha_bar[t - 1]).sqrt()), "alpha_bar at t - 1"),
    (eps_with(lambda s, t: (1 - s.alpha_bar_prev[t]).sqrt()), "alpha_bar at t - 1"),
    (eps_with(lambda s, t: s.betas[t].sqrt()), "sqrt(beta_t)"),
    (eps_with(lambda s, t: s.betas[t]), "beta_t, one step's variance"),
    (eps_with(lambda s, t: (1 - s.betas[t]).sqrt()), "sqrt(1 - beta_t) = sqrt(alpha_t)"),
    (lambda s, x_t, t, eps, g, scale: x_t - scale * _b(1 - s.alpha_bar[t], x_t).sqrt() * g, "started from x_t"),
    (lambda s, x_t, t, eps, g, scale: eps - scale * (1 - s.alpha_bar[t]).sqrt() * g, "(B, 1, 1, 1)"),
    (lambda s, x_t, t, eps, g, scale: eps_right(s, x_t, t, eps, g, scale)[:, 0], "shape"),
    (lambda s, x_t, t, eps, g, scale: eps_right(s, x_t, t, eps, g, scale) / 0 * 0, "NaN"),
    (lambda s, x_t, t, eps, g, scale: None, "return"),
    (broken, "raised KeyError"),
])
def test_clip_guided_eps_names_each_mistake(fn, named):
    verdict = ex.check_clip_guided_eps(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_clip_guided_eps_off_by_one_that_raises_gets_the_index_hint():
    def fn(s, x_t, t, eps, g, scale):          # right on the first input, reads past the end at t = 999
        if 999 not in t:
            return eps_right(s, x_t, t, eps, g, scale)
        return eps - scale * _b(1 - s.alpha_bar[t + 1], x_t).sqrt() * g
    verdict = ex.check_clip_guided_eps(fn)
    assert not verdict.ok and "is t off by one?" in verdict.message, verdict.message


def test_clip_guided_eps_at_scale_zero_is_the_models_eps():
    x_t, eps, g = ex._images(0, 3)
    assert_close(ex.clip_guided_eps_reference(ex._cosine(), x_t, torch.tensor([0, 500, 999]), eps, g, 0.0), eps)


# ---- Exercise 3: the x0 form's gradient, eps held fixed ---------------------------------------

def x0_right(s, t, grad_x0, like):
    return grad_x0 / s.alpha_bar[t].sqrt().view(-1, 1, 1, 1).to(like.dtype)


def x0_with_extract(s, t, grad_x0, like):
    return grad_x0 * formulas.extract(s.alpha_bar.rsqrt(), t, like)


def x0_by_autograd(s, t, grad_x0, like):
    """The chain rule done by autograd: differentiate <grad_x0, x0(x_t)> with eps a constant."""
    a = _b(s.alpha_bar[t], like)
    x_t = like.detach().clone().requires_grad_(True)
    eps = torch.zeros_like(like)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    (g,) = torch.autograd.grad((x0 * grad_x0).sum(), x_t)
    return g


def x0_with(coef):
    def fn(s, t, grad_x0, like):
        return grad_x0 * _b(coef(s, t), like)
    return fn


@pytest.mark.parametrize("fn", [x0_right, x0_with_extract, x0_by_autograd, ex.x0_gradient_reference])
def test_x0_gradient_accepts_right_answers(fn):
    verdict = ex.check_x0_gradient(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (x0_with(lambda s, t: s.alpha_bar[t].sqrt()), "you multiplied by sqrt(alpha_bar_t)"),
    (lambda s, t, g, like: g / _b(s.alpha_bar[t], like), "the square root is missing"),
    (lambda s, t, g, like: g, "the chain-rule factor is missing"),
    (lambda s, t, g, like: g / _b(1 - s.alpha_bar[t], like).sqrt(), "you divided by sqrt(1 - alpha_bar_t)"),
    (x0_with(lambda s, t: (1 - s.alpha_bar[t]).sqrt()), "you multiplied by sqrt(1 - alpha_bar_t)"),
    (lambda s, t, g, like: -x0_right(s, t, g, like), "the sign is flipped"),
    (x0_with(lambda s, t: 1 / s.alphas[t].sqrt()), "sqrt(alpha_t) = sqrt(1 - beta_t)"),
    (x0_with(lambda s, t: 1 / s.alpha_bar[t + 1].sqrt()), "alpha_bar at t + 1"),
    (x0_with(lambda s, t: 1 / s.alpha_bar[t - 1].sqrt()), "alpha_bar at t - 1"),
    (lambda s, t, g, like: g / s.alpha_bar[t].sqrt(), "(B, 1, 1, 1)"),
    (lambda s, t, g, like: x0_right(s, t, g, like).flatten(1), "shape"),
    (lambda s, t, g, like: g / _b(s.alpha_bar[t] - s.alpha_bar[t], like), "NaN or inf"),
    (lambda s, t, g, like: None, "return"),
    (broken, "raised KeyError"),
])
def test_x0_gradient_names_each_mistake(fn, named):
    verdict = ex.check_x0_gradient(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


class _ToyClip:
    """A 'CLIP' whose image tower is a fixed linear map then a normalisation, (B, 3, 4, 4) -> (B, 5)."""

    def __init__(self):
        self.A = torch.randn(48, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def encode_image(self, x):
        return F.normalize(x.flatten(1) @ self.A, dim=-1)


def test_x0_gradient_reference_is_the_chain_rule_of_the_librarys_x0_form():
    """guidance.clip.clip_guided_eps(form="x0", through_model=False) moves eps by s sqrt(1 - alpha_bar_t)
    times the reference applied to the similarity's gradient at x0. (Not at t = 999: the library reads
    alpha_bar in float32 there, and its x0 = (x_t - ...) / 5e-5 carries that rounding 2e4 times over.)"""
    s, clip = ex._cosine(), _ToyClip()
    g = torch.Generator().manual_seed(8)
    t = torch.tensor([0, 300, 900])
    x0 = 0.8 * torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64) - 0.4     # inside the clamp to [-1, 1]
    eps = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    text = F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=-1)
    x_t = formulas.extract(s.alpha_bar.sqrt(), t, x0) * x0 + formulas.extract((1 - s.alpha_bar).sqrt(), t, x0) * eps
    guided = guidance_clip.clip_guided_eps(lambda x, t, c: eps, clip, s, 2.0, form="x0", through_model=False)
    grad_x0 = guidance_clip.similarity_grad(clip.encode_image, x0, text)
    expected = ex.clip_guided_eps_reference(s, x_t, t, eps, ex.x0_gradient_reference(s, t, grad_x0, x_t), 2.0)
    assert_close(guided(x_t, t, text), expected, rtol=1e-3, atol=1e-4)


# ---- all checkers -----------------------------------------------------------------------------

@pytest.mark.parametrize("check, catalogue", [
    (ex.check_info_nce, ex._info_nce_mistakes),
    (ex.check_clip_guided_eps, ex._clip_eps_mistakes),
    (ex.check_x0_gradient, ex._x0_grad_mistakes),
])
def test_every_catalogued_slip_is_told_apart_from_the_others(check, catalogue):
    """No slip in a checker's catalogue is shadowed by an earlier one: each is named as itself."""
    for description, slip in catalogue().items():
        verdict = check(slip)
        assert not verdict.ok and description in verdict.message, (description, verdict.message)
