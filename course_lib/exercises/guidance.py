"""Checkers for the exercises of lessons 04 (classifier guidance, Dhariwal & Nichol 2021) and 05
(classifier-free guidance, Ho & Salimans 2022).

Each checker runs the learner's function on fixed inputs, compares it with the library and,
when it is wrong, names the slip it reproduces.

    check_guided_eps(fn)          fn(schedule, x_t, t, eps, grad, scale) -> eps_hat        D&N eq. (14), Algorithm 2
    check_guided_mean(fn)         fn(mean, variance, grad, scale) -> mu + s Sigma g         D&N Algorithm 1
    check_classifier_grad(fn)     fn(classifier, x_t, t, y) -> grad_x log p(y | x_t, t)     D&N sec. 4
    check_ada_gn(fn)              fn(h, emb, norm, proj) -> GroupNorm(h)(1 + a_s) + a_b     ADM sec. 3 (AdaGN)
    check_cfg(fn)                 fn(eps_cond, eps_uncond, w) -> (1 + w) eps_c - w eps_u    H&S eq. (6)
    check_inception_score(fn)     fn(probs) -> exp E_x[KL(p(y|x) || p(y))], one number     Salimans et al. 2016
    check_label_dropout(fn)       fn(y, u, p_uncond, null_class) -> labels for training     H&S Algorithm 1

Notation: grad is g = grad_{x_t} log p_phi(y | x_t), scale is s; t are code indices 0..T-1 into
schedule.alpha_bar (as everywhere in course_lib). Ho & Salimans' weight w is the scale s = 1 + w
of GLIDE and of course_lib's cfg_combine (w = 0: the conditional model). probs are p(y|x), one
row per sample, each summing to 1. u are the uniform draws in [0, 1) that decide which labels are
dropped, given so that the answer is deterministic.
"""
from __future__ import annotations

import torch

from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from course_lib.exercises import Verdict, check, check_function
from course_lib.guidance import cfg, classifier


def _schedules():
    """A short schedule with large betas (every slip shows plainly), then DDPM's linear and the cosine."""
    short = NoiseSchedule.from_betas(torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.7], dtype=torch.float64))
    return short, NoiseSchedule.from_betas(linear_betas(1000)), NoiseSchedule.from_betas(cosine_betas(1000))


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] (t clamped into range: a mistake must never raise), shaped (B, 1, 1, 1) in like's dtype."""
    return values[t.clamp(0, values.numel() - 1)].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _images(seed: int, batch: int, n: int = 3, shape=(1, 6, 5)):
    """n float64 batches (B, C, H, W), B differing from H and W."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _with_hint(verdict: Verdict) -> Verdict:
    """Add advice to errors whose cause is common enough to guess."""
    msg = verdict.message
    if "must match the size of tensor" in msg or "broadcast" in msg:
        msg += (" -- values read at t have shape (B,); reshape them to (B, 1, 1, 1), e.g. "
                "schedule.alpha_bar[t].view(-1, 1, 1, 1), so that they broadcast over the image")
    elif "out of bounds" in msg or "IndexError" in msg:
        msg += " -- is t off by one? alpha_bar_t is schedule.alpha_bar[t], valid indices 0..T-1"
    return Verdict(verdict.ok, msg)


# ---- Exercise 1 (lesson 04): the guided noise prediction, D&N eq. (14) ------------------------

def guided_eps_reference(schedule, x_t, t, eps, grad, scale):
    """eps_hat = eps - s sqrt(1 - alpha_bar_t) g: the library's classifier.score_guided_eps."""
    return classifier.score_guided_eps(schedule, x_t, t, eps, grad, scale)


