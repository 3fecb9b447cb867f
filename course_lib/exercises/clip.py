"""Checkers for the exercises of lesson 06 (CLIP, Radford et al. 2021; CLIP guidance, GLIDE, Nichol et
al. 2022, sec. 2.4).

Each checker runs the learner's function on fixed inputs, compares it with the library and,
when it is wrong, names the slip it reproduces.

    check_info_nce(fn)          fn(image_emb, text_emb, logit_scale) -> one number         CLIP Figure 3
    check_clip_guided_eps(fn)   fn(schedule, x_t, t, eps, grad, scale) -> eps_hat          GLIDE sec. 2.4
    check_x0_gradient(fn)       fn(schedule, t, grad_x0, like) -> the gradient at x_t       chain rule, eps fixed

Notation: image_emb and text_emb are (B, D), row i of each a pair (image i, its caption i), not yet
normalised; logit_scale is CLIP's learned log of the inverse temperature, log(1 / tau), a 0-dim
tensor: logits = min(exp(logit_scale), 100) * I T^T (models.clip.contrastive_loss). grad is
grad_{x_t} [f(x_t) . g(c)], the gradient of the similarity, scale is s, and t are code indices
0..T-1 into schedule.alpha_bar. In the x0 form with eps held fixed, x0 = (x_t - sqrt(1 - alpha_bar_t)
eps) / sqrt(alpha_bar_t), so d x0 / d x_t = 1 / sqrt(alpha_bar_t); grad_x0 is the similarity's
gradient at x0, and like is a tensor shaped like x_t (for broadcasting values read at t).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas
from course_lib.exercises import Verdict, check_function
from course_lib.exercises.guidance import _at, _with_hint  # the same t-indexing and hints as lesson 04
from course_lib.guidance.classifier import score_guided_eps


def _cosine() -> NoiseSchedule:
    return NoiseSchedule.from_betas(cosine_betas(1000))


def _images(seed: int, batch: int, n: int = 3, shape=(3, 6, 5)):
    """n float64 batches (B, C, H, W), B differing from W (a (B,) factor that is not reshaped raises)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _on_copies(fn):
    """fn called on copies of its tensor arguments, so that a learner's in-place edit (x /= x.norm())
    cannot change what the reference and the catalogued slips see."""
    def called(*args):
        return fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    return called


# ---- Exercise 1: CLIP's symmetric InfoNCE loss, Radford et al. 2021, Figure 3 -----------------

MAX_LOGIT_SCALE = 100.0        # CLIP clips exp(logit_scale) at 100 (sec. 2.5); contrastive_loss does too


def info_nce_reference(image_emb, text_emb, logit_scale):
    """CLIP's loss, written out (models.clip.contrastive_loss with matches=None; the tests check they agree):

        I, T = image_emb / |image_emb|, text_emb / |text_emb|      each row a unit vector, (B, D)
        logits = min(exp(logit_scale), 100) * I T^T               (B images, B captions)
        loss = (CE(logits, arange(B)) + CE(logits^T, arange(B))) / 2

    the first cross-entropy picks each image's caption among the B captions (softmax over a row),
    the second each caption's image among the B images (softmax over a column). A 0-dim float64 tensor.
    """
    i = F.normalize(image_emb.double(), dim=-1)                           # (B, D)
    t = F.normalize(text_emb.double(), dim=-1)                            # (B, D)
    logits = torch.as_tensor(logit_scale).double().exp().clamp(max=MAX_LOGIT_SCALE) * i @ t.T   # (B, B)
    labels = torch.arange(i.shape[0])                                     # pair i is on the diagonal
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _nce(image_emb, text_emb, logit_scale, *, normalize=None, scale=None, directions=(0, 1),
         labels=None, reduction="mean", combine=0.5, pre_softmax=False):
    """The InfoNCE loss with one piece swapped for a slip; the defaults give the reference."""
    normalize = normalize or (lambda x: F.normalize(x, dim=-1))
    i, t = normalize(image_emb.double()), normalize(text_emb.double())   # (B, D)
    ls = torch.as_tensor(logit_scale).double()
    logits = (scale(ls) if scale else ls.exp().clamp(max=MAX_LOGIT_SCALE)) * i @ t.T
    labels = torch.arange(i.shape[0]) if labels is None else labels(i.shape[0])
    terms = []
    for d in directions:                                                # 0: images -> captions, 1: captions -> images
        rows = (logits, logits.T)[d]
        terms.append(F.cross_entropy(rows.softmax(1) if pre_softmax else rows, labels, reduction=reduction))
    return combine * sum(terms) if len(terms) > 1 else terms[0]


