"""Classifier guidance (Dhariwal & Nichol 2021): the gradient is exact for a classifier whose
log p(y | x) gradient is known in closed form; the eps form is eq. 14; the mean form moves
ddpm_step's mean by exactly s Sigma g; the two forms agree as steps get small; guidance raises
log p(y | x) over a sampling run; respaced schedules work; bad input fails clearly."""
import pytest
import torch

from course_lib.diffusion import formulas, schedules
from course_lib.guidance import (classifier_grad, classifier_guided_eps, classifier_guided_mean,
                                 respaced_classifier, threshold_eps)
from course_lib.samplers import respace
from course_lib.samplers.ddim import ddim_step
from course_lib.samplers.ddpm import ddpm_step
from course_lib.samplers.dpm_solver import DPMSolverPP2M
from course_lib.samplers.loop import sample

SHAPE = (1, 3, 3)     # (C, H, W) of the toy images
K = 3                 # classes


class LinearClassifier(torch.nn.Module):
    """logits = W x + b (t ignored): grad_x log softmax(logits)_y = W_y - sum_k p_k W_k."""

    def __init__(self, scale=1.0, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = SHAPE[0] * SHAPE[1] * SHAPE[2]
        self.W = torch.nn.Parameter(scale * torch.randn(K, d, generator=g, dtype=dtype))
        self.b = torch.nn.Parameter(torch.randn(K, generator=g, dtype=dtype))
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t)
        return x.flatten(1) @ self.W.T + self.b

    def closed_form_grad(self, x, y):
        with torch.no_grad():
            p = torch.softmax(x.flatten(1) @ self.W.T + self.b, dim=-1)   # (B, K)
            return (self.W[y] - p @ self.W).reshape(x.shape)


def gaussian_eps(schedule, sigma0=0.5, learned=False):
    """The exact noise predictor for data x0 ~ N(0, sigma0^2 I): eps = sqrt(1 - ab) x_t / (ab sigma0^2 + 1 - ab).
    With learned=True a constant v is stacked after eps, as a learned-variance UNet does."""
    def eps_fn(x_t, t, cond=None):
        ab = formulas.extract(schedule.alpha_bar, t, x_t)
        eps = (1 - ab).sqrt() * x_t / (ab * sigma0 ** 2 + 1 - ab)
        return torch.cat([eps, torch.full_like(eps, 0.3)], 1) if learned else eps
    return eps_fn


def _batch(B=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, *SHAPE, generator=g, dtype=dtype)
    y = torch.arange(B) % K
    return x_t, y


# ---------------------------------------------------------------------------- the gradient

def test_classifier_grad_is_exact_for_a_linear_classifier_even_under_no_grad():
    clf = LinearClassifier()
    x_t, y = _batch()
    t = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        g = classifier_grad(clf, x_t, t, y)
    assert g.shape == x_t.shape and g.dtype == x_t.dtype and not g.requires_grad
    torch.testing.assert_close(g, clf.closed_form_grad(x_t, y), rtol=1e-12, atol=1e-12)
    assert clf.W.grad is None                                           # no parameter gradients left behind


def test_classifier_grad_refuses_inference_mode():
    clf = LinearClassifier()
    x_t, y = _batch()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        classifier_grad(clf, x_t, torch.zeros(4, dtype=torch.long), y)


# ---------------------------------------------------------------------------- s = 0 and the eps form

@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("form", ["eps", "mean"])
def test_scale_zero_returns_the_unguided_model_exactly(form, learned):
    sched = schedules.schedule("linear", 20)
    model = gaussian_eps(sched, learned=learned)
    wrap = classifier_guided_eps if form == "eps" else classifier_guided_mean
    kwargs = {"variance": "learned"} if (form == "mean" and learned) else {}
    guided = wrap(model, LinearClassifier(), sched, 0.0, **kwargs)
    x_t, y = _batch()
    t = torch.tensor([0, 3, 11, 19])
    assert torch.equal(guided(x_t, t, y), model(x_t, t, y))