def _guided_eps_mistakes():
    def with_coef(coef, sign=-1.0):
        return lambda s, x_t, t, eps, g, scale: eps + sign * scale * coef(s, t, x_t) * g

    def std(s, t, x):                                      # sqrt(1 - alpha_bar_t), the right coefficient
        return _at(1 - s.alpha_bar, t, x).sqrt()

    return {
        "the sign is flipped (eps + ...): eq. (14) subtracts s sqrt(1 - alpha_bar_t) g, because eps points "
        "away from the data (the score is -eps / sqrt(1 - alpha_bar_t)), so moving toward class y lowers eps":
            with_coef(std, sign=1.0),
        "the square root is missing: (1 - alpha_bar_t) g; eq. (14) has sqrt(1 - alpha_bar_t), the std of "
        "the noise in x_t": with_coef(lambda s, t, x: _at(1 - s.alpha_bar, t, x)),
        "you used sqrt(alpha_bar_t), the signal's weight; eq. (14) has sqrt(1 - alpha_bar_t), the noise's":
            with_coef(lambda s, t, x: _at(s.alpha_bar, t, x).sqrt()),
        "you divided the gradient by sqrt(1 - alpha_bar_t); eq. (14) multiplies by it (dividing is the other "
        "direction, eps to score, eq. 11)": with_coef(lambda s, t, x: 1 / std(s, t, x)),
        "the scale s is missing (that is s = 1): multiply the gradient term by scale":
            lambda s, x_t, t, eps, g, scale: eps - std(s, t, x_t) * g,
        "t is off by one: you read alpha_bar at t + 1; alpha_bar_t is schedule.alpha_bar[t], no shift":
            with_coef(lambda s, t, x: _at(1 - s.alpha_bar, t + 1, x).sqrt()),
        "t is off by one: you read alpha_bar at t - 1 (schedule.alpha_bar_prev[t]); eq. (14) uses "
        "alpha_bar_t itself, schedule.alpha_bar[t]": with_coef(lambda s, t, x: _at(1 - s.alpha_bar_prev, t, x).sqrt()),
        "the gradient is scaled by sqrt(beta_t), the noise std of one DDPM step; eq. (14) scales it by "
        "sqrt(1 - alpha_bar_t), the std of all the noise in x_t": with_coef(lambda s, t, x: _at(s.betas, t, x).sqrt()),
        "the gradient is scaled by beta_t, the variance of one step (Algorithm 1's Sigma, the mean form); "
        "the eps form scales it by sqrt(1 - alpha_bar_t)": with_coef(lambda s, t, x: _at(s.betas, t, x)),
    }


def _guided_eps_inputs():
    """The first input avoids t = 0 and t = T-1, so that both off-by-ones are named there, not raised."""
    short, linear, cosine = _schedules()
    x_t, eps, g = _images(11, 4)
    return [(short, x_t, torch.tensor([1, 3, 4, 2]), eps, g, 2.0),
            (linear, x_t, torch.tensor([0, 40, 650, 999]), eps, g, 0.5),
            (cosine, x_t, torch.tensor([999, 500, 1, 0]), eps, g, 3.0),
            (cosine, x_t.float(), torch.tensor([700, 20, 999, 0]), eps.float(), g.float(), 1.5)]


def check_guided_eps(fn) -> Verdict:
    """Exercise 1 (lesson 04): fn(schedule, x_t, t, eps, grad, scale) -> eps - s sqrt(1 - alpha_bar_t) g
    (D&N eq. 14, Algorithm 2), shaped like eps; t (B,) code indices."""
    return _with_hint(check_function(fn, guided_eps_reference, _guided_eps_inputs(),
                                     mistakes=_guided_eps_mistakes()))


# ---- Exercise 2 (lesson 04): the guided mean, D&N Algorithm 1 ---------------------------------

def guided_mean_reference(mean, variance, grad, scale):
    """mu + s Sigma g: Algorithm 1 samples x_{t-1} ~ N(mu + s Sigma g, Sigma). (The library applies it
    through the eps, classifier.mean_guided_eps; the tests check the two agree.)"""
    return mean + scale * variance * grad


def _guided_mean_mistakes():
    return {
        "you used the standard deviation sqrt(Sigma); the mean moves by s Sigma g, Sigma the variance "
        "(completing the square, D&N eqs. 7-10)": lambda m, v, g, s: m + s * v.sqrt() * g,
        "the shift is subtracted: mu - s Sigma g moves away from class y; g = grad log p(y | x_t) points "
        "toward it, so add s Sigma g": lambda m, v, g, s: m - s * v * g,
        "the scale s is missing (that is s = 1): the shift is s Sigma g": lambda m, v, g, s: m + v * g,
        "you used log(Sigma), the log-variance, as if it were the variance; the shift needs Sigma itself "
        "(from a log-variance: Sigma = exp(log_variance))": lambda m, v, g, s: m + s * v.log() * g,
        "you exponentiated Sigma, as if it were a log-variance; the argument is the variance itself":
            lambda m, v, g, s: m + s * v.exp() * g,
        "Sigma is squared: the shift is s Sigma g, the variance to the first power":
            lambda m, v, g, s: m + s * v ** 2 * g,
        "you returned the shift s Sigma g alone; the guided mean is mu + s Sigma g":
            lambda m, v, g, s: (s * v * g).expand_as(m),
    }