def _info_nce_mistakes():
    def nce(**slip):
        return lambda i, t, ls: _nce(i, t, ls, **slip)

    return {
        "the embeddings are not normalised: CLIP's logits are cosine similarities, so divide each row by its "
        "norm first (F.normalize(x, dim=-1))": nce(normalize=lambda x: x),
        "the embeddings are normalised over the batch (dim=0), each feature across the samples; normalise each "
        "embedding, each row: F.normalize(x, dim=-1) (or x / x.norm(dim=-1, keepdim=True))":
            nce(normalize=lambda x: F.normalize(x, dim=0)),
        "the embeddings are divided by one norm of the whole batch (x.norm() without dim); each row needs its "
        "own norm: x / x.norm(dim=-1, keepdim=True)": nce(normalize=lambda x: x / x.norm()),
        "only one direction, images -> captions (softmax over each row of I T^T); CLIP averages it with "
        "captions -> images, the cross-entropy of the transposed logits": nce(directions=(0,)),
        "only one direction, captions -> images (softmax over each column of I T^T); CLIP averages it with "
        "images -> captions. (Or both directions take the softmax over the same axis: the image->caption term "
        "needs F.cross_entropy(logits, labels), the caption->image term F.cross_entropy(logits.T, labels))":
            nce(directions=(1,)),
        "logit_scale is used raw; it is the log of the inverse temperature, so the logits are multiplied by "
        "exp(logit_scale)": nce(scale=lambda ls: ls),
        "the temperature is missing: the cosine similarities must be multiplied by exp(logit_scale) (1 / tau) "
        "before the softmax": nce(scale=lambda ls: torch.ones_like(ls)),
        "the logits are divided by exp(logit_scale); logit_scale is log(1 / tau), so dividing by tau is "
        "multiplying by exp(logit_scale)": nce(scale=lambda ls: (-ls).exp()),
        "exp(logit_scale) is not clipped at 100: CLIP clips the scale so that training stays stable, "
        "exp(logit_scale).clamp(max=100)": nce(scale=lambda ls: ls.exp()),
        "the losses are summed over the batch; CLIP averages each cross-entropy over the B pairs "
        "(reduction='mean', F.cross_entropy's default)": nce(reduction="sum"),
        "the two directions are added; CLIP averages them: (loss_images + loss_captions) / 2": nce(combine=1.0),
        "the labels are wrong: the match of image i is caption i, the diagonal of I T^T, so the targets are "
        "torch.arange(B), not reversed": nce(labels=lambda b: torch.arange(b).flip(0)),
        "the labels are wrong: the match of image i is caption i, so the targets are torch.arange(B), not "
        "all 0": nce(labels=lambda b: torch.zeros(b, dtype=torch.long)),
        "a softmax is applied before F.cross_entropy, which takes logits and applies log_softmax itself; "
        "pass it I T^T times the scale directly": nce(pre_softmax=True),
        "the sign is flipped: the cross-entropy is -log softmax at the match, a positive number":
            lambda i, t, ls: -info_nce_reference(i, t, ls),
    }


