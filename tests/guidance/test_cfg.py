"""Classifier-free guidance (Ho & Salimans 2022): one batched pass of 2B per step; s = 1 is the
conditional model, s = 0 the unconditional one; s = 1 + w is Ho & Salimans' (1 + w) eps_c - w eps_u;
learned variance takes v from the conditional half; it composes with respacing; bad input fails clearly."""
import pytest
import torch

from course_lib.diffusion import schedules
from course_lib.guidance import cfg_combine, cfg_eps, cfg_scale_to_weight, cfg_weight_to_scale
from course_lib.nn.unet import UNet, preset
from course_lib.samplers import respace
from course_lib.samplers.ddim import ddim_step
from course_lib.samplers.ddpm import ddpm_step
from course_lib.samplers.loop import model_fn, sample

K = 3                  # real classes 0..2; 3 is the null class
SHAPE = (1, 4, 4)


class ToyConditional:
    """eps(x, t, y) = 0.5 x + offset[y] (+ t / 100), null class included; with learned=True a v that
    is the class index, so the test can see which half v came from. Records every call."""

    def __init__(self, learned=False):
        g = torch.Generator().manual_seed(0)
        self.offsets = torch.randn(K + 1, *SHAPE, generator=g, dtype=torch.float64)
        self.learned, self.calls = learned, []

    def __call__(self, x_t, t, y=None):
        self.calls.append((x_t.shape[0], y.clone()))
        eps = 0.5 * x_t + self.offsets[y] + t.reshape(-1, 1, 1, 1) / 100
        if self.learned:
            return torch.cat([eps, y.to(eps.dtype).reshape(-1, 1, 1, 1).expand_as(eps)], 1)
        return eps


def _batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *SHAPE, generator=g, dtype=torch.float64), torch.arange(B) % K, torch.full((B,), 7)


def test_one_batched_forward_pass_per_step():
    model = ToyConditional()
    y = torch.tensor([0, 2, 1])
    sched = schedules.schedule("linear", 6)
    sample(cfg_eps(model, 3.0, K), sched, (3, *SHAPE), step=ddim_step, cond=y, progress=False,
           x_T=torch.randn(3, *SHAPE, dtype=torch.float64))
    assert len(model.calls) == 6                                        # one call per step
    for batch, labels in model.calls:
        assert batch == 6 and torch.equal(labels, torch.tensor([0, 2, 1, K, K, K]))


def test_scale_one_is_conditional_and_scale_zero_unconditional():
    model = ToyConditional()
    x_t, y, t = _batch()
    torch.testing.assert_close(cfg_eps(model, 1.0, K)(x_t, t, y), model(x_t, t, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cfg_eps(model, 0.0, K)(x_t, t, y), model(x_t, t, torch.full_like(y, K)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("w", [0.0, 0.5, 3.0, 19.0])
def test_scale_one_plus_w_is_ho_salimans_eq_6(w):
    model = ToyConditional()
    x_t, y, t = _batch()
    eps_c, eps_u = model(x_t, t, y), model(x_t, t, torch.full_like(y, K))
    torch.testing.assert_close(cfg_eps(model, cfg_weight_to_scale(w), K)(x_t, t, y), (1 + w) * eps_c - w * eps_u,
                               rtol=1e-12, atol=1e-12)
    assert cfg_scale_to_weight(cfg_weight_to_scale(w)) == w


def test_combine_is_linear_in_the_scale():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(cfg_combine(a, b, 2.5), b + 2.5 * (a - b))


def test_learned_variance_takes_v_from_the_conditional_half():
    model = ToyConditional(learned=True)
    x_t, y, t = _batch()
    out = cfg_eps(model, 4.0, K)(x_t, t, y)
    cond, uncond = model(x_t, t, y), model(x_t, t, torch.full_like(y, K))
    assert out.shape == cond.shape
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]))
    assert torch.equal(out[:, 1:], cond[:, 1:])


def test_a_null_label_row_is_unconditional():
    model = ToyConditional()
    x_t, _, t = _batch()
    y = torch.tensor([0, K, 1, K])
    out = cfg_eps(model, 5.0, K)(x_t, t, y)
    torch.testing.assert_close(out[1], model(x_t, t, torch.full_like(y, K))[1])