def _guided_mean_inputs():
    mean, g, spread = _images(12, 4)
    variance = torch.tensor([0.02, 0.3, 0.5, 0.75], dtype=torch.float64).view(-1, 1, 1, 1)
    per_pixel = 0.05 + 0.4 * torch.sigmoid(spread)          # a learned variance varies over the image
    return [(mean, variance, g, 2.0),
            (mean, per_pixel, g, 0.7),
            (mean.float(), variance.float(), g.float(), 1.5),
            (mean, variance, g, 0.0)]


def check_guided_mean(fn) -> Verdict:
    """Exercise 2 (lesson 04): fn(mean, variance, grad, scale) -> mu + s Sigma g (D&N Algorithm 1);
    variance (B, 1, 1, 1) or shaped like mean."""
    verdict = check_function(fn, guided_mean_reference, _guided_mean_inputs(), mistakes=_guided_mean_mistakes())
    if not verdict.ok and "NaN" in verdict.message:
        return Verdict(False, verdict.message + " -- the variance Sigma is positive; nothing here needs a log "
                                                "or a division")
    return verdict


# ---- Exercise 3 (lesson 04): the classifier's gradient, D&N sec. 4 ----------------------------

class _TinyNoisyClassifier(torch.nn.Module):
    """A small fixed classifier p(y | x_t, t) for the checker: logits = W2 tanh(W1 x + b(t)), float64,
    nonlinear so that each slip's gradient differs, and dependent on t like the real one."""

    def __init__(self, pixels: int, num_classes: int = 5, hidden: int = 16, seed: int = 21):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(0.6 * torch.randn(hidden, pixels, generator=g, dtype=torch.float64))
        self.t_freq = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(num_classes, hidden, generator=g, dtype=torch.float64))

    def forward(self, x_t, t):
        bias = torch.sin(t.to(self.w1.dtype)[:, None] / 100.0 * self.t_freq)                 # (B, hidden)
        h = torch.tanh(x_t.flatten(1).to(self.w1.dtype) @ self.w1.T + bias)
        return (h @ self.w2.T).to(x_t.dtype)                                                  # (B, K)


def classifier_grad_reference(clf, x_t, t, y):
    """g = grad_{x_t} log p_phi(y | x_t, t), the log-softmax of the logits at y: the library's
    guidance.classifier.classifier_grad."""
    return classifier.classifier_grad(clf, x_t, t, y)


def _autograd(f, x_t):
    """d f(x).sum() / dx at x_t, computed safely for the catalogue of slips."""
    with torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        return torch.autograd.grad(f(x).sum(), x)[0]


def _classifier_grad_mistakes():
    def rows(out, y):
        return out[torch.arange(len(y)), y]

    return {
        "you differentiated the logit of class y, not its log-probability; log p(y | x_t) is the "
        "log-softmax of the logits at y (F.log_softmax(logits, dim=-1)), which also pushes the other "
        "classes down": lambda c, x, t, y: _autograd(lambda z: rows(c(z, t), y), x),
        "you differentiated the probability p(y | x_t) (softmax), not its log; guidance uses "
        "grad log p(y | x_t), so take log_softmax": lambda c, x, t, y: _autograd(lambda z: rows(c(z, t).softmax(-1), y), x),
        "the sign is flipped: that is the gradient of the cross-entropy loss, -log p(y | x_t), which points "
        "away from class y; guidance ascends log p(y | x_t)":
            lambda c, x, t, y: -_autograd(lambda z: rows(c(z, t).log_softmax(-1), y), x),
        "the sign is flipped and the gradient divided by the batch size: F.cross_entropy averages "
        "-log p(y | x_t) over the batch; differentiate the sum of log p(y_i | x_i)":
            lambda c, x, t, y: -_autograd(lambda z: rows(c(z, t).log_softmax(-1), y), x) / len(y),
        "the gradient is divided by the batch size: you averaged (.mean()) the log-probabilities before "
        "differentiating; sum them (each x_i's gradient is then its own)":
            lambda c, x, t, y: _autograd(lambda z: rows(c(z, t).log_softmax(-1), y), x) / len(y),
        "you did not pick class y: that is the gradient of the sum of log p(k | x_t) over every class k; "
        "select log_probs[torch.arange(B), y]": lambda c, x, t, y: _autograd(lambda z: c(z, t).log_softmax(-1), x),
        "you indexed log_probs[:, y], a (B, B) matrix: every image gets the gradient of all the batch's "
        "labels; select one entry per row, log_probs[torch.arange(B), y]":
            lambda c, x, t, y: _autograd(lambda z: c(z, t).log_softmax(-1)[:, y], x),
        "the softmax runs over the batch (dim=0), not over the classes; use log_softmax(logits, dim=-1)":
            lambda c, x, t, y: _autograd(lambda z: rows(c(z, t).log_softmax(0), y), x),
    }