def _info_nce_inputs():
    """(B, D) pairs with B != D (a transposition or a normalisation over the wrong axis shows), the
    captions near their images (a trained CLIP's regime), logit_scale below log(100) except in the last,
    where the clip at 100 matters: every other slip is named on an earlier input."""
    g = torch.Generator().manual_seed(61)
    norms = torch.linspace(0.5, 3.0, 5, dtype=torch.float64)[:, None]          # rows of different lengths
    img = torch.randn(5, 7, generator=g, dtype=torch.float64) * norms
    txt = img + 0.8 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    img8, txt8 = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)   # float32, D < B
    img3, txt3 = (torch.randn(3, 16, generator=g, dtype=torch.float64) for _ in range(2))
    return [(img, txt, torch.tensor(math.log(1 / 0.07), dtype=torch.float64)),
            (img8, txt8, torch.tensor(1.7)),
            (img3, 2.0 * img3 + txt3, torch.tensor(0.4, dtype=torch.float64)),
            (img, txt, torch.tensor(math.log(MAX_LOGIT_SCALE) + 0.5, dtype=torch.float64))]


def _info_nce_shape_message(fn, args):
    """A clearer message for a loss of the wrong shape (one per pair, the logits, a (1,) tensor)."""
    try:
        out = torch.as_tensor(fn(*args))
    except Exception:
        return None
    b = args[0].shape[0]
    if out.shape == ():
        return None
    if out.numel() == 1:
        return (f"shape {tuple(out.shape)}: return one number, a 0-dim tensor (.squeeze(), or no keepdim=True) "
                "or a float")
    if out.shape == (b,):
        return ("one value per pair, shape (B,): average each direction's cross-entropy over the batch "
                "(reduction='mean'), then average the two directions, to get one number")
    if out.shape == (b, b):
        return ("shape (B, B): that is a matrix of logits or of per-pair terms; the loss is the mean "
                "cross-entropy with targets torch.arange(B), in both directions, one number")
    if out.shape == (2,):
        return "shape (2,): the two directions' losses; average them, (loss_images + loss_captions) / 2"
    return None


def check_info_nce(fn) -> Verdict:
    """Exercise 1: fn(image_emb, text_emb, logit_scale) -> CLIP's symmetric InfoNCE loss, one number;
    image_emb, text_emb (B, D) unnormalised, logit_scale a 0-dim tensor."""
    inputs = _info_nce_inputs()
    verdict = check_function(_on_copies(fn), info_nce_reference, inputs, mistakes=_info_nce_mistakes())
    if not verdict.ok and verdict.message.startswith("shape"):
        better = _info_nce_shape_message(_on_copies(fn), inputs[0])
        return Verdict(False, better) if better else verdict
    if not verdict.ok and "NaN or inf" in verdict.message:
        return Verdict(False, verdict.message + " -- exp(logit_scale) times similarities of unnormalised "
                                                "embeddings can overflow; a log of a softmax that underflowed "
                                                "to 0 is -inf (F.cross_entropy or log_softmax avoid that)")
    return verdict


# ---- Exercise 2: the CLIP-guided eps, GLIDE sec. 2.4 (D&N eq. 14 with the similarity) --------

def clip_guided_eps_reference(schedule, x_t, t, eps, grad, scale):
    """eps_hat = eps - s sqrt(1 - alpha_bar_t) grad_{x_t}(f . g): what guidance.clip.clip_guided_eps applies,
    through the library's classifier.score_guided_eps (lesson 04's eq. 14, the similarity in place of
    log p(y | x_t))."""
    return score_guided_eps(schedule, x_t, t, eps, grad, scale)