@pytest.mark.parametrize("learned", [False, True])
def test_eps_form_is_eq_14(learned):
    sched = schedules.schedule("cosine", 50)
    clf, s = LinearClassifier(), 2.5
    model = gaussian_eps(sched, learned=learned)
    x_t, y = _batch()
    t = torch.tensor([0, 7, 30, 49])
    out = classifier_guided_eps(model, clf, sched, s)(x_t, t, y)
    plain = model(x_t, t, y)
    expected = plain[:, :1] - s * (1 - sched.alpha_bar[t]).sqrt().reshape(-1, 1, 1, 1) * clf.closed_form_grad(x_t, y)
    torch.testing.assert_close(out[:, :1], expected, rtol=1e-12, atol=1e-12)
    if learned:
        assert out.shape[1] == 2 and torch.equal(out[:, 1:], plain[:, 1:])   # v kept


def test_model_uses_cond_switch():
    sched = schedules.schedule("linear", 10)
    seen = []

    def model(x_t, t, cond=None):
        seen.append(cond)
        return torch.zeros_like(x_t)
    x_t, y = _batch()
    t = torch.full((4,), 5)
    classifier_guided_eps(model, LinearClassifier(), sched, 1.0, model_uses_cond=False)(x_t, t, y)
    classifier_guided_mean(model, LinearClassifier(), sched, 1.0)(x_t, t, y)
    assert seen[0] is None and seen[1] is y


# ---------------------------------------------------------------------------- the mean form

def _sigma2(sched, t, variance, v):
    """The step variance written out independently of samplers.ddpm.log_variance."""
    beta_tilde = sched.posterior_variance().clone()
    beta_tilde[0] = beta_tilde[1]                                        # clipped at t = 0, as ddpm_step
    large = sched.betas.clone()
    large[0] = beta_tilde[1]
    r = lambda a: a[t].reshape(-1, 1, 1, 1)
    if variance == "small":
        return r(beta_tilde)
    if variance == "large":
        return r(large)
    frac = (v + 1) / 2                                                   # Improved DDPM eq. 15
    return torch.exp(frac * r(sched.betas).log() + (1 - frac) * r(beta_tilde).log())


@pytest.mark.parametrize("variance", ["small", "large", "learned"])
def test_mean_form_moves_the_ddpm_mean_by_s_sigma_g(variance):
    sched = schedules.schedule("linear", 30)
    learned = variance == "learned"
    clf, s = LinearClassifier(), 3.0
    model = gaussian_eps(sched, learned=learned)
    x_t, y = _batch()
    t = torch.tensor([0, 1, 12, 29])
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1), dtype=x_t.dtype)

    def step(out):
        eps, v = formulas.split_model_output(out, 1)
        return ddpm_step(sched, x_t, t, t - 1, eps, v=v, variance=variance, clip_x0=False, noise=z).x_prev

    guided = step(classifier_guided_mean(model, clf, sched, s, variance=variance)(x_t, t, y))
    v = model(x_t, t, y)[:, 1:] if learned else None
    expected = step(model(x_t, t, y)) + s * _sigma2(sched, t, variance, v) * clf.closed_form_grad(x_t, y)
    torch.testing.assert_close(guided, expected, rtol=1e-10, atol=1e-10)