def _classifier_grad_inputs():
    """x_t (B, C, H, W) float64 and float32; labels with repeats and in a different order than the batch."""
    (x,) = _images(22, 4, n=1, shape=(1, 3, 4))
    clf = _TinyNoisyClassifier(pixels=12).eval()
    (x6,) = _images(23, 6, n=1, shape=(1, 3, 4))
    return [(clf, x, torch.tensor([900, 400, 20, 650]), torch.tensor([3, 0, 4, 1])),
            (clf, x6, torch.tensor([10, 999, 500, 500, 0, 250]), torch.tensor([2, 2, 0, 4, 1, 3])),
            (clf, x.float(), torch.tensor([100, 200, 300, 400]), torch.tensor([1, 1, 1, 1]))]


NO_GRAD_HINT = (" -- the samplers call the guided model under torch.no_grad(), where autograd records "
                "nothing; wrap the body in `with torch.enable_grad():` and differentiate a fresh "
                "x = x_t.detach().clone().requires_grad_(True)")


def check_classifier_grad(fn) -> Verdict:
    """Exercise 3 (lesson 04): fn(classifier, x_t, t, y) -> grad_{x_t} log p_phi(y | x_t, t), shaped like
    x_t; classifier(x_t, t) returns logits (B, K); y (B,) labels. It must also work under
    torch.no_grad(), as the samplers call it."""
    inputs = _classifier_grad_inputs()
    verdict = check_function(fn, classifier_grad_reference, inputs, mistakes=_classifier_grad_mistakes())
    if not verdict.ok:
        return verdict
    clf, x, t, y = inputs[0]
    clf.zero_grad(set_to_none=True)
    try:
        with torch.no_grad():
            result = fn(clf, x, t, y)
    except RuntimeError as e:
        return Verdict(False, f"under torch.no_grad() your function raised RuntimeError: {e}{NO_GRAD_HINT}")
    inside = check(result, classifier_grad_reference(clf, x, t, y), what="your function under torch.no_grad()")
    if not inside.ok:
        return Verdict(False, f"under torch.no_grad(): {inside.message}{NO_GRAD_HINT}")
    if any(p.grad is not None for p in clf.parameters()):
        return Verdict(True, verdict.message + " (A note: it filled the classifier's .grad, as .backward() "
                             "does; torch.autograd.grad(log_p.sum(), x) gives the gradient for x alone, and "
                             "nothing accumulates over the sampling steps.)")
    return verdict


# ---- Exercise 4 (lesson 04): AdaGN, ADM sec. 3 ------------------------------------------------

def ada_gn_reference(h, emb, norm, proj):
    """AdaGN(h, e) = GroupNorm(h) (1 + a_s) + a_b with (a_s, a_b) = proj(SiLU(e)) split in two along the
    channels, scale first: the order and form of nn.unet.ResBlock (`block.norm2`, `block.emb`).
    h (B, C, H, W), emb (B, E); norm an nn.GroupNorm(groups, C), proj an nn.Linear(E, 2C)."""
    a_s, a_b = proj(torch.nn.functional.silu(emb))[:, :, None, None].chunk(2, dim=1)
    return norm(h) * (1 + a_s) + a_b


