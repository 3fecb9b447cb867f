"""Checkers for the exercises of lesson 07 (GLIDE in miniature, Nichol et al. 2022).

Each checker runs the learner's function on fixed inputs, compares it with the library and,
when it is wrong, names the slip it reproduces.

    check_context_attention(fn)    fn(q, k, v, ck, cv, context_mask) -> attention output    GLIDE sec. 2.3
    check_replacement_step(fn)     fn(schedule, x_prev, image, mask, t, t_prev, noise) -> x_prev    sec. 4 (replacement)
    check_noise_augmentation(fn)   fn(schedule, low, level, noise) -> q_sample(low, level)   sec. 2.3 (upsampler)

Notation. Attention: q, k, v (B, H, L, D) are the image's queries, keys and values, one row per
pixel of a UNet feature map (L = h * w), H heads of width D; ck, cv (B, H, Lc, D) the caption's
keys and values (its Lc tokens projected by the attention block, nn.unet.AttentionBlock); context_mask
(B, Lc) bool, True for a real token, False for padding. The image attends over [text keys, image
keys] (text first, as the library joins them), never over padding: softmax(q K^T / sqrt(D)) V.
Inpainting: mask (B, 1, H, W) is 1 where the image is known, 0 where the model fills; t (B,) are
the code indices of the step just taken (x_t -> x_prev) and t_prev = t - 1 the step x_prev is at,
-1 on the last step (x_prev is then the finished x_0). Upsampling: level (B,) int, the augmentation
level s of each low-resolution image, an index into schedule.alpha_bar; level 0 means no noise.

The worked solutions (`*_solution`) are what the notebook shows after the exercise; the references
(`*_reference`) are the library's code paths, and the tests check that the two agree.
"""
from __future__ import annotations

import math

import torch

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas
from course_lib.exercises import Verdict, check_function
from course_lib.exercises.clip import _on_copies            # learners' in-place edits cannot leak
from course_lib.exercises.guidance import _at, _with_hint   # the same t-indexing and hints as lesson 04


def _short() -> NoiseSchedule:
    """Six steps with large betas: every slip shows plainly."""
    return NoiseSchedule.from_betas(torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.7], dtype=torch.float64))


def _cosine() -> NoiseSchedule:
    return NoiseSchedule.from_betas(cosine_betas(1000))


def _hint(verdict: Verdict, hints) -> Verdict:
    """verdict with the advice of the first (substring, advice) pair whose substring is in its message."""
    if verdict.ok:
        return verdict
    for needle, advice in hints:
        if needle in verdict.message:
            return Verdict(False, verdict.message + " -- " + advice)
    return verdict


# ---- Exercise 1: attention over [text tokens, pixels], GLIDE sec. 2.3 ------------------------

def context_attention_solution(q, k, v, ck, cv, context_mask):
    """Each pixel's query attends over the caption's tokens and the image's pixels at once."""
    B, H, L, D = q.shape
    keys = torch.cat([ck, k], dim=2)                                 # (B, H, Lc + L, D): text first
    values = torch.cat([cv, v], dim=2)                               # (B, H, Lc + L, D), in the same order
    keep = torch.cat([context_mask, context_mask.new_ones(B, L)], dim=1)   # (B, Lc + L): pixels always seen
    scores = q @ keys.transpose(-1, -2) / math.sqrt(D)               # (B, H, L, Lc + L)
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))    # padding gets weight exp(-inf) = 0
    return scores.softmax(dim=-1) @ values                           # (B, H, L, D)


def context_attention_reference(q, k, v, ck, cv, context_mask):
    """What nn.unet.AttentionBlock computes from its q, k, v and the caption's ck, cv: the course's
    attention (nn.attention.attention, its plain PyTorch backend) over the joined keys and values
    with the key padding mask extended by True for every pixel."""
    from course_lib.nn.attention import attention
    B, L = q.shape[0], q.shape[2]
    keep = torch.cat([context_mask.bool(), torch.ones(B, L, dtype=torch.bool, device=q.device)], 1)
    return attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), key_padding_mask=keep, backend="reference")