def _clip_eps_mistakes():
    def with_coef(coef, sign=-1.0):
        return lambda s, x_t, t, eps, g, scale: eps + sign * scale * coef(s, t, x_t) * g

    def std(s, t, x):                                      # sqrt(1 - alpha_bar_t), the right coefficient
        return _at(1 - s.alpha_bar, t, x).sqrt()

    return {
        "the sign is flipped (eps + ...): the similarity's gradient points toward the caption, and eps "
        "points away from the data (the score is -eps / sqrt(1 - alpha_bar_t)), so guidance subtracts "
        "s sqrt(1 - alpha_bar_t) grad": with_coef(std, sign=1.0),
        "you used sqrt(alpha_bar_t), the signal's weight; the gradient is scaled by sqrt(1 - alpha_bar_t), the "
        "std of the noise in x_t": with_coef(lambda s, t, x: _at(s.alpha_bar, t, x).sqrt()),
        "the square root is missing: (1 - alpha_bar_t) grad; the factor is sqrt(1 - alpha_bar_t), the std of "
        "the noise in x_t": with_coef(lambda s, t, x: _at(1 - s.alpha_bar, t, x)),
        "you divided the gradient by sqrt(1 - alpha_bar_t); eps_hat multiplies it by sqrt(1 - alpha_bar_t) "
        "(dividing is the other direction, eps to score)": with_coef(lambda s, t, x: 1 / std(s, t, x)),
        "the scale s is missing (that is s = 1): multiply the gradient term by scale":
            lambda s, x_t, t, eps, g, scale: eps - std(s, t, x_t) * g,
        "t is off by one: you read alpha_bar at t + 1; alpha_bar_t is schedule.alpha_bar[t], no shift":
            with_coef(lambda s, t, x: _at(1 - s.alpha_bar, t + 1, x).sqrt()),
        "t is off by one: you read alpha_bar at t - 1 (schedule.alpha_bar_prev[t]); the factor uses "
        "alpha_bar_t itself, schedule.alpha_bar[t]": with_coef(lambda s, t, x: _at(1 - s.alpha_bar_prev, t, x).sqrt()),
        "you used the betas: sqrt(beta_t), the noise std of one DDPM step; the factor is sqrt(1 - alpha_bar_t), "
        "the std of all the noise in x_t (alpha_bar_t = prod of (1 - beta))":
            with_coef(lambda s, t, x: _at(s.betas, t, x).sqrt()),
        "you used the betas: beta_t, one step's variance; the factor is sqrt(1 - alpha_bar_t), from the "
        "cumulative alpha_bar_t": with_coef(lambda s, t, x: _at(s.betas, t, x)),
        "you used sqrt(1 - beta_t) = sqrt(alpha_t), one step's, where the factor is sqrt(1 - alpha_bar_t), "
        "with the cumulative alpha_bar_t = schedule.alpha_bar[t]":
            with_coef(lambda s, t, x: _at(s.alphas, t, x).sqrt()),
        "you started from x_t: eps_hat moves the model's noise prediction, eps - s sqrt(1 - alpha_bar_t) grad":
            lambda s, x_t, t, eps, g, scale: x_t - scale * std(s, t, x_t) * g,
    }


def _clip_eps_inputs():
    """The cosine schedule. The first input avoids t = 0 and t = T-1, so that both off-by-ones are named
    there, not raised; later inputs reach both ends, a float32 batch and scale 0."""
    s = _cosine()
    x_t, eps, g = _images(62, 4)
    x3, e3, g3 = _images(63, 3, shape=(1, 4, 6))
    return [(s, x_t, torch.tensor([1, 250, 500, 998]), eps, g, 3.0),
            (s, x3, torch.tensor([0, 999, 620]), e3, g3, 0.5),
            (s, x_t.float(), torch.tensor([700, 20, 999, 0]), eps.float(), g.float(), 1.5),
            (s, x3, torch.tensor([5, 400, 900]), e3, g3, 0.0)]


def check_clip_guided_eps(fn) -> Verdict:
    """Exercise 2: fn(schedule, x_t, t, eps, grad, scale) -> eps - s sqrt(1 - alpha_bar_t) grad, shaped like
    eps; t (B,) code indices, grad the similarity's gradient at x_t."""
    return _with_hint(check_function(_on_copies(fn), clip_guided_eps_reference, _clip_eps_inputs(),
                                     mistakes=_clip_eps_mistakes()))


# ---- Exercise 3: the x0 form's gradient with eps held fixed (chain rule) ----------------------