def _ada_gn_mistakes():
    silu = torch.nn.functional.silu

    def parts(emb, proj, act=True):
        return proj(silu(emb) if act else emb)[:, :, None, None].chunk(2, dim=1)

    def with_parts(combine, act=True, swap=False):
        def fn(h, emb, norm, proj):
            a_s, a_b = parts(emb, proj, act)
            if swap:
                a_s, a_b = a_b, a_s
            return combine(h, norm, a_s, a_b)
        return fn

    return {
        "the 1 + is missing: GroupNorm(h) a_s + a_b; ADM writes the scale as 1 + a_s so that a zero "
        "projection leaves the normalised features unchanged": with_parts(lambda h, n, s, b: n(h) * s + b),
        "scale and shift are swapped: the first half of proj(SiLU(e)) is the scale a_s, the second the "
        "shift a_b (chunk(2, dim=1) in that order)": with_parts(lambda h, n, s, b: n(h) * (1 + s) + b, swap=True),
        "the SiLU before the projection is missing: (a_s, a_b) = proj(SiLU(e)), not proj(e)":
            with_parts(lambda h, n, s, b: n(h) * (1 + s) + b, act=False),
        "the SiLU is after the projection: (a_s, a_b) = proj(SiLU(e)), the activation acts on e":
            lambda h, e, n, p: n(h) * (1 + silu(p(e)[:, :, None, None]).chunk(2, 1)[0]) + silu(p(e)[:, :, None, None]).chunk(2, 1)[1],
        "the GroupNorm is missing: the scale and shift act on the normalised features, GroupNorm(h)":
            with_parts(lambda h, n, s, b: h * (1 + s) + b),
        "the scale and shift are applied before the GroupNorm, which then undoes most of them; normalise "
        "first, then scale and shift": with_parts(lambda h, n, s, b: n(h * (1 + s) + b)),
        "the shift is scaled too: (GroupNorm(h) + a_b)(1 + a_s); the shift is added after the scale":
            with_parts(lambda h, n, s, b: (n(h) + b) * (1 + s)),
        "you normalised without the GroupNorm's own weight and bias (F.group_norm without them); call the "
        "module, norm(h), which applies its affine parameters":
            with_parts(lambda h, n, s, b: torch.nn.functional.group_norm(h, n.num_groups, eps=n.eps) * (1 + s) + b),
    }


def _ada_gn_inputs():
    """Batches whose B, H, W all differ from C, so a scale of shape (B, C) cannot broadcast by accident;
    GroupNorms with random affine parameters; float64 and float32."""
    g = torch.Generator().manual_seed(24)
    out = []
    for batch, channels, groups, emb_dim, size, dtype in [(3, 8, 4, 6, (5, 7), torch.float64),
                                                          (2, 6, 2, 4, (3, 4), torch.float64),
                                                          (5, 4, 1, 9, (2, 3), torch.float32)]:
        norm = torch.nn.GroupNorm(groups, channels).to(dtype)
        proj = torch.nn.Linear(emb_dim, 2 * channels).to(dtype)
        with torch.no_grad():
            for p in (norm.weight, norm.bias, proj.weight, proj.bias):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
        h = 2.0 * torch.randn(batch, channels, *size, generator=g, dtype=torch.float64).to(dtype) + 0.5
        emb = torch.randn(batch, emb_dim, generator=g, dtype=torch.float64).to(dtype)
        out.append((h, emb, norm, proj))
    return out


def check_ada_gn(fn) -> Verdict:
    """Exercise 4 (lesson 04): fn(h, emb, norm, proj) -> GroupNorm(h) (1 + a_s) + a_b,
    (a_s, a_b) = proj(SiLU(emb)).chunk(2, dim=1), each reshaped to (B, C, 1, 1) (nn.unet.ResBlock)."""
    with torch.no_grad():
        verdict = check_function(fn, ada_gn_reference, _ada_gn_inputs(), mistakes=_ada_gn_mistakes())
    if not verdict.ok and ("must match the size of tensor" in verdict.message or "broadcast" in verdict.message):
        return Verdict(False, verdict.message + " -- a_s and a_b have shape (B, C), one value per channel; "
                                                "reshape them to (B, C, 1, 1), e.g. a_s[:, :, None, None], "
                                                "so that they broadcast over the image")
    return verdict


# ---- Exercise 3 (lesson 05): classifier-free guidance, H&S eq. (6) ----------------------------

