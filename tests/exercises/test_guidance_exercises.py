"""Lessons 04 and 05's checkers accept right answers (written in several styles) and name each
typical slip, written here the way a learner would write it, not copied from the checker's catalogue."""
import math

import pytest
import torch

from course_lib.diffusion import formulas
from course_lib.exercises import Verdict
from course_lib.exercises import guidance as ex
from course_lib.guidance import cfg, classifier


def _b(v, x):
    return v.to(x.dtype).view(-1, 1, 1, 1)


def assert_close(actual, expected):
    """torch.allclose with a message (torch.testing.assert_close's first call costs about a second)."""
    assert actual.shape == expected.shape and torch.allclose(actual.double(), expected.double()), (actual, expected)


def broken(*args):
    raise KeyError("oops")


# ---- Exercise 1: the guided eps, D&N eq. (14) -------------------------------------------------

def eps_right(s, x_t, t, eps, grad, scale):
    return eps - scale * _b(1 - s.alpha_bar[t], x_t).sqrt() * grad


def eps_with_extract(s, x_t, t, eps, grad, scale):
    return eps - scale * formulas.extract((1 - s.alpha_bar).sqrt(), t, x_t) * grad


def eps_via_score(s, x_t, t, eps, grad, scale):
    """Through the score, as the lesson derives it: eps -> score, add s g, score -> eps."""
    std = (1 - s.alpha_bar[t]).sqrt()[:, None, None, None]
    score = -eps / std + scale * grad
    return -std * score


def eps_with(coef, sign=-1):
    """eps + sign * scale * coef(schedule, t) * grad, written as a learner would slip."""
    def fn(s, x_t, t, eps, grad, scale):
        return eps + sign * scale * _b(coef(s, t), x_t) * grad
    return fn


@pytest.mark.parametrize("fn", [eps_right, eps_with_extract, eps_via_score, ex.guided_eps_reference])
def test_guided_eps_accepts_right_answers(fn):
    verdict = ex.check_guided_eps(fn)
    assert isinstance(verdict, Verdict) and verdict.ok, verdict.message
    assert str(verdict).startswith("Correct!")


