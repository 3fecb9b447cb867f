"""GLIDE in miniature (models.glide, nn.transformer): text reaches the UNet two ways, caption CFG is
eq. 6 on captions, warm starts are exact, inpainting keeps the known region, augmentation is q_sample."""
import math
import warnings

import pytest
import torch

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas
from course_lib.guidance.cfg import cfg_eps
from course_lib.models import glide
from course_lib.models.clip import PAD
from course_lib.nn.transformer import TextTransformer, last_token
from course_lib.nn.unet import UNet, UNetConfig


def tiny_unet(**kw):
    base = dict(image_size=16, in_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), head_channels=16, norm_groups=4, context_dim=32)
    base.update(kw)
    return UNetConfig(**base)


def tiny(kind="base", seed=0, **kw):
    torch.manual_seed(seed)
    unet = tiny_unet(cond_channels=glide.COND_CHANNELS[kind], **kw)
    cfg = glide.GlideConfig(unet=unet, kind=kind, text_width=32, text_layers=1, text_heads=2, low_res=8)
    model = glide.Glide(cfg).eval()
    with torch.no_grad():   # zero-initialised residuals would hide the text: give them weights
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    return model


SCHED = NoiseSchedule.from_betas(cosine_betas(1000))


def x_and_t(B=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, size, size, generator=g), torch.tensor([10, 500][:B] + [900] * max(0, B - 2))


# ---------------------------------------------------------------- the text transformer

def test_padding_never_reaches_real_tokens():
    torch.manual_seed(0)
    tf = TextTransformer(16, 8, width=32, layers=2, heads=2).eval()
    tok = torch.tensor([[1, 5, 6, 15, 0, 0, 0, 0]])
    mask = tok != 0
    other = tok.clone()
    other[0, 4:] = torch.tensor([3, 9, 2, 7])         # different ids in the padded slots
    a, b = tf(tok, mask), tf(other, mask)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert torch.equal(last_token(a, mask), a[:, 3])