def cfg_reference(eps_cond, eps_uncond, w):
    """(1 + w) eps_cond - w eps_uncond: the library's cfg_combine with the scale s = 1 + w."""
    return cfg.cfg_combine(eps_cond, eps_uncond, cfg.cfg_weight_to_scale(w))


def _cfg_mistakes():
    return {
        "you used the scale form eps_u + s (eps_c - eps_u) with s = w; Ho & Salimans' weight w is s - 1 "
        "(w = 0 is the conditional model): (1 + w) eps_c - w eps_u": lambda c, u, w: u + w * (c - u),
        "the conditional and unconditional predictions are swapped: (1 + w) eps_uncond - w eps_cond guides "
        "away from the class; the weight (1 + w) goes on eps_cond": lambda c, u, w: (1 + w) * u - w * c,
        "the factor (1 + w) on eps_cond is missing (eps_c - w eps_u): the two weights must sum to 1, "
        "(1 + w) eps_c - w eps_u": lambda c, u, w: c - w * u,
        "the w eps_uncond term is added; eq. (6) subtracts it: (1 + w) eps_c - w eps_u":
            lambda c, u, w: (1 + w) * c + w * u,
        "you wrote (1 - w) eps_c + w eps_u, a step toward the unconditional model; guidance steps away "
        "from it: (1 + w) eps_c - w eps_u": lambda c, u, w: (1 - w) * c + w * u,
    }


def _cfg_inputs():
    c, u, _ = _images(13, 3)
    c4, u4, _ = _images(14, 5, shape=(4, 4, 3))             # latent-shaped, as lesson 07 uses it
    return [(c, u, 1.5), (c4, u4, 3.0), (c, u, 0.0), (c.float(), u.float(), 0.3), (c4, u4, 7.25)]


def check_cfg(fn) -> Verdict:
    """Exercise 3 (lesson 05): fn(eps_cond, eps_uncond, w) -> (1 + w) eps_cond - w eps_uncond
    (H&S eq. 6), shaped like eps_cond; w = 0 gives eps_cond."""
    verdict = check_function(fn, cfg_reference, _cfg_inputs(), mistakes=_cfg_mistakes())
    if verdict.ok:
        return verdict
    c, u, _ = _images(13, 3)
    try:
        at_zero = fn(c, u, 0.0)
        wrong_at_zero = not (isinstance(at_zero, torch.Tensor) and at_zero.shape == c.shape
                             and torch.allclose(at_zero.double(), c))
    except Exception:
        wrong_at_zero = False
    if wrong_at_zero:
        return Verdict(False, verdict.message + " -- a check to try: at w = 0 the result must be eps_cond "
                                                "itself, the conditional model")
    return verdict


# ---- Exercise 4 (lesson 05): the Inception Score ----------------------------------------------

def inception_score_reference(probs):
    """exp E_x[KL(p(y|x) || p(y))], p(y) the mean of the rows (Salimans et al. 2016), in float64, a
    0-dim tensor; xlogy takes 0 log 0 = 0. The formula of eval.features.FashionEvaluator.inception_score,
    which applies it to its classifier's softmax."""
    p = torch.as_tensor(probs).double()
    p_y = p.mean(0, keepdim=True)
    kl = torch.special.xlogy(p, p) - torch.special.xlogy(p, p_y)
    return torch.exp(kl.sum(1).mean())


def _is_parts(probs):
    p = probs.double()
    p_y = p.mean(0, keepdim=True)
    return p, p_y, (torch.special.xlogy(p, p) - torch.special.xlogy(p, p_y)).sum(1)   # KL per sample, (N,)


def _entropy(p):
    return -torch.special.xlogy(p, p).sum(-1)