def _attend(q, keys, values, keep=None, *, scale=None, how="fill"):
    """softmax(q keys^T * scale) values with the bool mask `keep` (B, Lk) applied as `how` says:
    "fill" (-inf, right), "multiply" (scores * mask), "after" (weights * mask, not renormalised)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ keys.transpose(-1, -2) * scale                      # (B, H, L, Lk)
    if keep is None:
        return scores.softmax(-1) @ values
    m = keep[:, None, None, :]
    if how == "fill":
        return scores.masked_fill(~m, float("-inf")).softmax(-1) @ values
    if how == "multiply":
        return (scores * m.to(scores.dtype)).softmax(-1) @ values
    return (scores.softmax(-1) * m.to(scores.dtype)) @ values


def _keep(context_mask, L, *, text_first=True, invert=False):
    m = ~context_mask if invert else context_mask
    ones = torch.ones(m.shape[0], L, dtype=torch.bool)
    return torch.cat([m, ones] if text_first else [ones, m], 1)


def _context_attention_mistakes():
    def joined(q, k, v, ck, cv, m, **kw):
        keep_kw = {key: kw.pop(key) for key in ("text_first", "invert") if key in kw}
        keep = _keep(m, q.shape[2], **keep_kw) if kw.pop("masked", True) else None
        return _attend(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), keep, **kw)

    return {
        "the padding mask is missing: the padded caption tokens are attended like real words; mask them with "
        "scores.masked_fill(~keep, -inf), keep = cat([context_mask, True for each pixel], dim=1)":
            lambda q, k, v, ck, cv, m: joined(q, k, v, ck, cv, m, masked=False),
        "the mask is inverted: context_mask is True for a real token, so the real words were hidden and the "
        "padding attended; mask where context_mask is False (~keep)":
            lambda q, k, v, ck, cv, m: joined(q, k, v, ck, cv, m, invert=True),
        "the mask does not line up with the keys: the text keys come first in cat([ck, k]), so the mask must "
        "be cat([context_mask, ones for the pixels]) in that order (yours masks some pixel keys instead)":
            lambda q, k, v, ck, cv, m: joined(q, k, v, ck, cv, m, text_first=False),
        "the scores are multiplied by the mask: a masked score of 0 still gets weight exp(0) in the softmax; "
        "set masked scores to -inf (masked_fill) so that their weight is exactly 0":
            lambda q, k, v, ck, cv, m: joined(q, k, v, ck, cv, m, how="multiply"),
        "the padded weights are zeroed after the softmax, so each row no longer sums to 1; mask the scores "
        "before the softmax (masked_fill with -inf) and the softmax renormalises over the real keys":
            lambda q, k, v, ck, cv, m: joined(q, k, v, ck, cv, m, how="after"),
        "the 1 / sqrt(D) is missing: the scores are q k^T / sqrt(D), D the head width q.shape[-1]":
            lambda q, k, v, ck, cv, m: joined(q, k, v, ck, cv, m, scale=1.0),
        "the scores are divided by D; scaled dot-product attention divides by sqrt(D)":
            lambda q, k, v, ck, cv, m: joined(q, k, v, ck, cv, m, scale=1.0 / q.shape[-1]),
        "only the text keys are attended (the image's own keys and values are dropped); GLIDE joins the "
        "caption's keys and values to the image's: keys = cat([ck, k], dim=2), values = cat([cv, v], dim=2)":
            lambda q, k, v, ck, cv, m: _attend(q, ck, cv, m),
        "the caption is ignored: that is the image's self-attention alone; join the text keys and values "
        "before the image's, keys = cat([ck, k], dim=2), values = cat([cv, v], dim=2)":
            lambda q, k, v, ck, cv, m: _attend(q, k, v),
        "the keys and the values are joined in different orders (cat([ck, k]) but cat([v, cv]), or the other "
        "way): value j must belong to key j, so join both text first":
            lambda q, k, v, ck, cv, m: _attend(q, torch.cat([ck, k], 2), torch.cat([v, cv], 2),
                                               _keep(m, q.shape[2])),
    }


def _context_attention_inputs():
    """Sizes that differ (B, H, L, Lc, D), so a join or a softmax over the wrong axis shows; rows with and
    without padding, one with a single real token; padded keys and values large, as untrained padding
    embeddings can be, so attending them shows."""
    g = torch.Generator().manual_seed(71)

    def case(B, H, L, Lc, D, lengths, dtype=torch.float64):
        q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
        ck, cv = (torch.randn(B, H, Lc, D, generator=g, dtype=torch.float64) for _ in range(2))
        mask = torch.arange(Lc)[None, :] < torch.tensor(lengths)[:, None]           # (B, Lc), True = real
        pad = (~mask)[:, None, :, None]
        ck, cv = torch.where(pad, 3 * ck, ck), torch.where(pad, 3 * cv + 2, cv)
        return tuple(x.to(dtype) for x in (2 * q, k, v, ck, cv)) + (mask,)

    return [case(2, 3, 5, 4, 6, [4, 2]),
            case(3, 1, 4, 7, 8, [2, 7, 1], torch.float32),
            case(1, 2, 9, 3, 4, [1])]


def _context_shape_message(fn, args):
    """A clearer message for an output of a known wrong shape."""
    try:
        out = fn(*args)
        shape = tuple(out.shape)
    except Exception:
        return None
    q, ck = args[0], args[3]
    B, H, L, D = q.shape
    Lc = ck.shape[2]
    if shape == (B, H, L, Lc + L):
        return (f"shape {shape}: those are the attention weights, one per (query, key); multiply them by the "
                "joined values to get the output (B, H, L, D)")
    if shape == (B, H, Lc + L, D):
        return (f"shape {shape}: one row per key (Lc + L); the output has one row per image query, L: the text "
                "joins the keys and values only, never the queries")
    if shape in ((B, L, H, D), (B, L, H * D)):
        return (f"shape {shape}: the heads are moved or merged; return (B, H, L, D), as q is (the attention "
                "block merges the heads afterwards)")
    return None


def check_context_attention(fn) -> Verdict:
    """Exercise 1: fn(q, k, v, ck, cv, context_mask) -> (B, H, L, D): each image query attends over
    [text keys, image keys] with the padded text tokens masked, softmax(q K^T / sqrt(D)) V.
    q, k, v (B, H, L, D); ck, cv (B, H, Lc, D); context_mask (B, Lc) bool, True = a real token."""
    inputs = _context_attention_inputs()
    verdict = check_function(_on_copies(fn), context_attention_reference, inputs,
                             mistakes=_context_attention_mistakes())
    if not verdict.ok and verdict.message.startswith("shape"):
        for args in inputs:
            better = _context_shape_message(_on_copies(fn), args)
            if better:
                return Verdict(False, better)
    return _hint(verdict, [
        ("Sizes of tensors must match except in dimension",
         "join along the key axis, dim=2: ck (B, H, Lc, D) and k (B, H, L, D) give (B, H, Lc + L, D)"),
        ("must match the size of tensor",
         "the mask (B, Lc) covers the text keys only: extend it with True for the L pixels, "
         "cat([context_mask, ones(B, L)], dim=1), and view it as (B, 1, 1, Lc + L) to broadcast over heads "
         "and queries"),
        ("NaN or inf",
         "a softmax over scores that are all -inf gives NaN: is the softmax over the queries (dim=-2) instead of "
         "the keys (dim=-1), or is every key of a row masked?"),
        ("bitwise_not", "context_mask is bool: invert it with ~context_mask (or use context_mask == False)"),
    ])


# ---- Exercise 2: one step of inpainting by replacement, GLIDE sec. 4 / Song et al. 2021 ------

def replacement_step_solution(schedule, x_prev, image, mask, t, t_prev, noise):
    """After the sampler's step x_t -> x_prev, overwrite the known pixels with the known image noised
    to the step x_prev is at, t_prev, so they carry as much noise as the rest."""
    if bool((t_prev < 0).all()):                                     # the last step: x_prev is x_0
        known = image                                                # so the known pixels are exact
    else:
        known = formulas.q_sample(schedule, image, t_prev, noise)   # q(x_{t_prev} | x_0 = image), DDPM eq. 4
    return mask * known + (1 - mask) * x_prev                        # mask 1: known, 0: the model's pixels


def replacement_step_reference(schedule, x_prev, image, mask, t, t_prev, noise):
    """What models.glide.replacement_inpaint does after each step (the tests run its loop and check):
    mask * q_sample(image, t_prev, noise) + (1 - mask) * x_prev, the clean image where t_prev = -1."""
    noised = formulas.q_sample(schedule, image, t_prev.clamp(min=0), noise)
    known = torch.where((t_prev < 0).view(-1, 1, 1, 1), image, noised)
    return mask * known + (1 - mask) * x_prev


def _noised(s, image, idx, noise, *, sqrt=True, swap=False):
    """sqrt(alpha_bar[idx]) image + sqrt(1 - alpha_bar[idx]) noise, with a slip: no square roots, or the
    two weights swapped. idx is used as given (a negative index wraps, as Python's does)."""
    a = s.alpha_bar[idx % s.T].to(image.dtype).view(-1, 1, 1, 1)
    signal, rest = (a.sqrt(), (1 - a).sqrt()) if sqrt else (a, 1 - a)
    if swap:
        signal, rest = rest, signal
    return signal * image + rest * noise


def _clean_at_end(t_prev, image, noised):
    return torch.where((t_prev < 0).view(-1, 1, 1, 1), image, noised)


def _replacement_mistakes():
    def known(s, image, t_prev, noise, **slip):
        return _clean_at_end(t_prev, image, _noised(s, image, t_prev, noise, **slip))

    return {
        "the mask is inverted: mask is 1 where the image is known, so x_prev = mask * known + (1 - mask) * x_prev "
        "(yours overwrote the region the model is to fill)":
            lambda s, x, img, m, t, tp, n: (1 - m) * known(s, img, tp, n) + m * x,
        "the known pixels are the clean image; x_prev carries the noise of step t_prev, so the known region must "
        "too: q_sample(schedule, image, t_prev, noise) (only at t_prev = -1 is it the clean image)":
            lambda s, x, img, m, t, tp, n: m * img + (1 - m) * x,
        "at t_prev = -1 you read alpha_bar[-1], Python's last entry, the noisiest step: on the last step x_prev "
        "is the finished x_0, so the known region is the clean image itself":
            lambda s, x, img, m, t, tp, n: m * _noised(s, img, tp, n) + (1 - m) * x,
        "at t_prev = -1 the known image is noised to step 0 (alpha_bar_0 < 1 still adds a little noise); on the "
        "last step x_prev is x_0, so the known region is the clean image itself":
            lambda s, x, img, m, t, tp, n: m * _noised(s, img, tp.clamp(min=0), n) + (1 - m) * x,
        "the known image is noised to step t, the step just taken; x_prev is at step t_prev = t - 1, so noise "
        "it to t_prev: q_sample(schedule, image, t_prev, noise)":
            lambda s, x, img, m, t, tp, n: m * _noised(s, img, t, n) + (1 - m) * x,
        "the (1 - mask) on x_prev is missing: inside the known region x_prev must be replaced, not added to: "
        "mask * known + (1 - mask) * x_prev":
            lambda s, x, img, m, t, tp, n: m * known(s, img, tp, n) + x,
        "you returned the known region alone (mask * known); the model's pixels (1 - mask) * x_prev belong "
        "in the result too": lambda s, x, img, m, t, tp, n: m * known(s, img, tp, n),
        "the square roots are missing: q_sample is sqrt(alpha_bar) image + sqrt(1 - alpha_bar) noise":
            lambda s, x, img, m, t, tp, n: m * known(s, img, tp, n, sqrt=False) + (1 - m) * x,
        "the signal and noise weights are swapped: q_sample is sqrt(alpha_bar) image + sqrt(1 - alpha_bar) noise":
            lambda s, x, img, m, t, tp, n: m * known(s, img, tp, n, swap=True) + (1 - m) * x,
        "you used one step for the whole batch (t_prev[0]); each row is at its own step t_prev":
            lambda s, x, img, m, t, tp, n: replacement_step_reference(s, x, img, m, t[:1].expand_as(t),
                                                                      tp[:1].expand_as(tp), n),
    }


def _replacement_inputs():
    """The short schedule with rows at different steps first (every slip differs there), then the cosine
    schedule at both ends, and the last step (t = 0, t_prev = -1 for the whole batch) on both schedules,
    one in float32. Masks are rectangles: every row has known and missing pixels."""
    g = torch.Generator().manual_seed(72)
    short, cosine = _short(), _cosine()

    def case(schedule, t, shape=(3, 6, 5), dtype=torch.float64):
        t = torch.tensor(t)
        B = len(t)
        x_prev, noise = (torch.randn(B, *shape, generator=g, dtype=torch.float64) for _ in range(2))
        image = torch.rand(B, *shape, generator=g, dtype=torch.float64) * 2 - 1
        mask = torch.ones(B, 1, *shape[1:], dtype=torch.float64)
        for i in range(B):                                           # a rectangle to fill in each row
            top, left = int(torch.randint(0, shape[1] - 2, (1,), generator=g)), i % (shape[2] - 2)
            mask[i, 0, top:top + 3, left:left + 2] = 0
        cast = (lambda x: x.to(dtype))
        return schedule, cast(x_prev), cast(image), cast(mask), t, t - 1, cast(noise)

    return [case(short, [3, 5, 1, 2]),
            case(cosine, [999, 500, 1]),
            case(short, [0, 0, 0, 0]),
            case(cosine, [0, 0, 0], shape=(3, 4, 6), dtype=torch.float32),
            case(cosine, [620, 620, 620, 620, 620], shape=(3, 4, 4), dtype=torch.float32)]


def check_replacement_step(fn) -> Verdict:
    """Exercise 2: fn(schedule, x_prev, image, mask, t, t_prev, noise) -> x_prev with its known pixels
    replaced: mask * q_sample(schedule, image, t_prev, noise) + (1 - mask) * x_prev.

    t (B,): the step just taken, x_t -> x_prev; t_prev = t - 1 (B,): the step x_prev is at, whose noise
    the known pixels must carry. On the last step t = 0 and t_prev = -1 for the whole batch: x_prev is
    the finished x_0 and the known pixels are the clean image itself. mask (B, 1, H, W), 1 = known;
    image, x_prev, noise (B, C, H, W)."""
    verdict = _with_hint(check_function(_on_copies(fn), replacement_step_reference, _replacement_inputs(),
                                        mistakes=_replacement_mistakes()))
    return _hint(verdict, [
        ("got values from -1",
         "at t_prev = -1 (the last step) there is nothing to noise: x_prev is the finished x_0, so the known "
         "region is the clean image itself; handle that case before calling q_sample"),
    ])


# ---- Exercise 3: noise augmentation of the upsampler's input, GLIDE sec. 2.3 -----------------

def noise_augmentation_solution(schedule, low, level, noise):
    """q_sample(low, level) per row, and the low-resolution image untouched where level = 0."""
    a = schedule.alpha_bar[level].to(low.dtype).view(-1, 1, 1, 1)   # alpha_bar at each row's level, (B, 1, 1, 1)
    noised = a.sqrt() * low + (1 - a).sqrt() * noise                 # q(x_s | x_0 = low), DDPM eq. 4
    clean = (level == 0).view(-1, 1, 1, 1)                           # level 0: no noise at all
    return torch.where(clean, low, noised)


def noise_augmentation_reference(schedule, low, level, noise):
    """models.glide.augment, what the upsampler's training and sampling apply."""
    from course_lib.models.glide import augment
    return augment(schedule, low, level, noise)


def _augmented(s, low, level, noise, *, coef=None, clean_at_zero=True, idx=None, swap=False, table=None):
    """sqrt(alpha_bar) low + sqrt(1 - alpha_bar) noise at each row's level, with one piece slipped
    (table: the values read in place of schedule.alpha_bar)."""
    a = _at(s.alpha_bar if table is None else table, level if idx is None else idx(level), low)
    signal, rest = coef(a) if coef else (a.sqrt(), (1 - a).sqrt())
    if swap:
        signal, rest = rest, signal
    out = signal * low + rest * noise
    return torch.where((level == 0).view(-1, 1, 1, 1), low, out) if clean_at_zero else out


def _augmentation_mistakes():
    def aug(**slip):
        return lambda s, low, level, noise: _augmented(s, low, level, noise, **slip)

    return {
        "the square root on alpha_bar is missing: the signal's weight is sqrt(alpha_bar_s), so that the noised "
        "image keeps unit variance (alpha_bar + (1 - alpha_bar) = 1)": aug(coef=lambda a: (a, (1 - a).sqrt())),
        "the square roots are missing: q_sample is sqrt(alpha_bar_s) low + sqrt(1 - alpha_bar_s) noise":
            aug(coef=lambda a: (a, 1 - a)),
        "level 0 is not clean: q_sample at index 0 still adds a little noise (alpha_bar_0 < 1); where level is "
        "0 return low itself, e.g. torch.where(level == 0, low, noised)": aug(clean_at_zero=False),
        "the signal and noise weights are swapped: q_sample is sqrt(alpha_bar_s) low + sqrt(1 - alpha_bar_s) "
        "noise": aug(swap=True),
        "the torch.where is the wrong way round: the rows at level 0 are noised and the others left clean; "
        "torch.where(level == 0, low, noised)":
            lambda s, low, level, noise: torch.where((level == 0).view(-1, 1, 1, 1),
                                                     _augmented(s, low, level, noise, clean_at_zero=False), low),
        "the signal is not scaled: low + sqrt(1 - alpha_bar_s) noise adds variance; q_sample shrinks the signal "
        "too, sqrt(alpha_bar_s) low + sqrt(1 - alpha_bar_s) noise": aug(coef=lambda a: (torch.ones_like(a),
                                                                                         (1 - a).sqrt())),
        "the level is off by one: you read alpha_bar at level - 1 (alpha_bar_prev[level]); level s is the index "
        "s into schedule.alpha_bar, q_sample(low, s)": aug(idx=lambda level: level - 1),
        "the level is off by one: you read alpha_bar at level + 1; level s is the index s into "
        "schedule.alpha_bar, q_sample(low, s)": aug(idx=lambda level: level + 1),
        "you used alpha_s = 1 - beta_s, one step's; q_sample jumps to level s at once, through the cumulative "
        "alpha_bar_s = schedule.alpha_bar[s]":
            lambda s, low, level, noise: _augmented(s, low, level, noise, table=s.alphas),
        "you used one level for the whole batch (level[0]); each row has its own level s":
            lambda s, low, level, noise: noise_augmentation_reference(s, low, level[:1].expand_as(level), noise),
    }


def _augmentation_inputs():
    """The short schedule first (every slip differs plainly; B differs from C, H and W, so a (B,) factor
    that is not reshaped raises), then the cosine schedule at both ends, a float32 batch and an all-clean one."""
    g = torch.Generator().manual_seed(73)

    def case(schedule, level, shape=(3, 4, 6), dtype=torch.float64):
        low = torch.rand(len(level), *shape, generator=g, dtype=torch.float64) * 2 - 1
        noise = torch.randn(len(level), *shape, generator=g, dtype=torch.float64)
        return schedule, low.to(dtype), torch.tensor(level), noise.to(dtype)

    short, cosine = _short(), _cosine()
    return [case(short, [3, 0, 1, 4, 0]),
            case(cosine, [999, 1, 0], shape=(3, 8, 8)),
            case(cosine, [250, 40, 0, 499], dtype=torch.float32),
            case(cosine, [0, 0], shape=(3, 5, 5))]


def check_noise_augmentation(fn) -> Verdict:
    """Exercise 3: fn(schedule, low, level, noise) -> q_sample(schedule, low, level, noise) per row, and
    low itself where level = 0; low, noise (B, C, h, w), level (B,) int indices into schedule.alpha_bar."""
    return _with_hint(check_function(_on_copies(fn), noise_augmentation_reference, _augmentation_inputs(),
                                     mistakes=_augmentation_mistakes()))