def test_transformer_rejects_bad_tokens():
    tf = TextTransformer(16, 8, width=32, layers=1, heads=2)
    with pytest.raises(ValueError, match="token ids"):
        tf(torch.tensor([[1, 99]]), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="context length"):
        tf(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        tf(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(ValueError, match="no real token"):
        last_token(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------- the model

def test_tokens_empty_caption_is_start_end():
    m = tiny()
    tok = m.tokens(["", "a red circle"])
    assert tok[0, 0] == 1 and tok[0, 1] == m.tokenizer.eot and (tok[0, 2:] == PAD).all()
    assert (tok[1] != PAD).sum() == 5   # start, a, red, circle, end


def test_caption_reaches_output_through_both_paths():
    m = tiny()
    x, t = x_and_t()
    a = m(x, t, ["a red circle", "a blue square"])
    b = m(x, t, ["a green cross", "a blue square"])
    assert a.shape == x.shape
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)
    # tokens only through attention: zero the pooled path and the caption still matters
    with torch.no_grad():
        m.text_to_emb.weight.zero_(); m.text_to_emb.bias.zero_()
    assert not torch.allclose(m(x, t, ["a red circle"] * 2), m(x, t, ["a green cross"] * 2))
    # pooled only: drop every attention's text keys and the caption still matters
    m2 = tiny()
    for blk in m2.unet.modules():
        if getattr(blk, "context_kv", None) is not None:
            blk.context_kv = None
    assert not torch.allclose(m2(x, t, ["a red circle"] * 2), m2(x, t, ["a green cross"] * 2))


def test_none_and_empty_captions_agree():
    m = tiny()
    x, t = x_and_t()
    assert torch.allclose(m(x, t, None), m(x, t, ["", ""]))
    assert torch.allclose(m(x, t, "a red circle"), m(x, t, ["a red circle"] * 2))


def test_caption_cfg_is_equation_6():
    m = tiny()
    x, t = x_and_t()
    caps = ["a red circle left of a blue square", "a green triangle"]
    fn = lambda x_t, t_, c: m(x_t, t_, c)  # noqa: E731
    for s in (0.0, 1.0, 3.0):
        got = cfg_eps(fn, s, null_class="")(x, t, caps)
        cond, uncond = m(x, t, caps), m(x, t, ["", ""])
        assert torch.allclose(got, uncond + s * (cond - uncond), atol=1e-5)


def test_caption_cfg_duplicates_the_inpainting_inputs():
    m = tiny("inpaint")
    x, t = x_and_t()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = glide.half_mask(2, 16, "left")
    p = glide.Prompt(["a red circle", "a blue square"], image=img, mask=mask)
    got = cfg_eps(lambda a, b, c: m(a, b, c), 2.0, null_class="")(x, t, p)
    cond = m(x, t, p)
    uncond = m(x, t, p._replace(captions=["", ""]))
    assert torch.allclose(got, uncond + 2 * (cond - uncond), atol=1e-5)


def test_warm_start_from_unet_copies_every_unet_weight():
    torch.manual_seed(3)
    src = UNet(tiny_unet(context_dim=None))
    m = glide.Glide(glide.GlideConfig(unet=tiny_unet(), text_width=32, text_layers=1, text_heads=2))
    m.warm_start(src)
    own = m.unet.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(own[k], v), k
    # the pooled text starts at zero: the embedding every ResBlock reads is the source's
    assert m.text_to_emb.weight.abs().sum() == 0


def test_inpaint_warm_start_from_base_is_the_base_model_at_step_0():
    base = tiny("base", seed=4)
    inp = glide.Glide(glide.GlideConfig(unet=tiny_unet(cond_channels=4), kind="inpaint", text_width=32,
                                        text_layers=1, text_heads=2)).warm_start(base).eval()
    x, t = x_and_t()
    p = glide.Prompt(["a red circle"] * 2, image=torch.zeros(2, 3, 16, 16), mask=glide.half_mask(2, 16, "top"))
    assert torch.allclose(inp(x, t, p), base(x, t, ["a red circle"] * 2), atol=1e-6)


def test_warm_start_refuses_a_mismatch():
    m = glide.Glide(glide.GlideConfig(unet=tiny_unet(), text_width=32, text_layers=1, text_heads=2))
    with pytest.raises(ValueError, match="cannot warm-start"):
        m.warm_start(UNet(tiny_unet(base_channels=8, norm_groups=4, head_channels=8, context_dim=None)))


def test_upsampler_reads_low_res_and_level():
    m = tiny("upsample")
    x, t = x_and_t()
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    lv = torch.zeros(2, dtype=torch.long)
    a = m(x, t, glide.Prompt(["a red circle"] * 2, low_res=low, aug_level=lv))
    b = m(x, t, glide.Prompt(["a red circle"] * 2, low_res=-low, aug_level=lv))
    c = m(x, t, glide.Prompt(["a red circle"] * 2, low_res=low, aug_level=lv + 300))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------- bad input

def test_bad_masks_and_images_are_clear_errors():
    m = tiny("inpaint")
    x, t = x_and_t()
    img = torch.zeros(2, 3, 16, 16)
    good = glide.half_mask(2, 16, "left")
    cases = [(good[:, :, :8], ValueError, "shaped"), (good * 0.5, ValueError, "only 0"),
             (good.to(torch.complex64), TypeError, "bool or real"), ("mask", TypeError, "mask tensor")]
    for mask, err, msg in cases:
        with pytest.raises(err, match=msg):
            m(x, t, glide.Prompt(["a red circle"] * 2, image=img, mask=mask))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        m(x, t, glide.Prompt(["a red circle"] * 2, image=img + 3, mask=good))
    with pytest.raises(ValueError, match="NaN"):
        m(x, t, glide.Prompt(["a red circle"] * 2, image=img * float("nan"), mask=good))
    assert m(x, t, glide.Prompt(["a red circle"] * 2, image=img, mask=good.bool())).shape == x.shape
    with pytest.raises(ValueError, match="base GLIDE model takes captions only"):
        tiny()(x, t, glide.Prompt(["a"] * 2, image=img, mask=good))


def test_bad_prompts():
    m = tiny()
    x, t = x_and_t()
    with pytest.raises(ValueError, match="captions for a batch"):
        m(x, t, ["a red circle"])
    with pytest.raises(TypeError, match="captions"):
        m(x, t, torch.zeros(2))
    with pytest.raises(ValueError, match="outside the shapes vocabulary"):
        glide.sample(m, ["a red elephant"], steps=2)
    with pytest.raises(ValueError, match="no prompts"):
        glide.sample(m, [], steps=2)
    with pytest.warns(UserWarning, match="unconditional"):
        glide.sample(m, [""], steps=2, progress=False)
    with pytest.warns(UserWarning, match="cut to"):
        glide.sample(m, [" ".join(["a red circle left of a blue square"] * 3)], steps=2, progress=False)


# ---------------------------------------------------------------- inpainting, masks, augmentation

def test_replacement_keeps_the_known_region_exactly():
    img = torch.rand(3, 3, 16, 16) * 2 - 1
    mask = glide.half_mask(3, 16, "right")
    from course_lib.samplers import respace
    from course_lib.samplers.ddpm import ddpm_step
    spaced = respace.respace(SCHED, respace.even_timesteps(1000, 5))
    eps_fn = lambda x_t, t, c: torch.zeros_like(x_t)  # noqa: E731
    for r in (1, 3):
        x = glide.replacement_inpaint(eps_fn, spaced.schedule, torch.randn(3, 3, 16, 16), glide.Prompt(["a"] * 3, img, mask),
                                      step=ddpm_step, generator=torch.Generator().manual_seed(0), resample=r,
                                      progress=False)
        assert torch.equal(x * mask, img * mask)
        assert not torch.allclose(x * (1 - mask), img * (1 - mask))


def test_sample_by_replacement_end_to_end():
    m = tiny()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = glide.half_mask(2, 16, "bottom")
    caps = ["a red circle", "a blue square"]
    x = glide.sample(m, caps, steps=3, scale=2.0, progress=False, extra=glide.Prompt(caps, image=img, mask=mask),
                     replace_known=True)
    assert torch.equal(x * mask, img * mask)


def test_random_masks():
    a = glide.random_masks(64, 32, torch.Generator().manual_seed(0))
    b = glide.random_masks(64, 32, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (64, 1, 32, 32)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    hidden = (a == 0).float().mean((1, 2, 3))
    assert (hidden > 0).all() and (hidden < 1).all()
    with pytest.raises(ValueError, match="side"):
        glide.half_mask(1, 8, "middle")


def test_augment_is_q_sample_and_level_0_is_clean():
    low = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn(4, 3, 8, 8)
    lv = torch.tensor([0, 1, 100, 499])
    out = glide.augment(SCHED, low, lv, noise)
    assert torch.equal(out[0], low[0])
    ab = torch.as_tensor(SCHED.alpha_bar, dtype=torch.float64)[[1, 100, 499]][:, None, None, None]
    want = ab.sqrt() * low[1:].double() + (1 - ab).sqrt() * noise[1:].double()
    assert torch.allclose(out[1:].double(), want, atol=1e-5), (out[1:].double() - want).abs().max()
    assert torch.equal(glide.augment(SCHED, low, 0, noise), low)


def test_downsample_is_an_area_average():
    x = torch.arange(16.).reshape(1, 1, 4, 4)
    assert torch.allclose(glide.downsample(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


# ---------------------------------------------------------------- training losses

class _R:
    def __init__(self, dropout):
        self.label_dropout, self.bf16, self.T = dropout, False, 1000

    def noise_schedule(self):
        return SCHED


def _codes(n):
    from course_lib.data.shapes import ShapesDataset
    return ShapesDataset("train", 32, n, 0).labels


def test_caption_dropout_rate():
    from course_lib.training.trainer import step_generator
    y = _codes(400)
    none = glide._captions(None, _R(0.0), y, step_generator(0, 0), y[:, 0])
    every = glide._captions(None, _R(1.0), y, step_generator(0, 0), y[:, 0])
    some = glide._captions(None, _R(0.15), y, step_generator(0, 0), y[:, 0])
    assert all(c for c in none) and not any(every)
    share = sum(not c for c in some) / len(some)
    assert 0.09 < share < 0.21


@pytest.mark.parametrize("kind,loss", [("base", glide.glide_loss), ("inpaint", glide.inpaint_loss),
                                       ("upsample", glide.upsample_loss)])
def test_losses_are_finite_and_train(kind, loss):
    from course_lib.training.trainer import step_generator
    m = tiny(kind).train()
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    y = _codes(8)
    value = loss(m, _R(0.15), x0, y, step_generator(0, 0))
    assert torch.isfinite(value) and value.ndim == 0
    value.backward()
    assert m.text.token_embed.weight.grad.abs().sum() > 0   # the text tower learns with the UNet


def test_text_attention_rows_are_distributions():
    m = tiny()
    x, t = x_and_t()
    p, tok, mask = glide.text_attention(m, x, t, ["a red circle", "a blue square left of a green cross"])
    L = tok.shape[1]
    assert p.shape[-1] == L + 64
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
    assert (p[..., :L][~mask[:, None, None, :].expand_as(p[..., :L])] == 0).all()
    words = glide.token_words(m, tok)
    assert words[0] == ["<start>", "a", "red", "circle", "<end>"]


def test_diversity_is_zero_for_copies_and_grows_with_spread():
    from course_lib.eval.attributes import diversity
    from course_lib.data.shapes import ShapesDataset
    x = ShapesDataset("test", 32, 8, 0).images
    same = x[:1].repeat(8, 1, 1, 1)
    assert diversity(same, 4) == pytest.approx(0.0, abs=1e-4)
    assert diversity(x, 4) > 0.1
    with pytest.raises(ValueError, match="groups"):
        diversity(x[:7], 4)


def test_text_parts_get_their_own_learning_rate():
    from course_lib.training import recipes, trainer
    m = tiny()
    rest, new = trainer.param_groups(m, recipes.get("shapes_glide"))
    names = {id(p): n for n, p in m.named_parameters()}
    new_names = {names[id(p)] for p in new["params"]}
    assert new["lr_mult"] == recipes.get("shapes_glide").class_embed_lr_mult > 1
    assert any(n.startswith("text.") for n in new_names) and any(".context_kv." in n for n in new_names)
    assert "text_to_emb.weight" in new_names and not any(n.startswith("unet.conv_in") for n in new_names)
    assert len(rest["params"]) + len(new["params"]) == len(list(m.parameters()))


def test_clip_text_tower_is_shapes_clips_and_its_end_token_is_clips_pooled_text():
    from course_lib.training import checkpoints
    from course_lib.nn.transformer import last_token
    clip = checkpoints.load_pretrained("shapes_clip")
    tower = glide.ClipTextTokens()
    tower.load_state_dict(glide.ClipTextTokens.weights_of(clip))
    tok = clip.tokens(["a red circle on the left", "a blue square left of a green cross"])
    pooled = last_token(tower(tok, tok != PAD), tok != PAD)
    proj = clip.clip.text_projection
    mine = proj(pooled) if isinstance(proj, torch.nn.Module) else pooled @ proj
    torch.testing.assert_close(mine, clip.clip.encode_text(tok), atol=1e-5, rtol=1e-5)


def test_bidirectional_clip_text_tower_reads_the_whole_caption_and_never_the_padding():
    """text_causal=False: each real token's features equal those of the caption run alone, unpadded and
    with no mask at all (an independent forward), so the padding is never read; and the first word's
    features change with a later word, which the causal tower cannot see."""
    torch.manual_seed(0)
    tower = glide.ClipTextTokens(causal=False).eval()
    causal = glide.ClipTextTokens(causal=True).eval()
    causal.load_state_dict(tower.state_dict())
    m = glide.Glide(glide.GlideConfig(text_encoder="clip", text_causal=False))
    caps = ["a red circle left of a blue square", "a blue square right of a red circle", ""]
    tok = m.tokens(caps)
    mask = tok != PAD
    with torch.no_grad():
        out = tower(tok, mask)
        for i in range(len(caps)):
            n = int(mask[i].sum())
            alone = tower.token_embedding(tok[i:i + 1, :n]) + tower.positional_embedding[:n]
            alone = tower.ln_final(tower.transformer(alone, attn_mask=None))
            torch.testing.assert_close(out[i, :n], alone[0], atol=1e-5, rtol=1e-5)
        other = m.tokens(["a red circle right of a blue square"])
        # token 2 is "red": the bidirectional tower hears the relation after it, the causal one does not
        assert (tower(other, other != PAD)[0, 2] - out[0, 2]).abs().max() > 1e-3
        torch.testing.assert_close(causal(other, other != PAD)[0, 2], causal(tok, mask)[0, 2])
    with pytest.raises(ValueError, match="mask must be shaped"):
        tower(tok, mask[:, :5])


def test_clip_text_warm_start_and_learning_rates():
    from course_lib.training import checkpoints, recipes, trainer
    r = recipes.get("shapes_glide")
    assert r.model_config.text_encoder == "clip"
    m = r.build_model()
    checkpoints.warm_start(m, r.init_from)
    clip = checkpoints.load_pretrained("shapes_clip")
    for k, v in glide.ClipTextTokens.weights_of(clip).items():
        assert torch.equal(m.text.state_dict()[k], v), k
    ddpm = checkpoints.load_pretrained("shapes_ddpm").state_dict()
    assert all(torch.equal(m.unet.state_dict()[k], v) for k, v in ddpm.items())
    rest, new = trainer.param_groups(m, r)
    names = {id(p): n for n, p in m.named_parameters()}
    assert not any(names[id(p)].startswith("text.") for p in new["params"])   # the CLIP tower: the base rate
    assert any(names[id(p)].startswith("text_to_emb.") for p in new["params"])
    with pytest.raises(ValueError, match="text_encoder"):
        glide.GlideConfig(text_encoder="bert")


def test_low_pass_upsample_keeps_the_input_exactly():
    m = tiny("upsample")
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    caps = ["a red circle", "a blue square"]
    p = glide.Prompt(caps, low_res=low, aug_level=torch.zeros(2, dtype=torch.long))
    x = glide.sample(m, caps, steps=3, scale=1.0, progress=False, extra=p, low_pass=True)
    torch.testing.assert_close(glide.downsample(x, 8), low, atol=1e-5, rtol=0)
    plain = glide.sample(m, caps, steps=3, scale=1.0, progress=False, extra=p)
    assert (glide.downsample(plain, 8) - low).abs().max() > 1e-2
    f = glide.low_pass_filter(x, 8)
    torch.testing.assert_close(glide.low_pass_filter(f, 8), f)     # a projection


def test_projected_sampling_draws_the_step_noise_where_the_generator_is(monkeypatch):
    # A CPU generator with samples on a GPU (what glide.sample has on CUDA): the steps' noise is drawn on the
    # generator's device and moved, as loop.sample does. Faked here on the CPU: same noise, same samples.
    import functools
    from course_lib.samplers import loop, respace
    from course_lib.samplers.ddim import ddim_step
    from course_lib.samplers.ddpm import ddpm_step
    spaced = respace.respace(SCHED, respace.even_timesteps(1000, 4))
    img, mask = torch.rand(2, 3, 16, 16) * 2 - 1, glide.half_mask(2, 16, "left")
    eps_fn = lambda x_t, t, c: 0.1 * x_t  # noqa: E731
    given = []

    def ddpm_recorded(schedule, x_t, t, t_prev, eps, *, generator=None, noise=None):
        given.append(noise is not None)
        return ddpm_step(schedule, x_t, t, t_prev, eps, generator=generator, noise=noise)

    def ddim_recorded(schedule, x_t, t, t_prev, eps, *, eta=0.0, generator=None, noise=None):
        given.append(noise is not None)
        return ddim_step(schedule, x_t, t, t_prev, eps, eta=eta, generator=generator, noise=noise)

    def run(step):
        return glide.replacement_inpaint(eps_fn, spaced.schedule, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)),
                                         glide.Prompt(["a"] * 2, img, mask), step=step,
                                         generator=torch.Generator().manual_seed(0), resample=2, progress=False)
    steps = {"ddpm": ddpm_recorded, "ddim eta 1": functools.partial(ddim_recorded, eta=1.0),
             "ddim eta 0": functools.partial(ddim_recorded, eta=0.0)}   # glide.sample's two steps
    here = {name: run(s) for name, s in steps.items()}
    assert not any(given)                                     # one device: the step draws, as before
    monkeypatch.setattr(loop, "_elsewhere", lambda generator, device: True)
    for name, s in steps.items():
        given.clear()
        assert torch.equal(run(s), here[name]), name
        assert all(given) == (name != "ddim eta 0") and len(given) == 8   # 4 steps, each run resample = 2 times


@pytest.mark.parametrize("where", ["sim", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_replacement_and_ilvr_on_another_device_give_the_cpus_samples(where, request):
    # COURSE_DEVICE=sim fails where CUDA fails (a CPU generator drawing on the device was one, in
    # projected_sampling): on it the samples are the CPU's bit for bit, on CUDA within rounding
    import copy
    dev = request.getfixturevalue("sim") if where == "sim" else torch.device("cuda")
    caps = ["a red circle", "a blue square"]
    img, mask = torch.rand(2, 3, 16, 16) * 2 - 1, glide.half_mask(2, 16, "bottom")
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    for kind, kw in (("base", lambda d: dict(extra=glide.Prompt(caps, image=img.to(d), mask=mask.to(d)), replace_known=True,
                                             resample=2)),
                     ("upsample", lambda d: dict(extra=glide.Prompt(caps, low_res=low.to(d),
                                                                    aug_level=torch.zeros(2, dtype=torch.long, device=d)),
                                                 low_pass=True))):
        m = tiny(kind)
        cpu = glide.sample(m, caps, steps=3, scale=2.0, progress=False, **kw("cpu"))
        there = glide.sample(copy.deepcopy(m).to(dev), caps, steps=3, scale=2.0, progress=False, **kw(dev))
        assert there.device == dev or there.device.type == "cuda"
        if where == "sim":
            assert torch.equal(there.cpu(), cpu), kind
        else:
            torch.testing.assert_close(there.cpu(), cpu, rtol=1e-3, atol=1e-3)


def test_conditioning_images_follow_x_t_to_its_device(sim):
    """The inpainting image and mask (and an upsampler's low-res input) may come from the host: the
    model moves them to x_t's device, as it does aug_level, and computes what the CPU computes."""
    import copy
    caps = ["a red circle", "a blue square"]
    img, mask = torch.rand(2, 3, 16, 16) * 2 - 1, glide.half_mask(2, 16, "right")
    m = tiny("inpaint")
    x, t = x_and_t()
    ref = m(x, t, glide.Prompt(caps, image=img, mask=mask))
    out = copy.deepcopy(m).to(sim)(x.to(sim), t.to(sim), glide.Prompt(caps, image=img, mask=mask))
    assert out.device == sim and torch.equal(out.cpu(), ref)


class _CaptionConstant(torch.nn.Module):
    """A stand-in eps model: outputs the constant value[caption] everywhere (0 when unlisted)."""

    def __init__(self, value):
        super().__init__()
        self.value, self.w = value, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, captions):
        v = torch.tensor([self.value.get(c, 0.0) for c in captions], dtype=x_t.dtype)
        return v[:, None, None, None].expand_as(x_t) + self.w


def test_caption_preference_against_a_model_with_a_known_answer():
    """A model blind to the caption gains exactly 0 and never prefers; one that outputs 0 for the true
    caption and 1 for the other loses E[(1 - eps)^2] - E[eps^2] = 1 more on every image."""
    images = torch.rand(24, 3, 32, 32) * 2 - 1
    true, other = ["a red circle"] * 24, ["a blue square"] * 24
    blind = glide.caption_preference(_CaptionConstant({}), images, true, other, ts=(100, 900), batch_size=7)
    assert [r.t for r in blind] == [100, 900]
    assert all(r.gain == 0.0 and r.share == 0.0 for r in blind)
    sees = glide.caption_preference(_CaptionConstant({"a blue square": 1.0}), images, true, other, ts=(500,))
    assert abs(sees[0].gain - 1.0) < 0.02 and sees[0].share == 1.0
    assert sees[0].gain_interval[0] < sees[0].gain < sees[0].gain_interval[1]
    with pytest.raises(ValueError, match="one caption and one other caption per image"):
        glide.caption_preference(_CaptionConstant({}), images, true, other[:3])
    with pytest.raises(ValueError, match="the images"):
        glide.caption_preference(_CaptionConstant({}), images * 3, true, other)


def test_swapped_caption_uses_the_same_words_for_another_scene():
    from course_lib.data import shapes
    a, b = shapes.Obj("circle", "red", "small"), shapes.Obj("square", "blue", "large")
    scene = shapes.Scene((b, a), relation="right of")          # canonically: a left of b
    order = glide.swapped_caption(scene, "order")
    assert shapes.parse_caption(order).canonical() == shapes.Scene((b, a), relation="left of")
    colors = glide.swapped_caption(scene, "colors")
    assert shapes.parse_caption(colors).canonical() == shapes.Scene(
        (shapes.Obj("circle", "blue", "small"), shapes.Obj("square", "red", "large")), relation="left of")
    for other in (order, colors):
        assert sorted(other.split()) == sorted(shapes.caption(scene, 0).split())
    with pytest.raises(ValueError, match="two-object"):
        glide.swapped_caption(shapes.Scene((a,), position="left"))
    with pytest.raises(ValueError, match="swap must be one of"):
        glide.swapped_caption(scene, "sizes")


def test_swap_preference_runs_on_the_shipped_model_and_is_seeded():
    from course_lib.training import checkpoints
    m = checkpoints.load_pretrained("shapes_glide").eval()
    one = glide.swap_preference(m, "colors", n=6, ts=(600,), seed=3)
    assert one == glide.swap_preference(m, "colors", n=6, ts=(600,), seed=3)
    assert 0.0 <= one[0].share <= 1.0 and one[0].t == 600