def _is_mistakes():
    def reversed_kl(probs):
        p, p_y, _ = _is_parts(probs)
        return (torch.special.xlogy(p_y, p_y) - torch.special.xlogy(p_y, p)).sum(1).mean().exp()

    def uniform(probs):
        p, _, _ = _is_parts(probs)
        return (torch.special.xlogy(p, p) - p * torch.log(torch.tensor(1.0 / p.shape[1]))).sum(1).mean().exp()

    return {
        "the exp is missing: that is the mean KL, the log of the Inception Score":
            lambda probs: _is_parts(probs)[2].mean(),
        "the KL is reversed, KL(p(y) || p(y|x)); IS uses KL(p(y|x) || p(y)) = sum_y p(y|x) log(p(y|x) / p(y))":
            reversed_kl,
        "you used the uniform distribution 1/K in place of the marginal p(y) (or averaged over the classes, "
        "dim=1, instead of over the samples, dim=0); p(y) is the mean of the rows, probs.mean(0)": uniform,
        "the KL is summed over the samples; IS averages it, exp(mean_x KL), so that it does not grow with N":
            lambda probs: _is_parts(probs)[2].sum().exp(),
        "the exp is inside the average, mean_x exp(KL); IS is the exp of the mean KL":
            lambda probs: _is_parts(probs)[2].exp().mean(),
        "you took the log of the mean of exp(KL); IS is exp of the mean KL, with no log":
            lambda probs: _is_parts(probs)[2].exp().mean().log(),
        "you used the entropy of the marginal alone, exp H(p(y)); IS = exp(H(p(y)) - E_x H(p(y|x))), so the "
        "mean entropy of the rows is missing": lambda probs: _entropy(_is_parts(probs)[1][0]).exp(),
        "you returned the entropy of the marginal alone, H(p(y)); IS = exp(H(p(y)) - E_x H(p(y|x)))":
            lambda probs: _entropy(_is_parts(probs)[1][0]),
    }


def _is_inputs():
    """Softmax rows first (no zeros: every slip finite, so named), then exact zeros, one-hot rows over
    4 of 5 classes used equally (IS = 4), and float32 rows."""
    g = torch.Generator().manual_seed(15)
    soft = (1.5 * torch.randn(6, 4, generator=g, dtype=torch.float64)).softmax(1)
    zeros = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0],
                          [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]], dtype=torch.float64)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 2, 2, 1, 0, 1, 3, 3]), 5).double()
    soft32 = (2.0 * torch.randn(7, 10, generator=g, dtype=torch.float64)).softmax(1).float()
    return [(soft,), (zeros,), (one_hot,), (soft32,)]


NAN_IN_IS = (" -- 0 * log 0 is NaN in floating point, and rows with exact zeros (a confident classifier) "
             "have them; the limit is 0: use torch.special.xlogy(p, p) - torch.special.xlogy(p, p_y), or mask "
             "the zeros out")
INF_IN_IS = (" -- a log of 0 weighed by a nonzero number: is the KL reversed? In KL(p(y|x) || p(y)) each "
             "log is weighed by p(y|x), so a zero probability adds nothing")


def _nonfinite_kind(fn, inputs):
    """'nan' or 'inf': what the learner's function first returns that is not finite, else None."""
    for args in inputs:
        try:
            out = torch.as_tensor(fn(*args)).double()
        except Exception:
            return None
        if torch.isnan(out).any():
            return "nan"
        if torch.isinf(out).any():
            return "inf"
    return None


def _is_shape_message(fn, probs):
    """A clearer message for an IS of the wrong shape (one value per sample, per class, or a (1,) tensor)."""
    try:
        out = torch.as_tensor(fn(probs))
    except Exception:
        return None
    n, k = probs.shape
    if out.shape == ():
        return None
    if out.numel() == 1:
        return (f"shape {tuple(out.shape)}: return one number, a 0-dim tensor or a float "
                "(.squeeze() or .item(), or drop keepdim=True)")
    if out.shape == (n,):
        return ("one value per sample, shape (N,): average the per-sample KL over the samples, then take "
                "the exp, to get a single number")
    if out.shape[-1] == k:
        return ("one value per class: sum the KL over the classes (dim=1) for each sample, then average over "
                "the samples, to get a single number")
    return None


def check_inception_score(fn) -> Verdict:
    """Exercise 4 (lesson 05): fn(probs) -> exp(mean_x KL(p(y|x) || p(y))), p(y) = probs.mean(0);
    probs (N, K), rows summing to 1, possibly with exact zeros; returns a 0-dim tensor or a float."""
    inputs = _is_inputs()
    verdict = check_function(fn, inception_score_reference, inputs, mistakes=_is_mistakes())
    if verdict.ok:
        return verdict
    if verdict.message.startswith("shape"):
        better = _is_shape_message(fn, inputs[0][0])
        return Verdict(False, better) if better else verdict
    if "NaN or inf" in verdict.message:
        kind = _nonfinite_kind(fn, inputs)
        return Verdict(False, verdict.message + {"nan": NAN_IN_IS, "inf": INF_IN_IS, None: ""}[kind])
    return verdict


