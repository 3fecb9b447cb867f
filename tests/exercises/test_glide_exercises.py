"""Lesson 07's checkers accept right answers written in several ways, name each catalogued slip, give a
helpful verdict (not a crash) for wrong shapes and errors, and their references are the library's code."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from course_lib.diffusion import formulas
from course_lib.exercises import Verdict
from course_lib.exercises import glide as ex
from course_lib.models import glide
from course_lib.nn.unet import AttentionBlock


def assert_close(actual, expected, rtol=1e-5, atol=1e-8):
    assert actual.shape == expected.shape and torch.allclose(actual.double(), expected.double(), rtol=rtol,
                                                            atol=atol), (actual, expected)


def broken(*args):
    raise KeyError("oops")


def _b(v, x):
    return v.to(x.dtype).view(-1, 1, 1, 1)


# ---- Exercise 1: attention over [text tokens, pixels] -----------------------------------------

def attn_by_einsum(q, k, v, ck, cv, m):
    keys, values = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
    keep = torch.cat([m, torch.ones(m.shape[0], q.shape[2], dtype=torch.bool)], 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, keys) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(keep[:, None, None, :] == 0, -1e9)      # a large negative number, not -inf
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), values)


def attn_by_sdpa(q, k, v, ck, cv, m):
    keep = torch.cat([m, m.new_ones(m.shape[0], q.shape[2])], 1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), attn_mask=keep)


def attn_image_first(q, k, v, ck, cv, m):
    """Text after the pixels, the mask in the same order: the softmax does not care about the order."""
    keys, values = torch.cat([k, ck], 2), torch.cat([v, cv], 2)
    keep = torch.cat([torch.ones_like(m[:, :1]).expand(-1, q.shape[2]), m], 1)
    w = (q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep[:, None, None], float("-inf"))
    return w.softmax(-1) @ values


def attn_in_place(q, k, v, ck, cv, m):
    """Scales q in place: the checker must not be fooled by it."""
    q /= math.sqrt(q.shape[-1])
    return attn_with(scale=1.0)(q, k, v, ck, cv, m)


def attn_with(*, mask="fill", scale=None, keys="both", invert=False, text_first=True, softmax_dim=-1):
    """Attention over the joined keys written as a learner would, with one piece to slip."""
    def fn(q, k, v, ck, cv, m):
        B, H, L, D = q.shape
        kk, vv = {"both": (torch.cat([ck, k], 2), torch.cat([cv, v], 2)), "text": (ck, cv), "image": (k, v)}[keys]
        s = q @ kk.transpose(-1, -2) * (1 / math.sqrt(D) if scale is None else scale)
        real = ~m if invert else m
        keep = {"both": torch.cat([real, torch.ones(B, L, dtype=torch.bool)] if text_first
                                  else [torch.ones(B, L, dtype=torch.bool), real], 1),
                "text": real, "image": torch.ones(B, L, dtype=torch.bool)}[keys][:, None, None, :]
        if mask == "fill":
            s = s.masked_fill(~keep, float("-inf"))
        elif mask == "multiply":
            s = s * keep
        w = s.softmax(softmax_dim)
        if mask == "after":
            w = w * keep
        return w @ vv
    return fn


@pytest.mark.parametrize("fn", [ex.context_attention_solution, ex.context_attention_reference, attn_with(),
                                attn_by_einsum, attn_by_sdpa, attn_image_first, attn_in_place])
def test_context_attention_accepts_right_answers(fn):
    verdict = ex.check_context_attention(fn)
    assert isinstance(verdict, Verdict) and verdict.ok, verdict.message
    assert str(verdict).startswith("Correct!")


@pytest.mark.parametrize("fn, named", [
    (attn_with(mask=None), "the padding mask is missing"),
    (attn_with(invert=True), "the mask is inverted"),
    (attn_with(text_first=False), "the mask does not line up with the keys"),
    (attn_with(mask="multiply"), "multiplied by the mask"),
    (attn_with(mask="after"), "zeroed after the softmax"),
    (attn_with(scale=1.0), "the 1 / sqrt(D) is missing"),
    (lambda q, *a: attn_with(scale=1.0)(q / q.shape[-1], *a), "divided by D"),
    (attn_with(keys="text"), "only the text keys"),
    (attn_with(keys="image"), "the caption is ignored"),
    (lambda q, k, v, ck, cv, m: attn_with()(q, k, v, ck, cv, m) if q.shape[0] == 2   # right on the first input only
     else attn_with(mask=None)(q, k, v, ck, cv, m), "the padding mask is missing"),
    (attn_with(softmax_dim=-2), "softmax over the queries (dim=-2)"),
    (lambda q, k, v, ck, cv, m: attn_with()(q, k, v, ck, cv, m) * float("nan"), "NaN"),
    (lambda *a: None, "return"),
    (broken, "raised KeyError"),
])
def test_context_attention_names_each_mistake(fn, named):
    verdict = ex.check_context_attention(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def _weights(q, k, v, ck, cv, m):
    keys = torch.cat([ck, k], 2)
    keep = torch.cat([m, torch.ones(m.shape[0], q.shape[2], dtype=torch.bool)], 1)[:, None, None]
    return (q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf")).softmax(-1)


@pytest.mark.parametrize("fn, named", [
    (_weights, "those are the attention weights"),
    (lambda q, k, v, ck, cv, m: _weights(q, k, v, ck, cv, m).transpose(-1, -2) @ q, "one row per key"),
    (lambda *a: ex.context_attention_solution(*a).transpose(1, 2), "the heads are moved or merged"),
    (lambda *a: ex.context_attention_solution(*a).transpose(1, 2).flatten(2), "the heads are moved or merged"),
    (lambda *a: ex.context_attention_solution(*a)[:, 0], "shape"),
    (lambda q, k, v, ck, cv, m: attn_with()(q, torch.cat([ck, k], 1), torch.cat([cv, v], 1), ck, cv, m),
     "join along the key axis, dim=2"),
    (lambda q, k, v, ck, cv, m: attn_with(mask=None)(q, k, v, ck, cv, m).masked_fill(~m[:, None, None, :], 0),
     "extend it with True for the L pixels"),
])
def test_context_attention_wrong_shapes_and_errors_get_a_helpful_verdict(fn, named):
    verdict = ex.check_context_attention(fn)
    assert isinstance(verdict, Verdict) and named in str(verdict), verdict.message


def test_context_attention_solution_is_what_the_unets_attention_block_computes():
    """An AttentionBlock with random weights (its output projection too, zero at init): its forward pass
    is x + proj(the solution applied to its own q, k, v and the caption's keys and values), over sqrt 2."""
    torch.manual_seed(0)
    block = AttentionBlock(8, 4, 2, context_dim=5).double()
    torch.nn.init.normal_(block.proj.weight)
    B, C, H, W, L = 2, 8, 3, 2, 4
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    context = torch.randn(B, L, 5, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    nh, hd = block.heads, C // block.heads
    q, k, v = block.qkv(block.norm(x)).reshape(B, 3, nh, hd, H * W).unbind(1)
    q, k, v = (z.transpose(-1, -2) for z in (q, k, v))                            # (B, nh, HW, hd)
    ck, cv = block.context_kv(context).reshape(B, L, 2, nh, hd).permute(2, 0, 3, 1, 4)   # (B, nh, L, hd)
    h = ex.context_attention_solution(q, k, v, ck, cv, mask).transpose(-1, -2).reshape(B, C, H, W)
    with torch.no_grad():
        assert_close(block(x, context, mask), (x + block.proj(h)) / math.sqrt(2))


def test_context_attention_never_reads_the_padding():
    """Changing the padded text keys and values changes nothing; changing a real token's does."""
    q, k, v, ck, cv, m = ex._context_attention_inputs()[0]
    out = ex.context_attention_solution(q, k, v, ck, cv, m)
    pad = (~m)[:, None, :, None]
    assert_close(ex.context_attention_solution(q, k, v, ck + 50 * pad, cv - 9 * pad, m), out)
    assert not torch.allclose(ex.context_attention_solution(q, k, v, ck, cv + 1.0 * ~pad, m), out)


# ---- Exercise 2: one step of inpainting by replacement ----------------------------------------

def rep_right(s, x_prev, image, mask, t, t_prev, noise):
    if (t_prev == -1).all():
        return mask * image + (1 - mask) * x_prev
    a = _b(s.alpha_bar[t_prev], image)
    return mask * (a.sqrt() * image + (1 - a).sqrt() * noise) + (1 - mask) * x_prev


def rep_by_alpha_bar_prev(s, x_prev, image, mask, t, t_prev, noise):
    """alpha_bar_prev[t] is alpha_bar at t_prev, and 1 at t = 0: the last step needs no case of its own."""
    a = formulas.extract(s.alpha_bar_prev, t, image)
    return torch.lerp(x_prev, a.sqrt() * image + (1 - a).sqrt() * noise, mask)


def rep_by_where(s, x_prev, image, mask, t, t_prev, noise):
    known = torch.where(_b(t_prev, image) < 0, image, formulas.q_sample(s, image, t_prev.clamp(min=0), noise))
    return torch.where(mask.bool(), known, x_prev)


def rep_with(known):
    def fn(s, x_prev, image, mask, t, t_prev, noise):
        return mask * known(s, image, t, t_prev, noise) + (1 - mask) * x_prev
    return fn


def q_at(idx):
    """The known image noised with alpha_bar read at idx(t, t_prev) (Python's indexing, -1 the last)."""
    def known(s, image, t, t_prev, noise):
        a = _b(s.alpha_bar[idx(t, t_prev)], image)
        return a.sqrt() * image + (1 - a).sqrt() * noise
    return known


@pytest.mark.parametrize("fn", [ex.replacement_step_solution, ex.replacement_step_reference, rep_right,
                                rep_by_alpha_bar_prev, rep_by_where])
def test_replacement_step_accepts_right_answers(fn):
    verdict = ex.check_replacement_step(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (lambda s, x, img, m, t, tp, n: rep_right(s, x, img, 1 - m, t, tp, n), "the mask is inverted"),
    (rep_with(lambda s, img, t, tp, n: img), "the known pixels are the clean image"),
    (rep_with(q_at(lambda t, tp: tp)), "you read alpha_bar[-1]"),
    (rep_with(lambda s, img, t, tp, n: formulas.q_sample(s, img, tp.clamp(min=0), n)), "noised to step 0"),
    (rep_with(q_at(lambda t, tp: t)), "noised to step t, the step just taken"),
    (lambda s, x, img, m, t, tp, n: rep_right(s, x, img, m, t, tp, n) + m * x, "the (1 - mask) on x_prev"),
    (lambda s, x, img, m, t, tp, n: rep_right(s, x, img, m, t, tp, n) - (1 - m) * x, "the known region alone"),
    (rep_with(lambda s, img, t, tp, n: img if (tp < 0).all() else
              _b(s.alpha_bar[tp], img) * img + _b(1 - s.alpha_bar[tp], img) * n), "the square roots are missing"),
    (rep_with(lambda s, img, t, tp, n: img if (tp < 0).all() else
              _b(1 - s.alpha_bar[tp], img).sqrt() * img + _b(s.alpha_bar[tp], img).sqrt() * n), "swapped"),
    (lambda s, x, img, m, t, tp, n: rep_right(s, x, img, m, t[:1].repeat(len(t)), tp[:1].repeat(len(tp)), n),
     "one step for the whole batch"),
    (rep_with(lambda s, img, t, tp, n: formulas.q_sample(s, img, tp, n)), "handle that case before calling q_sample"),
    (lambda s, x, img, m, t, tp, n: m * (s.alpha_bar[tp].sqrt() * img) + (1 - m) * x, "(B, 1, 1, 1)"),
    (lambda s, x, img, m, t, tp, n: rep_right(s, x, img, m, t, tp, n)[:, :1], "shape"),
    (lambda s, x, img, m, t, tp, n: rep_right(s, x, img, m, t, tp, n).flatten(1), "shape"),
    (lambda *a: None, "return"),
    (broken, "raised KeyError"),
])
def test_replacement_step_names_each_mistake(fn, named):
    verdict = ex.check_replacement_step(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_replacement_step_on_the_last_step_keeps_both_regions_exactly():
    s, x_prev, image, mask, t, t_prev, noise = ex._replacement_inputs()[2]
    assert (t_prev == -1).all()
    out = ex.replacement_step_solution(s, x_prev, image, mask, t, t_prev, noise)
    assert torch.equal(out * mask, image * mask) and torch.equal(out * (1 - mask), x_prev * (1 - mask))


def test_replacement_step_looped_is_the_librarys_replacement_inpaint():
    """models.glide.replacement_inpaint (resample=1) on a toy model and a toy step (neither draws noise)
    is the solution applied after every step, with the noise it draws in the same order."""
    s = ex._short()
    g = torch.Generator().manual_seed(5)
    image = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    mask = glide.half_mask(2, 4, "left")
    x_T = torch.randn(2, 3, 4, 4, generator=g)

    def eps_fn(x, t, cond):
        return torch.tanh(x) + 0.1 * t.view(-1, 1, 1, 1)

    def step(schedule, x, t, t_prev, eps, generator=None):
        return SimpleNamespace(x_prev=0.8 * x - 0.3 * eps)

    got = glide.replacement_inpaint(eps_fn, s, x_T, glide.Prompt(["", ""], image=image, mask=mask), step=step,
                                    generator=torch.Generator().manual_seed(9), progress=False)
    g, x = torch.Generator().manual_seed(9), x_T
    for i in range(s.T - 1, -1, -1):
        t = torch.full((2,), i)
        x_prev = step(s, x, t, t - 1, eps_fn(x, t, None)).x_prev
        noise = torch.randn(image.shape, generator=g) if i > 0 else torch.zeros_like(image)
        x = ex.replacement_step_solution(s, x_prev, image, mask, t, t - 1, noise)
    assert_close(got, x, rtol=1e-5, atol=1e-6)


# ---- Exercise 3: noise augmentation of the upsampler's input ----------------------------------

def aug_right(s, low, level, noise):
    out = formulas.q_sample(s, low, level, noise)
    return torch.where(_b(level, low) == 0, low, out)


def aug_by_loop(s, low, level, noise):
    rows = []
    for x, lv, n in zip(low, level.tolist(), noise):
        a = float(s.alpha_bar[lv])
        rows.append(x if lv == 0 else math.sqrt(a) * x + math.sqrt(1 - a) * n)
    return torch.stack(rows)


def aug_with(*, sig=lambda a: a.sqrt(), rest=lambda a: (1 - a).sqrt(), idx=lambda lv: lv, clean=True,
             table="alpha_bar"):
    def fn(s, low, level, noise):
        a = _b(getattr(s, table)[idx(level)], low)
        out = sig(a) * low + rest(a) * noise
        return torch.where(_b(level, low) == 0, low, out) if clean else out
    return fn


@pytest.mark.parametrize("fn", [ex.noise_augmentation_solution, ex.noise_augmentation_reference, aug_right,
                                aug_by_loop, aug_with()])
def test_noise_augmentation_accepts_right_answers(fn):
    verdict = ex.check_noise_augmentation(fn)
    assert verdict.ok, verdict.message


@pytest.mark.parametrize("fn, named", [
    (aug_with(sig=lambda a: a), "the square root on alpha_bar is missing"),
    (aug_with(sig=lambda a: a, rest=lambda a: 1 - a), "the square roots are missing"),
    (aug_with(clean=False), "level 0 is not clean"),
    (lambda s, low, level, noise: formulas.q_sample(s, low, level, noise), "level 0 is not clean"),
    (aug_with(sig=lambda a: (1 - a).sqrt(), rest=lambda a: a.sqrt()), "swapped"),
    (lambda s, low, level, noise: torch.where(_b(level, low) == 0, aug_with(clean=False)(s, low, level, noise), low),
     "the wrong way round"),
    (aug_with(sig=lambda a: torch.ones_like(a)), "the signal is not scaled"),
    (aug_with(table="alpha_bar_prev"), "level - 1"),
    (aug_with(idx=lambda lv: (lv + 1).clamp(max=999)), "level + 1"),
    (aug_with(table="alphas"), "one step's"),
    (lambda s, low, level, noise: aug_right(s, low, level[:1].repeat(len(level)), noise), "one level for the whole"),
    (lambda s, low, level, noise: low * s.alpha_bar[level].sqrt(), "(B, 1, 1, 1)"),
    (lambda s, low, level, noise: aug_right(s, low, level, noise)[..., ::2], "shape"),
    (lambda s, low, level, noise: aug_right(s, low, level, noise) / 0, "NaN or inf"),
    (lambda *a: None, "return"),
    (broken, "raised KeyError"),
])
def test_noise_augmentation_names_each_mistake(fn, named):
    verdict = ex.check_noise_augmentation(fn)
    assert not verdict.ok and named in verdict.message, verdict.message


def test_noise_augmentation_at_level_0_is_the_input_itself_and_keeps_unit_variance_elsewhere():
    s = ex._cosine()
    g = torch.Generator().manual_seed(3)
    low = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)             # unit variance, as data roughly is
    noise = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    out = ex.noise_augmentation_solution(s, low, torch.tensor([0, 300, 900]), noise)
    assert torch.equal(out[0], low[0])
    for row in (1, 2):
        assert abs(float(out[row].var()) - 1.0) < 0.15


# ---- all checkers -----------------------------------------------------------------------------

@pytest.mark.parametrize("check, catalogue", [
    (ex.check_context_attention, ex._context_attention_mistakes),
    (ex.check_replacement_step, ex._replacement_mistakes),
    (ex.check_noise_augmentation, ex._augmentation_mistakes),
])
def test_every_catalogued_slip_is_told_apart_from_the_others(check, catalogue):
    """No slip in a checker's catalogue is shadowed by an earlier one: each is named as itself."""
    for description, slip in catalogue().items():
        verdict = check(slip)
        assert not verdict.ok and description in verdict.message, (description, verdict.message)


@pytest.mark.parametrize("check", [ex.check_context_attention, ex.check_replacement_step,
                                   ex.check_noise_augmentation])
def test_a_non_function_gets_a_verdict_not_a_crash(check):
    verdict = check(42)
    assert isinstance(verdict, Verdict) and not verdict.ok and "TypeError" in verdict.message
