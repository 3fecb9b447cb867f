"""CLIP guidance: the gradient against finite differences in float64, the eps shift of the score
view, both forms (noise-aware at x_t; clean on the predicted x0, with and without the model's
Jacobian, each against its chain rule), and every sampler running the wrapper unchanged."""
import pytest
import torch
import torch.nn.functional as F

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas
from course_lib.guidance.clip import clip_guided_eps, similarity_grad, text_embeddings
from course_lib.samplers import ddim, dpm_solver, loop
from course_lib.samplers.config import SamplerConfig, run
from course_lib.samplers.ddpm import ddpm_step

SCHED = NoiseSchedule.from_betas(cosine_betas(1000))
SHAPE = (2, 3, 4, 4)


class ToyClip(torch.nn.Module):
    """encode_image(x[, t]) = normalize(W vec(x) + t/1000 b): a linear 'CLIP' with known gradients."""

    def __init__(self, noisy: bool, dim: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(dim, 48, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.noisy = noisy
        self.requires_grad_(False)

    def encode_image(self, x, t=None):
        z = x.flatten(1).double() @ self.W.T
        if self.noisy:
            z = z + (t.double() / 1000)[:, None] * self.b
        return F.normalize(z, dim=-1)

    def encode_text(self, captions):
        rows = [torch.randn(self.W.shape[0], generator=torch.Generator().manual_seed(len(c)), dtype=torch.float64)
                for c in captions]   # a fixed vector per caption
        return F.normalize(torch.stack(rows), dim=-1)


def finite_difference(fn, x, h=1e-6):
    grad = torch.zeros_like(x)
    flat = x.flatten()
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        grad.view(-1)[i] = (fn((flat + e).view_as(x)) - fn((flat - e).view_as(x))) / (2 * h)
    return grad


def test_similarity_grad_against_finite_differences():
    clip = ToyClip(noisy=False)
    x = torch.randn(SHAPE, dtype=torch.float64)
    text = text_embeddings(clip, ["a red circle", "a red circle"])
    got = similarity_grad(clip.encode_image, x, text)
    want = finite_difference(lambda z: float((clip.encode_image(z) * text).sum()), x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def model(x, t, cond=None):
    return 0.3 * x   # a linear noise predictor: its Jacobian is 0.3 I


def test_noisy_form_is_the_score_shift():
    clip = ToyClip(noisy=True)
    x = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([10, 700])
    text = text_embeddings(clip, ["a blue square"] * 2)
    got = clip_guided_eps(model, clip, SCHED, 2.5)(x, t, text)
    g = finite_difference(lambda z: float((clip.encode_image(z, t) * text).sum()), x)
    sd = formulas.extract((1 - SCHED.alpha_bar).sqrt(), t, x)
    torch.testing.assert_close(got, model(x, t) - 2.5 * sd * g, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("through_model", [False, True])
def test_x0_form_chain_rule(through_model):
    clip = ToyClip(noisy=False)
    x = 0.1 * torch.randn(SHAPE, dtype=torch.float64)   # predicted x0 stays inside [-1, 1]
    t = torch.tensor([100, 400])
    text = text_embeddings(clip, ["a green cross"] * 2)
    a = formulas.extract(SCHED.alpha_bar, t, x)
    x0 = (x - (1 - a).sqrt() * model(x, t)) / a.sqrt()
    assert x0.abs().max() < 1
    g0 = finite_difference(lambda z: float((clip.encode_image(z) * text).sum()), x0)
    # d x0 / d x_t = (1 - sqrt(1 - a) * 0.3) / sqrt(a) through the model; 1 / sqrt(a) with eps held fixed
    dx0 = (1 - (1 - a).sqrt() * 0.3) / a.sqrt() if through_model else 1 / a.sqrt()
    got = clip_guided_eps(model, clip, SCHED, 1.5, form="x0", through_model=through_model)(x, t, text)
    torch.testing.assert_close(got, model(x, t) - 1.5 * (1 - a).sqrt() * dx0 * g0, rtol=1e-6, atol=1e-8)


def test_scale_zero_and_captions_as_cond():
    clip = ToyClip(noisy=True)
    x = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([5, 5])
    torch.testing.assert_close(clip_guided_eps(model, clip, SCHED, 0.0)(x, t, ["a red circle"] * 2), model(x, t))
    by_text = clip_guided_eps(model, clip, SCHED, 1.0)(x, t, ["a red circle"] * 2)
    by_emb = clip_guided_eps(model, clip, SCHED, 1.0)(x, t, text_embeddings(clip, ["a red circle"] * 2))
    torch.testing.assert_close(by_text, by_emb)
    one = clip_guided_eps(model, clip, SCHED, 1.0)(x, t, text_embeddings(clip, ["a red circle"]))
    torch.testing.assert_close(one, by_emb)   # one caption for the whole batch


def test_learned_variance_keeps_v():
    clip = ToyClip(noisy=True)

    def learned(x, t, cond=None):
        return torch.cat([0.3 * x, torch.full_like(x, 0.25)], 1)
    x = torch.randn(SHAPE, dtype=torch.float64)
    out = clip_guided_eps(learned, clip, SCHED, 3.0)(x, torch.tensor([50, 60]), ["a red circle"] * 2)
    assert out.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out[:, 3:], torch.full_like(x, 0.25))


def test_respaced_schedule_feeds_the_noisy_clip_its_original_t():
    seen = []

    class Spy(ToyClip):
        def encode_image(self, x, t=None):
            seen.append(t.tolist())
            return super().encode_image(x, t)
    from course_lib.samplers import respace
    r = respace.respace(SCHED, respace.even_timesteps(1000, 10))
    guided = clip_guided_eps(model, Spy(noisy=True), r.schedule, 1.0, timesteps=r.timesteps)
    guided(torch.randn(SHAPE, dtype=torch.float64), torch.tensor([9, 9]), ["a red circle"] * 2)
    assert seen[-1] == [int(r.timesteps[9])] * 2


@pytest.mark.parametrize("method", ["ddim", "ddpm", "dpm_solver_pp_2m"])
def test_every_sampler_runs_it_unchanged(method):
    clip = ToyClip(noisy=True)
    guided = clip_guided_eps(model, clip, SCHED, 5.0)
    x_T = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = SamplerConfig(method=method, steps=5, **({"variance": "small"} if method == "ddpm" else {}))
    text = text_embeddings(clip, ["a red circle"] * 2)
    out = run(cfg, guided, SCHED, x_T, cond=text, generator=torch.Generator().manual_seed(1))
    plain = run(cfg, model, SCHED, x_T, generator=torch.Generator().manual_seed(1))
    assert out.shape == SHAPE and torch.isfinite(out).all()
    assert not torch.allclose(out, plain)
    # guidance raises the similarity to the caption
    assert float((clip.encode_image(out.clamp(-1, 1), torch.zeros(2, dtype=torch.long)) * text).sum()) > \
        float((clip.encode_image(plain.clamp(-1, 1), torch.zeros(2, dtype=torch.long)) * text).sum())


@pytest.mark.parametrize("kwargs, cond, error, message", [
    (dict(scale=-1.0), "emb", ValueError, ">= 0"), (dict(scale=float("nan")), "emb", ValueError, "finite"),
    (dict(form="pixel"), "emb", ValueError, "unknown CLIP guidance form"),
    (dict(), None, ValueError, "needs the captions"), (dict(), "wrong batch", ValueError, "3 text embeddings"),
    (dict(), "ints", TypeError, "text embeddings"),
])
def test_bad_input(kwargs, cond, error, message):
    clip = ToyClip(noisy=True)
    x = torch.randn(SHAPE, dtype=torch.float64)
    conds = {"emb": text_embeddings(clip, ["a"] * 2), None: None,
             "wrong batch": text_embeddings(clip, ["a"] * 3), "ints": torch.zeros(2, 5, dtype=torch.long)}
    with pytest.raises(error, match=message):
        guided = clip_guided_eps(model, clip, SCHED, **({"scale": 1.0} | kwargs))
        guided(x, torch.tensor([3, 3]), conds[cond])


def test_inference_mode_is_a_clear_error():
    clip = ToyClip(noisy=True)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        clip_guided_eps(model, clip, SCHED, 1.0)(torch.randn(SHAPE), torch.tensor([3, 3]), ["a"] * 2)