# ---- Exercise 5 (lesson 05): label dropout, H&S Algorithm 1 -----------------------------------

def label_dropout_reference(y, u, p_uncond, null_class):
    """y with the null class where u < p_uncond, the labels one training step of Ho & Salimans'
    Algorithm 1 feeds the model; course_lib.training.trainer.diffusion_loss does exactly this."""
    return torch.where(u < p_uncond, torch.full_like(y, null_class), y)


def _dropout_mistakes():
    return {
        "the comparison is reversed: torch.where(u > p_uncond, ...) drops a share 1 - p_uncond and keeps "
        "only p_uncond; drop where u < p_uncond":
            lambda y, u, p, n: torch.where(u > p, torch.full_like(y, n), y),
        "you used 0 as the null label, but 0 is a real class; the null label is null_class, the index after "
        "the last real class (nn.unet.UNet: num_classes)":
            lambda y, u, p, n: torch.where(u < p, torch.zeros_like(y), y),
        "you used null_class - 1 (num_classes - 1), the last real class; the null label is null_class itself, "
        "the index after it": lambda y, u, p, n: torch.where(u < p, torch.full_like(y, n - 1), y),
        "every label is dropped: replace only those where u < p_uncond, keep the others":
            lambda y, u, p, n: torch.full_like(y, n),
        "no label is dropped: replace those where u < p_uncond by null_class": lambda y, u, p, n: y.clone(),
    }


def _dropout_inputs():
    """Fresh tensors each call. The first input drops 5 of 12 labels (some of class 0, none of class 9)."""
    y = torch.tensor([3, 7, 0, 9, 1, 5, 2, 8, 4, 6, 9, 0])
    u = torch.tensor([0.05, 0.62, 0.28, 0.91, 0.33, 0.12, 0.74, 0.5, 0.07, 0.99, 0.41, 0.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(16)
    y3, u3 = torch.randint(0, 3, (9,), generator=g), torch.rand(9, generator=g)
    return [(y, u, 0.3, 10), (y3, u3, 0.5, 3), (y.clone(), u.clone(), 0.0, 10), (y3.clone(), u3.clone(), 1.0, 3)]


def _dtype_message(fn, inputs):
    """A message if the labels come back as floats or booleans (check() would accept right-valued floats)."""
    for args in inputs:
        try:
            out = fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        except Exception:
            return None                                    # check_function reports it
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
            return ("you returned a bool tensor: the mask u < p_uncond itself? Use it to choose between the "
                    "null class and y: torch.where(u < p_uncond, null_class, y)")
        if isinstance(out, torch.Tensor) and (out.dtype.is_floating_point or out.dtype.is_complex):
            return (f"dtype {out.dtype}: labels must stay integer (torch.long), because the model looks them "
                    "up in an embedding table; torch.where(u < p_uncond, null_class, y) on a long y keeps it "
                    "long (did a float null_class, or arithmetic such as y * mask, slip in?)")
    return None


def _uses_fresh_randomness(fn, args) -> bool:
    try:
        a, b = fn(*[x.clone() if isinstance(x, torch.Tensor) else x for x in args]), fn(*args)
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not torch.equal(a, b)
    except Exception:
        return False


def check_label_dropout(fn) -> Verdict:
    """Exercise 5 (lesson 05): fn(y, u, p_uncond, null_class) -> y with null_class where u < p_uncond
    (H&S Algorithm 1); y (B,) integer labels, u (B,) uniform draws in [0, 1); returns integer labels."""
    inputs = _dropout_inputs()
    message = _dtype_message(fn, inputs)
    if message:
        return Verdict(False, message)
    verdict = check_function(fn, label_dropout_reference, _dropout_inputs(), mistakes=_dropout_mistakes())
    if not verdict.ok and "values differ" in verdict.message and _uses_fresh_randomness(fn, inputs[0]):
        return Verdict(False, "your answer changes from call to call: use the given draws u (drop where "
                              "u < p_uncond) instead of drawing new random numbers, so the answer is reproducible")
    return verdict