@pytest.mark.parametrize("fn, named", [
    (eps_with(lambda s, t: (1 - s.alpha_bar[t]).sqrt(), sign=1), "the sign is flipped"),
    (eps_with(lambda s, t: 1 - s.alpha_bar[t]), "the square root is missing"),
    (eps_with(lambda s, t: s.alpha_bar[t].sqrt()), "you used sqrt(alpha_bar_t)"),
    (lambda s, x_t, t, eps, g, scale: eps - scale * g / _b(1 - s.alpha_bar[t], x_t).sqrt(), "divided the gradient"),
    (lambda s, x_t, t, eps, g, scale: eps - _b(1 - s.alpha_bar[t], x_t).sqrt() * g, "the scale s is missing"),
    (eps_with(lambda s, t: (1 - s.alpha_bar[t + 1]).sqrt()), "alpha_bar at t + 1"),
    (eps_with(lambda s, t: (1 - s.alpha_bar[t - 1]).sqrt()), "alpha_bar at t - 1"),
    (eps_with(lambda s, t: (1 - s.alpha_bar_prev[t]).sqrt()), "alpha_bar at t - 1"),
    (eps_with(lambda s, t: s.betas[t].sqrt()), "sqrt(beta_t), the noise std of one DDPM step"),
    (eps_with(lambda s, t: s.betas[t]), "scaled by beta_t, the variance of one step"),
    (lambda s, x_t, t, eps, g, scale: eps - scale * (1 - s.alpha_bar[t]).sqrt() * g, "(B, 1, 1, 1)"),
    (lambda s, x_t, t, eps, g, scale: eps_right(s, x_t, t, eps, g, scale)[:, 0], "shape"),
    (lambda s, x_t, t, eps, g, scale: None, "return"),
    (broken, "raised KeyError"),
])
def test_guided_eps_names_each_mistake(fn, named):
    verdict = ex.check_guided_eps(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_guided_eps_at_scale_zero_is_the_models_eps():
    s = ex._schedules()[2]
    x_t, eps, g = ex._images(0, 3)
    assert_close(ex.guided_eps_reference(s, x_t, torch.tensor([5, 500, 999]), eps, g, 0.0), eps)


# ---- Exercise 2: the guided mean, D&N Algorithm 1 ---------------------------------------------

def mean_right(mean, variance, grad, scale):
    return mean + scale * variance * grad


def mean_via_std(mean, variance, grad, scale):
    std = variance.sqrt()
    return mean + scale * std * std * grad


@pytest.mark.parametrize("fn", [mean_right, mean_via_std, ex.guided_mean_reference])
def test_guided_mean_accepts_right_answers(fn):
    verdict = ex.check_guided_mean(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (lambda m, v, g, s: m + s * torch.sqrt(v) * g, "the standard deviation sqrt(Sigma)"),
    (lambda m, v, g, s: m - s * v * g, "the shift is subtracted"),
    (lambda m, v, g, s: m + v * g, "the scale s is missing"),
    (lambda m, v, g, s: m + s * torch.log(v) * g, "the log-variance"),
    (lambda m, v, g, s: m + s * torch.exp(v) * g, "you exponentiated Sigma"),
    (lambda m, v, g, s: m + s * v * v * g, "Sigma is squared"),
    (lambda m, v, g, s: s * v * g, "the shift s Sigma g alone"),
    (lambda m, v, g, s: (m + s * v * g)[..., 1:], "shape"),
    (lambda m, v, g, s: None, "return"),
    (broken, "raised KeyError"),
])
def test_guided_mean_names_each_mistake(fn, named):
    verdict = ex.check_guided_mean(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


@pytest.mark.parametrize("variance", ["small", "large"])
def test_guided_mean_reference_agrees_with_the_librarys_eps_form(variance):
    """The library applies Algorithm 1 through the eps (mean_guided_eps); fed to DDPM's mean (eq. 11),
    that eps gives exactly the reference's mu + s Sigma g."""
    s = ex._schedules()[1]
    x_t, eps, g = ex._images(1, 3)
    t = torch.tensor([1, 400, 999])
    sigma2 = classifier.step_variance(s, x_t, t, variance)
    moved = formulas.p_mean_from_eps(s, x_t, t, classifier.mean_guided_eps(s, x_t, t, eps, g, 2.5, sigma2))
    expected = ex.guided_mean_reference(formulas.p_mean_from_eps(s, x_t, t, eps), sigma2, g, 2.5)
    assert_close(moved, expected)


# ---- Exercise 3: classifier-free guidance, H&S eq. (6) ----------------------------------------

def cfg_right(eps_cond, eps_uncond, w):
    return (1 + w) * eps_cond - w * eps_uncond


def cfg_as_a_step_away(eps_cond, eps_uncond, w):
    return eps_cond + w * (eps_cond - eps_uncond)


def cfg_with_library(eps_cond, eps_uncond, w):
    return cfg.cfg_combine(eps_cond, eps_uncond, 1 + w)


@pytest.mark.parametrize("fn", [cfg_right, cfg_as_a_step_away, cfg_with_library, ex.cfg_reference])
def test_cfg_accepts_right_answers(fn):
    verdict = ex.check_cfg(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (lambda c, u, w: u + w * (c - u), "the scale form eps_u + s (eps_c - eps_u) with s = w"),
    (lambda c, u, w: cfg_right(u, c, w), "swapped"),
    (lambda c, u, w: (1 + w) * u - w * c, "swapped"),                 # w put on the unconditional
    (lambda c, u, w: c - w * u, "the factor (1 + w) on eps_cond is missing"),
    (lambda c, u, w: (1 + w) * c + w * u, "the w eps_uncond term is added"),
    (lambda c, u, w: c - w * (c - u), "a step toward the unconditional model"),
    (lambda c, u, w: cfg_right(c, u, w).flatten(1), "shape"),
    (lambda c, u, w: None, "return"),
    (broken, "raised KeyError"),
])
def test_cfg_names_each_mistake(fn, named):
    verdict = ex.check_cfg(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_cfg_wrong_only_at_w_zero_gets_the_w_zero_hint():
    def fn(c, u, w):
        return cfg_right(c, u, w) if w else u                      # special-cases w = 0, wrongly
    verdict = ex.check_cfg(fn)
    assert not verdict.ok and "at w = 0 the result must be eps_cond" in verdict.message, verdict.message


def test_cfg_reference_at_w_zero_is_the_conditional_eps():
    c, u, _ = ex._images(2, 3)
    assert_close(ex.cfg_reference(c, u, 0.0), c)
    assert_close(ex.cfg_reference(c, u, 0), c)


# ---- Exercise 4: the Inception Score ----------------------------------------------------------

def is_right(probs):
    p_y = probs.mean(0, keepdim=True)
    kl = (torch.special.xlogy(probs, probs) - torch.special.xlogy(probs, p_y)).sum(1)
    return kl.mean().exp()


def is_by_entropies(probs):
    """IS = exp(H(p(y)) - E_x H(p(y|x))), returned as a float."""
    def entropy(p):
        return -torch.special.xlogy(p, p).sum(-1)
    return math.exp(float(entropy(probs.mean(0)) - entropy(probs).mean()))


def is_masked(probs):
    p_y = probs.mean(0)
    terms = torch.where(probs > 0, probs * (probs.log() - p_y.log()), torch.zeros_like(probs))
    return torch.exp(terms.sum(1).mean())


def is_naive(probs):                                  # right on softmax rows, NaN on exact zeros
    p_y = probs.mean(0, keepdim=True)
    return torch.exp((probs * (probs.log() - p_y.log())).sum(1).mean())


def kl_per_sample(probs):
    p_y = probs.mean(0, keepdim=True)
    return (torch.special.xlogy(probs, probs) - torch.special.xlogy(probs, p_y)).sum(1)


def entropy_of(p):
    return -torch.special.xlogy(p, p).sum(-1)


@pytest.mark.parametrize("fn", [is_right, is_by_entropies, is_masked, ex.inception_score_reference])
def test_inception_score_accepts_right_answers(fn):
    verdict = ex.check_inception_score(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (lambda p: kl_per_sample(p).mean(), "the exp is missing"),
    (lambda p: (p.mean(0) * (p.mean(0).log() - p.log())).sum(1).mean().exp(), "the KL is reversed"),
    (lambda p: (p * (p / (1 / p.shape[1])).log()).sum(1).mean().exp(), "the uniform distribution 1/K"),
    (lambda p: (torch.special.xlogy(p, p) - torch.special.xlogy(p, p.mean(1, keepdim=True))).sum(1).mean().exp(),
     "averaged over the classes"),
    (lambda p: kl_per_sample(p).sum().exp(), "summed over the samples"),
    (lambda p: kl_per_sample(p).exp().mean(), "the exp is inside the average"),
    (lambda p: torch.logsumexp(kl_per_sample(p), 0) - math.log(p.shape[0]), "the log of the mean of exp"),
    (lambda p: entropy_of(p.mean(0)).exp(), "the entropy of the marginal alone"),
    (lambda p: entropy_of(p.mean(0)), "the entropy of the marginal alone"),
    (is_naive, "0 * log 0 is NaN"),
    (lambda p: kl_per_sample(p).exp(), "one value per sample"),
    (lambda p: is_right(p).reshape(1), "return one number"),
    (lambda p: torch.exp(torch.special.xlogy(p, p) - torch.special.xlogy(p, p.mean(0))).mean(0),
     "one value per class"),
    (lambda p: None, "return"),
    (broken, "raised KeyError"),
])
def test_inception_score_names_each_mistake(fn, named):
    verdict = ex.check_inception_score(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_reversed_kl_on_exact_zeros_gets_the_inf_hint():
    def fn(p):                                        # reversed, and passes no softmax input: only zeros
        p_y = p.mean(0, keepdim=True)
        return torch.exp((p_y * (p_y.log() - p.log())).sum(1).mean()) if (p == 0).any() else is_right(p)
    verdict = ex.check_inception_score(fn)
    assert not verdict.ok and "is the KL reversed?" in verdict.message, verdict.message


@pytest.mark.parametrize("k, repeats, num_classes", [(1, 5, 3), (3, 2, 3), (4, 2, 10), (7, 3, 7)])
def test_inception_score_of_one_hot_rows_is_the_number_of_classes_used(k, repeats, num_classes):
    labels = torch.arange(k).repeat(repeats)
    probs = torch.nn.functional.one_hot(labels, num_classes).double()
    assert_close(ex.inception_score_reference(probs), torch.tensor(float(k), dtype=torch.float64))


def test_inception_score_of_identical_rows_is_one():
    row = torch.tensor([0.1, 0.6, 0.0, 0.3], dtype=torch.float64)
    assert_close(ex.inception_score_reference(row.expand(9, 4)), torch.tensor(1.0, dtype=torch.float64))


def test_inception_score_reference_matches_the_evaluators_formula():
    """FashionEvaluator.inception_score is this formula on its classifier's softmax."""
    from course_lib.eval.features import FashionEvaluator

    class Stub:
        def logits(self, x):
            return x
    logits = torch.randn(11, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = FashionEvaluator.inception_score(Stub(), logits)
    assert float(ex.inception_score_reference(logits.softmax(1))) == pytest.approx(expected, rel=1e-12)


# ---- Exercise 5: label dropout, H&S Algorithm 1 -----------------------------------------------

def dropout_right(y, u, p_uncond, null_class):
    return torch.where(u < p_uncond, null_class, y)


def dropout_in_place(y, u, p_uncond, null_class):
    y = y.clone()
    y[u < p_uncond] = null_class
    return y


def dropout_by_mask(y, u, p_uncond, null_class):
    keep = (u >= p_uncond).long()
    return y * keep + null_class * (1 - keep)


@pytest.mark.parametrize("fn", [dropout_right, dropout_in_place, dropout_by_mask, ex.label_dropout_reference])
def test_label_dropout_accepts_right_answers(fn):
    verdict = ex.check_label_dropout(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (lambda y, u, p, n: torch.where(u > p, n, y), "the comparison is reversed"),
    (lambda y, u, p, n: torch.where(u < p, 0, y), "you used 0 as the null label"),
    (lambda y, u, p, n: torch.where(u < p, n - 1, y), "null_class - 1"),
    (lambda y, u, p, n: torch.full_like(y, n), "every label is dropped"),
    (lambda y, u, p, n: torch.where(u < p, float(n), y.double()), "labels must stay integer"),
    (lambda y, u, p, n: torch.where(u < p, n, y).float(), "labels must stay integer"),
    (lambda y, u, p, n: u < p, "the mask u < p_uncond itself"),
    (lambda y, u, p, n: torch.where(torch.rand(y.shape) < p, n, y), "use the given draws u"),
    (lambda y, u, p, n: torch.where(u < p, n, y)[:-1], "shape"),
    (lambda y, u, p, n: None, "return"),
    (broken, "raised KeyError"),
])
def test_label_dropout_names_each_mistake(fn, named):
    verdict = ex.check_label_dropout(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_label_dropout_reference_keeps_dtype_and_matches_the_trainer():
    """trainer.diffusion_loss drops labels as torch.where(drop, torch.full_like(y, num_classes), y)."""
    y, u, p, n = ex._dropout_inputs()[0]
    out = ex.label_dropout_reference(y, u, p, n)
    assert out.dtype == y.dtype
    assert_close(out, torch.where(u < p, torch.full_like(y, n), y))
    assert 0 < int((out == n).sum()) < len(y)                      # the first input drops some, keeps some


# ---- all checkers -----------------------------------------------------------------------------

@pytest.mark.parametrize("check, catalogue", [
    (ex.check_guided_eps, ex._guided_eps_mistakes),
    (ex.check_guided_mean, ex._guided_mean_mistakes),
    (ex.check_cfg, ex._cfg_mistakes),
    (ex.check_inception_score, ex._is_mistakes),
    (ex.check_label_dropout, ex._dropout_mistakes),
])
def test_every_catalogued_slip_is_told_apart_from_the_others(check, catalogue):
    """No slip in a checker's catalogue is shadowed by an earlier one: each is named as itself."""
    for description, slip in catalogue().items():
        verdict = check(slip)
        assert not verdict.ok and description in verdict.message, (description, verdict.message)


# ---- Exercise 3 (lesson 04): the classifier's gradient ----------------------------------------

def grad_right(classifier, x_t, t, y):
    with torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        log_p = torch.log_softmax(classifier(x, t), dim=-1)[torch.arange(len(y)), y]
        return torch.autograd.grad(log_p.sum(), x)[0]


def grad_with_backward(classifier, x_t, t, y):
    """Right, through .backward() and gather (fills the classifier's .grad: a note, not a failure)."""
    with torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        torch.nn.functional.log_softmax(classifier(x, t), 1).gather(1, y[:, None]).sum().backward()
        return x.grad


def grad_no_enable(classifier, x_t, t, y):
    """Right with autograd on, but it forgets torch.enable_grad(): fails under the samplers' no_grad."""
    x = x_t.detach().clone().requires_grad_(True)
    log_p = torch.log_softmax(classifier(x, t), dim=-1)[torch.arange(len(y)), y]
    return torch.autograd.grad(log_p.sum(), x)[0]


def grad_of(select, sign=1.0, divide=False):
    def fn(classifier, x_t, t, y):
        with torch.enable_grad():
            x = x_t.detach().clone().requires_grad_(True)
            out = select(classifier(x, t), y)
            g = torch.autograd.grad(out.sum() if not divide else out.mean(), x)[0]
        return sign * g
    return fn


def _rows(m, y):
    return m[torch.arange(len(y)), y]


@pytest.mark.parametrize("fn", [grad_right, grad_with_backward, ex.classifier_grad_reference])
def test_classifier_grad_accepts_right_answers(fn):
    verdict = ex.check_classifier_grad(fn)
    assert verdict.ok, verdict.message


def test_classifier_grad_notes_backward():
    assert "autograd.grad" in ex.check_classifier_grad(grad_with_backward).message
    assert "note" not in ex.check_classifier_grad(grad_right).message


@pytest.mark.parametrize("fn, named", [
    (grad_of(lambda l, y: _rows(l, y)), "logit of class y"),
    (grad_of(lambda l, y: _rows(l.softmax(-1), y)), "probability"),
    (grad_of(lambda l, y: _rows(l.log_softmax(-1), y), sign=-1.0), "cross-entropy loss"),
    (lambda c, x, t, y: grad_of(lambda l, y: torch.nn.functional.cross_entropy(l, y))(c, x, t, y),
     "F.cross_entropy averages"),
    (grad_of(lambda l, y: _rows(l.log_softmax(-1), y), divide=True), "averaged (.mean())"),
    (grad_of(lambda l, y: l.log_softmax(-1)), "did not pick class y"),
    (grad_of(lambda l, y: l.log_softmax(-1)[:, y]), "log_probs[:, y]"),
    (grad_of(lambda l, y: _rows(torch.log_softmax(l, 0), y)), "over the batch (dim=0)"),
    (grad_no_enable, "torch.enable_grad()"),
    (lambda c, x, t, y: grad_right(c, x, t, y)[:, 0], "shape"),
    (lambda c, x, t, y: None, "return"),
    (broken, "raised KeyError"),
])
def test_classifier_grad_names_each_mistake(fn, named):
    verdict = ex.check_classifier_grad(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_classifier_grad_reference_is_the_library_and_depends_on_t():
    clf, x, t, y = ex._classifier_grad_inputs()[0]
    assert_close(ex.classifier_grad_reference(clf, x, t, y), classifier.classifier_grad(clf, x, t, y))
    assert not torch.allclose(classifier.classifier_grad(clf, x, t, y), classifier.classifier_grad(clf, x, t + 1, y))


# ---- Exercise 4 (lesson 04): AdaGN --------------------------------------------------------------

def ada_gn_right(h, emb, norm, proj):
    a_s, a_b = proj(torch.nn.functional.silu(emb)).chunk(2, dim=1)
    return norm(h) * (1 + a_s[:, :, None, None]) + a_b[:, :, None, None]


def ada_gn_by_hand(h, emb, norm, proj):
    """The group norm written out, with the module's affine parameters."""
    b, c = h.shape[:2]
    g = h.reshape(b, norm.num_groups, -1)
    normed = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()).reshape(h.shape)
    normed = normed * norm.weight[:, None, None] + norm.bias[:, None, None]
    out = proj(emb * torch.sigmoid(emb))
    return normed * (1 + out[:, :c, None, None]) + out[:, c:, None, None]


def ada_gn_parts(combine, act=True, swap=False):
    def fn(h, emb, norm, proj):
        a_s, a_b = proj(torch.nn.functional.silu(emb) if act else emb).chunk(2, dim=1)
        a_s, a_b = a_s[:, :, None, None], a_b[:, :, None, None]
        if swap:
            a_s, a_b = a_b, a_s
        return combine(h, norm, a_s, a_b)
    return fn


@pytest.mark.parametrize("fn", [ada_gn_right, ada_gn_by_hand, ex.ada_gn_reference])
def test_ada_gn_accepts_right_answers(fn):
    verdict = ex.check_ada_gn(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (ada_gn_parts(lambda h, n, s, b: n(h) * s + b), "the 1 + is missing"),
    (ada_gn_parts(lambda h, n, s, b: n(h) * (1 + s) + b, swap=True), "swapped"),
    (ada_gn_parts(lambda h, n, s, b: n(h) * (1 + s) + b, act=False), "SiLU before the projection is missing"),
    (lambda h, e, n, p: n(h) * (1 + torch.nn.functional.silu(p(e)).chunk(2, 1)[0][:, :, None, None])
     + torch.nn.functional.silu(p(e)).chunk(2, 1)[1][:, :, None, None], "after the projection"),
    (ada_gn_parts(lambda h, n, s, b: h * (1 + s) + b), "GroupNorm is missing"),
    (ada_gn_parts(lambda h, n, s, b: n(h * (1 + s) + b)), "before the GroupNorm"),
    (ada_gn_parts(lambda h, n, s, b: (n(h) + b) * (1 + s)), "shift is scaled too"),
    (ada_gn_parts(lambda h, n, s, b: torch.nn.functional.group_norm(h, n.num_groups) * (1 + s) + b),
     "own weight and bias"),
    (lambda h, e, n, p: n(h) * (1 + p(torch.nn.functional.silu(e)).chunk(2, 1)[0])
     + p(torch.nn.functional.silu(e)).chunk(2, 1)[1], "(B, C, 1, 1)"),
    (lambda h, e, n, p: None, "return"),
    (broken, "raised KeyError"),
])
def test_ada_gn_names_each_mistake(fn, named):
    verdict = ex.check_ada_gn(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_ada_gn_reference_matches_the_unets_resblock():
    from course_lib.nn.unet import ResBlock
    torch.manual_seed(0)
    block = ResBlock(8, 8, 12, dropout=0.0, groups=4, rescale=True).eval()
    torch.nn.init.normal_(block.conv2.weight)                     # zero-initialised in the UNet
    x, e = torch.randn(2, 8, 5, 5), torch.randn(2, 12)
    h = ex.ada_gn_reference(block.conv1(torch.nn.functional.silu(block.norm1(x))), e, block.norm2, block.emb)
    expected = (block.skip(x) + block.conv2(torch.nn.functional.silu(h))) * block.scale
    with torch.no_grad():
        assert_close(block(x, e), expected)