def test_with_a_class_conditional_unet_and_respacing():
    """The real UNet's null class is num_classes; respacing may wrap inside or outside cfg_eps."""
    torch.manual_seed(0)
    unet = UNet(preset("tiny", num_classes=K, learn_sigma=True)).eval()
    for p in unet.parameters():                                         # make the class embedding matter
        p.data.add_(0.05 * torch.randn_like(p))
    eps_fn = model_fn(unet)
    r = respace.respace(schedules.schedule("linear", 100), respace.even_timesteps(100, 4))
    x = torch.randn(2, 1, 28, 28)
    y, i = torch.tensor([0, 2]), torch.tensor([3, 1])
    inside = cfg_eps(respace.respaced_model(eps_fn, r.timesteps), 2.0, K)(x, i, y)
    outside = respace.respaced_model(cfg_eps(eps_fn, 2.0, K), r.timesteps)(x, i, y)
    with torch.no_grad():
        c, u = unet(x, r.timesteps[i], y), unet(x, r.timesteps[i], torch.full_like(y, K))
    assert (c[:, :1] - u[:, :1]).abs().max() > 1e-3                      # the label changes the output
    torch.testing.assert_close(inside, outside)
    torch.testing.assert_close(inside[:, :1], u[:, :1] + 2.0 * (c[:, :1] - u[:, :1]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inside[:, 1:], c[:, 1:], rtol=1e-4, atol=1e-5)
    out = sample(cfg_eps(respace.respaced_model(eps_fn, r.timesteps), 2.0, K), r.schedule, (2, 1, 28, 28),
                 step=ddpm_step, cond=y, variance="learned", progress=False,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


def test_bad_input_fails_clearly():
    model = ToyConditional()
    x_t, y, t = _batch()
    with pytest.raises(ValueError, match=">= 0"):
        cfg_eps(model, -0.5, K)
    with pytest.raises(ValueError, match=">= -1"):
        cfg_weight_to_scale(-2.0)
    with pytest.raises(ValueError, match="null_class must be >= 0"):
        cfg_eps(model, 2.0, -1)
    with pytest.raises(TypeError, match="null_class must be an int"):
        cfg_eps(model, 2.0, 3.0)
    guided = cfg_eps(model, 2.0, K)
    with pytest.raises(ValueError, match="above null_class"):          # null_class below a real label
        cfg_eps(model, 2.0, 1)(x_t, t, y)
    with pytest.raises(ValueError, match="needs class labels"):
        guided(x_t, t)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        guided(x_t, t, y[:3])
    with pytest.raises(TypeError, match="integer"):
        guided(x_t, t, y.double())
    with pytest.raises(ValueError, match=">= 0"):
        guided(x_t, t, torch.tensor([0, -1, 1, 2]))


# ---------------------------------------------------------------------------- two networks

def test_two_models_with_the_null_class_is_cfg_eps():
    """cfg_two_models(model, model at the null class, s) == cfg_eps(model, s, null), eps and v."""
    from course_lib.guidance.cfg import cfg_two_models
    for learned in (False, True):
        model = ToyConditional(learned=learned)
        x_t, y, t = _batch()
        uncond = lambda x, t, cond=None: model(x, t, torch.full((x.shape[0],), K))
        for s in (0.0, 1.0, 2.5, 8.0):
            torch.testing.assert_close(cfg_two_models(model, uncond, s)(x_t, t, y), cfg_eps(model, s, K)(x_t, t, y),
                                       rtol=1e-12, atol=1e-12)


def test_two_models_calls_each_network_once_on_b_and_takes_v_from_the_conditional_one():
    from course_lib.guidance.cfg import cfg_two_models
    cond_model, seen = ToyConditional(learned=True), []

    def other(x, t, cond=None):                                         # a different unconditional network
        seen.append((x.shape[0], cond))
        return torch.cat([-x, torch.full_like(x, 9.0)], 1)              # learned variance too: its v is ignored
    x_t, y, t = _batch()
    out = cfg_two_models(cond_model, other, 3.0)(x_t, t, y)
    c = cond_model(x_t, t, y)
    torch.testing.assert_close(out[:, :1], -x_t + 3.0 * (c[:, :1] + x_t))
    assert torch.equal(out[:, 1:], c[:, 1:])
    assert seen == [(4, None)] and cond_model.calls[0][0] == 4
    sched = schedules.schedule("linear", 5)                             # and it samples
    x = sample(cfg_two_models(ToyConditional(), lambda x, t, c=None: 0.5 * x, 2.0), sched, (3, *SHAPE),
               step=ddim_step, cond=torch.tensor([0, 1, 2]), progress=False, x_T=torch.randn(3, *SHAPE, dtype=torch.float64))
    assert torch.isfinite(x).all()


def test_two_models_bad_input_fails_clearly():
    from course_lib.guidance.cfg import cfg_two_models
    model = ToyConditional()
    x_t, y, t = _batch()
    with pytest.raises(ValueError, match=">= 0"):
        cfg_two_models(model, model, -1.0)
    with pytest.raises(TypeError, match="noise predictors"):
        cfg_two_models(model, None, 2.0)
    guided = cfg_two_models(model, lambda x, t, c=None: x, 2.0)
    with pytest.raises(ValueError, match="needs a condition"):
        guided(x_t, t)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        guided(x_t, t, y[:3])
    with pytest.raises(ValueError, match="returned shape"):
        cfg_two_models(model, lambda x, t, c=None: x[:2], 2.0)(x_t, t, y)