def test_clipping_before_the_mean_shift_is_adm_order():
    """threshold_eps(clip) inside, ddpm_step(clip_x0=False): the clipped-x0 mean plus s Sigma g, as ADM."""
    sched = schedules.schedule("linear", 30)
    clf, s = LinearClassifier(), 3.0

    def wild(x_t, t, cond=None):                                        # predicts x0 far outside [-1, 1]
        return -3 * x_t
    x_t, y = _batch()
    t = torch.tensor([1, 5, 12, 29])
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1), dtype=x_t.dtype)
    guided = classifier_guided_mean(threshold_eps(wild, sched, "clip"), clf, sched, s)
    got = ddpm_step(sched, x_t, t, t - 1, guided(x_t, t, y), clip_x0=False, noise=z).x_prev
    adm = ddpm_step(sched, x_t, t, t - 1, wild(x_t, t), clip_x0=True, noise=z).x_prev
    torch.testing.assert_close(got, adm + s * _sigma2(sched, t, "small", None) * clf.closed_form_grad(x_t, y),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variance", ["large", "small"])
def test_eps_and_mean_forms_agree_as_steps_shrink(variance):
    """Mean shift / eps shift = Sigma sqrt(alpha_t) / beta_t: sqrt(1 - beta_t) for Sigma = beta_t."""
    clf, s = LinearClassifier(), 2.0
    x_t, y = _batch()
    errors = []
    for T in (10, 100, 1000):
        sched = schedules.schedule("cosine", T)
        t = torch.full((4,), T // 2)
        model = gaussian_eps(sched)
        eps = model(x_t, t)
        d_eps = classifier_guided_eps(model, clf, sched, s)(x_t, t, y) - eps
        d_mean = classifier_guided_mean(model, clf, sched, s, variance=variance)(x_t, t, y) - eps
        errors.append(float((d_mean - d_eps).norm() / d_eps.norm()))
        if variance == "large":
            torch.testing.assert_close(d_mean, sched.alphas[T // 2].sqrt() * d_eps, rtol=1e-10, atol=1e-12)
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5 and errors[2] < 1e-2, errors   # O(1/T)


# ---------------------------------------------------------------------------- sampling runs

def _mean_log_p(clf, x, y):
    with torch.no_grad():
        return float(torch.log_softmax(clf(x, None), -1)[torch.arange(len(y)), y].mean())


@pytest.mark.parametrize("form, step, kwargs", [
    ("eps", ddim_step, {}), ("mean", ddpm_step, {"clip_x0": False}), ("eps", DPMSolverPP2M(), {})])
def test_guidance_raises_log_p_over_a_sampling_run(form, step, kwargs):
    sched = schedules.schedule("cosine", 25)
    clf = LinearClassifier(scale=0.5, dtype=torch.float32)
    y = torch.arange(12) % K
    wrap = classifier_guided_eps if form == "eps" else classifier_guided_mean
    log_p = []
    for s in (0.0, 4.0):
        guided = wrap(gaussian_eps(sched), clf, sched, s)
        x = sample(guided, sched, (12, *SHAPE), step=step, cond=y, progress=False,
                   generator=torch.Generator().manual_seed(0), **kwargs)
        log_p.append(_mean_log_p(clf, x, y))
    assert log_p[1] > log_p[0] + 0.5, log_p


@pytest.mark.parametrize("learned", [False, True])
def test_respaced_schedule(learned):
    """Wrap the respaced model and classifier and pass the respaced schedule: both see original t;
    the mean form uses the respaced step's Sigma; the eps form equals wrapping first, then respacing."""
    sched = schedules.schedule("linear", 100)
    r = respace.respace(sched, respace.even_timesteps(100, 10))
    clf, s = LinearClassifier(), 2.0
    model = gaussian_eps(sched, learned=learned)                       # takes original t
    x_t, y = _batch()
    i = torch.tensor([0, 3, 6, 9])
    variance = "learned" if learned else "large"
    guided = classifier_guided_mean(respace.respaced_model(model, r.timesteps),
                                    respaced_classifier(clf, r.timesteps), r.schedule, s, variance=variance)
    out = guided(x_t, i, y)
    assert torch.equal(clf.seen_t[-1], r.timesteps[i])
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1), dtype=x_t.dtype)

    def step(o):
        eps, v = formulas.split_model_output(o, 1)
        return ddpm_step(r.schedule, x_t, i, i - 1, eps, v=v, variance=variance, clip_x0=False, noise=z).x_prev
    plain = model(x_t, r.timesteps[i], y)
    v = plain[:, 1:] if learned else None
    torch.testing.assert_close(step(out), step(plain) + s * _sigma2(r.schedule, i, variance, v)
                               * clf.closed_form_grad(x_t, y), rtol=1e-10, atol=1e-10)
    spaced_first = classifier_guided_eps(respace.respaced_model(model, r.timesteps),
                                         respaced_classifier(clf, r.timesteps), r.schedule, s)
    wrapped_first = respace.respaced_model(classifier_guided_eps(model, clf, sched, s), r.timesteps)
    torch.testing.assert_close(spaced_first(x_t, i, y), wrapped_first(x_t, i, y), rtol=1e-12, atol=1e-12)
    x = sample(guided, r.schedule, (4, *SHAPE), step=ddpm_step, cond=y, variance=variance, clip_x0=False,
               x_T=torch.randn(4, *SHAPE, dtype=torch.float64), progress=False)
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("wrap", [classifier_guided_eps, classifier_guided_mean])
def test_bad_input_fails_clearly(wrap):
    sched = schedules.schedule("linear", 10)
    model, clf = gaussian_eps(sched), LinearClassifier()
    x_t, y = _batch()
    t = torch.full((4,), 5)
    with pytest.raises(ValueError, match=">= 0"):
        wrap(model, clf, sched, -1.0)
    with pytest.raises(TypeError, match="real number"):
        wrap(model, clf, sched, "2")
    guided = wrap(model, clf, sched, 1.0)
    with pytest.raises(ValueError, match="needs class labels"):
        guided(x_t, t)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        guided(x_t, t, y[:2])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        guided(x_t, t, y[:, None])
    with pytest.raises(TypeError, match="integer"):
        guided(x_t, t, y.float())
    with pytest.raises(ValueError, match="out of range"):
        guided(x_t, t, torch.full((4,), K))
    with pytest.raises(ValueError, match=">= 0"):
        guided(x_t, t, torch.full((4,), -1))
    with pytest.raises(ValueError, match="lie in"):                    # an index past the sampler's schedule
        guided(x_t, torch.full((4,), 10), y)


def test_mean_form_variance_errors():
    sched = schedules.schedule("linear", 10)
    with pytest.raises(ValueError, match="unknown variance"):
        classifier_guided_mean(gaussian_eps(sched), LinearClassifier(), sched, 1.0, variance="fixed")
    guided = classifier_guided_mean(gaussian_eps(sched), LinearClassifier(), sched, 1.0, variance="learned")
    x_t, y = _batch()
    with pytest.raises(ValueError, match="learned"):                   # a model without v
        guided(x_t, torch.full((4,), 5), y)


def test_classifier_with_bad_logits_fails_clearly():
    x_t, y = _batch()
    with pytest.raises(ValueError, match="logits of shape"):
        classifier_grad(lambda x, t: x.flatten(1)[:, :3].sum(1), x_t, torch.zeros(4, dtype=torch.long), y)


def test_with_the_noise_aware_classifier_of_lesson_04():
    """The real classifier's signature, logits = classifier(x_t, t), under a no_grad sampler."""
    from course_lib.nn import classifier as nn_classifier
    if not hasattr(nn_classifier, "NoisyClassifier"):
        pytest.skip("course_lib.nn.classifier.NoisyClassifier is not there yet")
    torch.manual_seed(0)
    cfg = nn_classifier.NoisyClassifierConfig(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,),
                                              head_channels=8, norm_groups=4, num_classes=K)
    clf = nn_classifier.NoisyClassifier(cfg).eval()
    sched = schedules.schedule("linear", 10)
    x_t, y = torch.randn(2, 1, 28, 28), torch.tensor([0, 2])
    t = torch.tensor([9, 4])
    with torch.no_grad():
        g = classifier_grad(clf, x_t, t, y)
        out = classifier_guided_eps(lambda x, t, c=None: torch.zeros_like(x), clf, sched, 1.0)(x_t, t, y)
    assert g.shape == x_t.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    torch.testing.assert_close(out, -(1 - sched.alpha_bar[t]).sqrt().float().reshape(-1, 1, 1, 1) * g)
    assert all(p.grad is None for p in clf.parameters())