def x0_gradient_reference(schedule, t, grad_x0, like):
    """grad_{x_t} = grad_x0 / sqrt(alpha_bar_t): x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    with eps a constant, so d x0 / d x_t = 1 / sqrt(alpha_bar_t) (guidance.clip's form="x0",
    through_model=False; about 2e4 at t = 999 of the cosine schedule)."""
    return grad_x0 / formulas.extract(schedule.alpha_bar.sqrt(), t, like)


def _x0_grad_mistakes():
    def times(coef):
        return lambda s, t, g, like: g * coef(s, t, like)

    return {
        "you multiplied by sqrt(alpha_bar_t); x0 = (x_t - ...) / sqrt(alpha_bar_t), so d x0 / d x_t = "
        "1 / sqrt(alpha_bar_t): divide": times(lambda s, t, x: _at(s.alpha_bar, t, x).sqrt()),
        "the square root is missing: you divided by alpha_bar_t; d x0 / d x_t = 1 / sqrt(alpha_bar_t)":
            times(lambda s, t, x: 1 / _at(s.alpha_bar, t, x)),
        "the chain-rule factor is missing: you returned grad_x0 itself; x0 = (x_t - sqrt(1 - alpha_bar_t) eps) "
        "/ sqrt(alpha_bar_t) changes 1 / sqrt(alpha_bar_t) times as fast as x_t, so divide by sqrt(alpha_bar_t)":
            lambda s, t, g, like: g.clone(),
        "you divided by sqrt(1 - alpha_bar_t), the noise's weight; with eps fixed, x_t enters x0 only through "
        "x_t / sqrt(alpha_bar_t): divide by sqrt(alpha_bar_t)":
            times(lambda s, t, x: 1 / _at(1 - s.alpha_bar, t, x).sqrt()),
        "you multiplied by sqrt(1 - alpha_bar_t), the noise's weight; with eps fixed, d x0 / d x_t = "
        "1 / sqrt(alpha_bar_t)": times(lambda s, t, x: _at(1 - s.alpha_bar, t, x).sqrt()),
        "the sign is flipped: x0 grows with x_t (d x0 / d x_t = +1 / sqrt(alpha_bar_t)); the minus belongs to "
        "the eps term, which is held fixed": times(lambda s, t, x: -1 / _at(s.alpha_bar, t, x).sqrt()),
        "you used sqrt(alpha_t) = sqrt(1 - beta_t), one step's; x0 is reached from x_t in one jump, through "
        "alpha_bar_t: divide by sqrt(schedule.alpha_bar[t])": times(lambda s, t, x: 1 / _at(s.alphas, t, x).sqrt()),
        "t is off by one: you read alpha_bar at t + 1; alpha_bar_t is schedule.alpha_bar[t], no shift":
            times(lambda s, t, x: 1 / _at(s.alpha_bar, t + 1, x).sqrt()),
        "t is off by one: you read alpha_bar at t - 1 (schedule.alpha_bar_prev[t]); use alpha_bar_t itself, "
        "schedule.alpha_bar[t]": times(lambda s, t, x: 1 / _at(s.alpha_bar_prev, t, x).sqrt()),
    }


def _x0_grad_inputs():
    """The cosine schedule; the first input avoids t = 0 and t = T-1 (off-by-ones named, not raised);
    like is an x_t, shaped as grad_x0."""
    s = _cosine()
    g, x_t, _ = _images(64, 4)
    g3, x3, _ = _images(65, 3, shape=(1, 4, 6))
    return [(s, torch.tensor([3, 250, 500, 990]), g, x_t),
            (s, torch.tensor([0, 999, 420]), g3, x3),
            (s, torch.tensor([700, 20, 999, 0]), g.float(), x_t.float())]


def check_x0_gradient(fn) -> Verdict:
    """Exercise 3: fn(schedule, t, grad_x0, like) -> grad_x0 / sqrt(alpha_bar_t), the gradient at x_t of
    the x0 form with eps held fixed, shaped like grad_x0; t (B,) code indices."""
    return _with_hint(check_function(_on_copies(fn), x0_gradient_reference, _x0_grad_inputs(),
                                     mistakes=_x0_grad_mistakes()))
