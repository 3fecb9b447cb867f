"""GLIDE in miniature (Nichol et al. 2022, "GLIDE: Towards Photorealistic Image Generation and
Editing with Text-Guided Diffusion Models"): a text-conditional ADM UNet on the shapes world.

- The caption is tokenized (the shapes tokenizer: open_clip's BPE mapped to the world's words) and
  encoded by a transformer trained jointly with the diffusion model (sec. 2.3, nn.transformer).
  The end token's embedding is added to the timestep embedding (it replaces the class embedding);
  every token's embedding is projected to `context_dim` and joined to the keys and values of every
  attention layer of the UNet, with the padding mask.
- Caption dropout (the empty caption, `label_dropout` of the time) makes one model conditional and
  unconditional, so classifier-free guidance needs no second model (guidance.cfg with null "").
- Inpainting (sec. 4): the same model with cond_channels = 4, the masked image (3) and the mask
  (1, 1 = known), zero-initialised so fine-tuning starts from the base model.
- Upsampling (sec. 2.3, the 64 -> 256 model; here 32 -> 64): cond_channels = 3, the low-resolution
  image upsampled bilinearly, after Gaussian noise augmentation q_sample(low, s); the level s is
  an input of the model (a second timestep embedding added to the first), as in Imagen and
  Cascaded Diffusion (Ho et al. 2021), so sampling can choose how much to trust the low-res input.

A noise predictor in the course's contract: model(x_t, t, cond) with cond a list of captions, or a
`Prompt` (captions plus the known image and mask, or the low-resolution image and its noise level).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from course_lib.data import shapes
from course_lib.diffusion import formulas, losses
from course_lib.nn.embeddings import TimestepEmbedding
from course_lib.nn.transformer import TextTransformer, last_token
from course_lib.nn.unet import UNet, UNetConfig, preset, zero_module

KINDS = ("base", "inpaint", "upsample")
COND_CHANNELS = {"base": 0, "inpaint": 4, "upsample": 3}


@dataclass(frozen=True)
class GlideConfig:
    unet: UNetConfig = field(default_factory=lambda: preset("shapes", context_dim=128))
    kind: str = "base"              # "base" | "inpaint" | "upsample"
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 20
    vocab_size: int = 64
    low_res: int = 32               # upsample: the input resolution
    text_encoder: str = "joint"     # "joint": nn.transformer.TextTransformer from scratch (GLIDE); "clip": open_clip's
                                    # text tower (shapes-tiny-clip), started from shapes_clip at a warm start and
                                    # trained jointly from there (text_width 128, 3 causal layers)
    text_causal: bool = True        # "clip": keep CLIP's causal mask (each token reads only the words before it);
                                    # False: bidirectional with a padding mask, as GLIDE's text transformer, so the
                                    # first-named object's tokens can read the relation that follows them

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.unet.cond_channels != COND_CHANNELS[self.kind]:
            raise ValueError(f"a {self.kind} GLIDE needs unet.cond_channels={COND_CHANNELS[self.kind]}, "
                             f"got {self.unet.cond_channels}")
        if self.text_encoder not in ("joint", "clip"):
            raise ValueError(f"text_encoder must be 'joint' or 'clip', got {self.text_encoder!r}")
        if self.unet.context_dim is None:
            raise ValueError("GLIDE's UNet needs a context_dim (the width its attention reads text tokens at)")

    # what samplers and cards read off a model's config
    image_size = property(lambda self: self.unet.image_size)
    in_channels = property(lambda self: self.unet.in_channels)
    learn_sigma = property(lambda self: self.unet.learn_sigma)
    num_classes = None


class Prompt(NamedTuple):
    """What a GLIDE model is conditioned on, one row per sample.

    captions: B strings ("" is the empty caption, the unconditional model);
    image, mask: inpainting, the known image (B, 3, H, W) in [-1, 1] and the mask (B, 1, H, W),
      1 where the image is known, 0 where the model is to fill;
    low_res, aug_level: upsampling, the low-resolution image (B, 3, h, w), already noise-augmented
      to level aug_level (B,) int (0: clean), as `augment` does.
    """
    captions: list
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    low_res: torch.Tensor | None = None
    aug_level: torch.Tensor | None = None

    def with_null(self, null: str = "") -> "Prompt":
        """Rows [self, self with every caption `null`]: the batch classifier-free guidance runs."""
        def twice(x):
            return None if x is None else torch.cat([x, x])
        return Prompt(list(self.captions) + [null] * len(self.captions), twice(self.image), twice(self.mask),
                      twice(self.low_res), twice(self.aug_level))

    def rows(self, sl: slice) -> "Prompt":
        """The rows `sl` of every field (for sampling in chunks)."""
        def part(x):
            return None if x is None else x[sl]
        return Prompt(list(self.captions)[sl], part(self.image), part(self.mask), part(self.low_res),
                      part(self.aug_level))


def as_prompt(cond, batch: int) -> Prompt:
    """A Prompt from cond: a Prompt, a list of B captions, one caption for every row, or None (empty)."""
    if cond is None:
        cond = [""] * batch
    if isinstance(cond, str):
        cond = [cond] * batch
    if not isinstance(cond, Prompt):
        if not isinstance(cond, (list, tuple)) or not all(isinstance(c, str) for c in cond):
            raise TypeError(f"a GLIDE model is conditioned on captions (a list of strings) or a Prompt, "
                            f"got {type(cond).__name__}")
        cond = Prompt(list(cond))
    if len(cond.captions) != batch:
        raise ValueError(f"{len(cond.captions)} captions for a batch of {batch} images")
    return cond


@functools.lru_cache(maxsize=1)
def _world_bpe_ids() -> tuple:
    from course_lib.models.clip import world_bpe_ids
    return tuple(world_bpe_ids())


class Glide(nn.Module):
    """eps_theta(x_t, t, caption [, masked image | low-res image]): GLIDE's text-conditional UNet."""

    def __init__(self, config: GlideConfig = GlideConfig()):
        super().__init__()
        self.config = cfg = config
        emb_dim = 4 * cfg.unet.base_channels
        if cfg.text_encoder == "clip":
            self.text = ClipTextTokens(causal=cfg.text_causal)
            if (self.text.width, self.text.context_length, self.text.vocab_size) != (cfg.text_width, cfg.context_length,
                                                                                   cfg.vocab_size):
                raise ValueError(f"the CLIP text tower is width {self.text.width}, {self.text.context_length} tokens, "
                                 f"vocabulary {self.text.vocab_size}: set text_width, context_length, vocab_size to match")
        else:
            self.text = TextTransformer(cfg.vocab_size, cfg.context_length, cfg.text_width, cfg.text_layers, cfg.text_heads)
        self.text_to_emb = zero_module(nn.Linear(cfg.text_width, emb_dim))   # step 0 of a warm start: no text yet
        self.text_to_context = nn.Sequential(nn.LayerNorm(cfg.text_width), nn.Linear(cfg.text_width, cfg.unet.context_dim))
        self.aug_embed = TimestepEmbedding(cfg.unet.base_channels, emb_dim) if cfg.kind == "upsample" else None
        self.unet = UNet(cfg.unet)
        self.register_buffer("bpe_ids", torch.tensor(_world_bpe_ids(), dtype=torch.long))

    # ------------------------------------------------------------------ text
    @functools.cached_property
    def tokenizer(self):
        from course_lib.models.clip import ShapesTokenizer
        return ShapesTokenizer(self.bpe_ids.tolist(), self.config.context_length, self.config.vocab_size)

    def tokens(self, captions) -> torch.Tensor:
        """(B, L) compact ids; "" is the empty caption [start, end]."""
        return self.tokenizer(captions, allow_empty=True)

    def encode_text(self, captions, device=None):
        """(context (B, L, context_dim), mask (B, L), pooled (B, text_width)) of B captions."""
        from course_lib.models.clip import PAD
        device = device or self.bpe_ids.device
        tokens = self.tokens(captions).to(device)
        mask = tokens != PAD
        h = self.text(tokens, mask)
        return self.text_to_context(h), mask, last_token(h, mask)

    # ------------------------------------------------------------------ forward
    def _extra_channels(self, p: Prompt, x_t: torch.Tensor):
        kind, B, size = self.config.kind, x_t.shape[0], x_t.shape[-1]
        if kind == "base":
            if p.image is not None or p.low_res is not None:
                raise ValueError("the base GLIDE model takes captions only: use the inpainting model for a masked "
                                 "image (or inpaint by replacement), the upsampler for a low-resolution image")
            return None
        if kind == "inpaint":
            check_mask(p.mask, (B, 1, *x_t.shape[-2:]))
            check_image_range(p.image, (B, 3, *x_t.shape[-2:]), "the known image")
            m = p.mask.to(x_t.device, x_t.dtype)   # the conditioning follows x_t, as aug_level does
            return torch.cat([p.image.to(x_t.device, x_t.dtype) * m, m], dim=1)
        low = self.config.low_res
        check_image_range(p.low_res, (B, 3, low, low), "the low-resolution image", limit=None)
        return F.interpolate(p.low_res.to(x_t.device, x_t.dtype), size=(size, size), mode="bilinear", align_corners=False)

    def forward(self, x_t, t, cond=None):
        p = as_prompt(cond, x_t.shape[0])
        context, mask, pooled = self.encode_text(p.captions, x_t.device)
        emb = self.text_to_emb(pooled)
        if self.aug_embed is not None:
            level = p.aug_level if p.aug_level is not None else torch.zeros_like(t)
            if not isinstance(level, torch.Tensor) or level.shape != t.shape:
                raise ValueError(f"aug_level must be a tensor of shape {tuple(t.shape)}")
            emb = emb + self.aug_embed(level.to(t.device))
        return self.unet(x_t, t, context=context, context_mask=mask, emb=emb, x_cond=self._extra_channels(p, x_t))

    # ------------------------------------------------------------------ warm starts
    def is_new_parameter(self, name: str) -> bool:
        """The weights a warm start gives no trained value: the text transformer (unless it comes from
        shapes_clip), its two projections, the attention layers' text keys and values (and the
        upsampler's level embedding, and the attention blocks' learned positions, where the UNet has them).
        The trainer gives them recipe.class_embed_lr_mult times the rate."""
        new = ("text_to_emb.", "text_to_context.", "aug_embed.") + (("text.",) if self.config.text_encoder == "joint" else ())
        return name.startswith(new) or ".context_kv." in name or name.endswith(".pos")

    def warm_start(self, source: nn.Module) -> "Glide":
        """Start from a trained model: a plain UNet (shapes_ddpm) fills self.unet, a GLIDE model fills
        everything. Weights the source lacks keep their initialisation (new attention blocks and
        the text projection to the embedding are zero-initialised residuals); the input convolution's
        new channels (inpainting's mask and image) start at zero, so step 0 is the source model."""
        own = self.state_dict()
        src = source.state_dict()
        if isinstance(source, UNet):
            src = {f"unet.{k}": v for k, v in src.items()}
            if self.config.text_encoder == "clip":       # the text tower from shapes_clip, the UNet from `source`
                from course_lib.training.checkpoints import load_pretrained
                src.update({f"text.{k}": v for k, v in ClipTextTokens.weights_of(load_pretrained("shapes_clip")).items()})
        taken = {}
        for k, v in src.items():
            if k not in own:
                raise ValueError(f"cannot warm-start: the source has {k!r}, which this model lacks")
            if own[k].shape == v.shape:
                taken[k] = v
            elif k == "unet.conv_in.weight" and own[k].shape[1] > v.shape[1] and own[k].shape[0] == v.shape[0]:
                w = torch.zeros_like(own[k])
                w[:, :v.shape[1]] = v
                taken[k] = w
            else:
                raise ValueError(f"cannot warm-start: {k!r} is {tuple(v.shape)} in the source, "
                                 f"{tuple(own[k].shape)} here")
        self.load_state_dict({**own, **taken})
        return self


class ClipTextTokens(nn.Module):
    """open_clip's text tower (the shapes-tiny-clip architecture, models.clip) returning every token's
    features after the final LayerNorm (B, L, width), before CLIP's pooling and projection: causal
    attention, so the end token has read the whole caption (it is CLIP's pooled token).
    causal=False drops the causal mask for a padding mask: every real token reads every other real
    token (GLIDE's text transformer is bidirectional), and none reads the padding."""

    def __init__(self, causal: bool = True):
        super().__init__()
        import open_clip
        from course_lib.models.clip import CONFIG_NAME, _quiet_logging, register
        register()
        with _quiet_logging():
            clip = open_clip.create_model(CONFIG_NAME, pretrained=None)
        self.token_embedding, self.positional_embedding = clip.token_embedding, clip.positional_embedding
        self.transformer, self.ln_final = clip.transformer, clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.causal, self.heads = causal, clip.transformer.resblocks[0].attn.num_heads
        self.width, self.context_length, self.vocab_size = clip.transformer.width, clip.context_length, clip.vocab_size

    PARTS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")

    @classmethod
    def weights_of(cls, shapes_clip) -> dict:
        """The text-tower weights of a ShapesCLIP, named as this module names them."""
        return {k[len("clip."):]: v for k, v in shapes_clip.state_dict().items()
                if k.startswith("clip.") and k[len("clip."):].startswith(cls.PARTS)}

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be (B, {self.context_length}), got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding
        if self.causal:
            attn_mask = self.attn_mask
        else:   # (B * heads, L, L): -inf on the padding keys, one row per query
            if mask.shape != tokens.shape:
                raise ValueError(f"mask must be shaped {tuple(tokens.shape)}, got {tuple(mask.shape)}")
            keys = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))
            attn_mask = keys[:, None, None, :].expand(-1, self.heads, tokens.shape[1], -1).reshape(
                -1, tokens.shape[1], tokens.shape[1])
        x = self.transformer(x, attn_mask=attn_mask)
        return self.ln_final(x)


# ---------------------------------------------------------------------- checks

def check_mask(mask, shape) -> None:
    """A mask for inpainting: a tensor shaped (B, 1, H, W) with values 0 (fill) and 1 (known)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"inpainting needs a mask tensor shaped {tuple(shape)} (1 = known, 0 = fill), "
                        f"got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"the mask must be shaped {tuple(shape)} (B, 1, H, W like the image), got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"the mask must be bool or real, got {mask.dtype}")
    m = mask.float()
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"the mask must hold only 0 (fill) and 1 (known); it has values in "
                         f"[{float(m.min()):.3g}, {float(m.max()):.3g}] other than those")


def check_image_range(x, shape, what: str, limit: float | None = 1.0) -> None:
    """An image tensor of the given shape, finite, and inside [-limit, limit] (a small slack allowed)."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating-point tensor shaped {tuple(shape)}, "
                        f"got {getattr(x, 'dtype', type(x).__name__)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{what} must be shaped {tuple(shape)}, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} holds NaN or inf")
    if limit is not None and float(x.abs().max()) > limit + 1e-3:
        raise ValueError(f"{what} must lie in [-1, 1] (the course's image range), got values in "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; map [0, 1] images with 2 * x - 1")


# ---------------------------------------------------------------------- masks and augmentation

def random_masks(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, size, size) training masks, 1 = known: half the time one half of the image (left,
    right, top or bottom) is to be filled, otherwise a random rectangle with sides size/4..3size/4."""
    m = torch.ones(n, 1, size, size)
    kind = torch.randint(0, 2, (n,), generator=generator)
    half = torch.randint(0, 4, (n,), generator=generator)
    wh = torch.randint(size // 4, 3 * size // 4 + 1, (n, 2), generator=generator)
    xy = (torch.rand(n, 2, generator=generator) * (size - wh + 1)).long()
    h2 = size // 2
    for i in range(n):
        if kind[i] == 0:
            sl = [(slice(None), slice(0, h2)), (slice(None), slice(h2, None)),
                  (slice(0, h2), slice(None)), (slice(h2, None), slice(None))][int(half[i])]
            m[i, 0, sl[0], sl[1]] = 0
        else:
            x0, y0 = int(xy[i, 0]), int(xy[i, 1])
            m[i, 0, y0:y0 + int(wh[i, 1]), x0:x0 + int(wh[i, 0])] = 0
    return m


def half_mask(n: int, size: int, side: str) -> torch.Tensor:
    """(n, 1, size, size): the `side` half ("left", "right", "top", "bottom") to fill, the rest known."""
    m = torch.ones(n, 1, size, size)
    h = size // 2
    where = {"left": (slice(None), slice(0, h)), "right": (slice(None), slice(h, None)),
             "top": (slice(0, h), slice(None)), "bottom": (slice(h, None), slice(None))}
    if side not in where:
        raise ValueError(f"side must be one of {sorted(where)}, got {side!r}")
    m[:, 0, where[side][0], where[side][1]] = 0
    return m


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """The low-resolution image an upsampler learns from: an area average of x to size x size."""
    return F.adaptive_avg_pool2d(x, size)


def augment(schedule, low: torch.Tensor, level, noise: torch.Tensor) -> torch.Tensor:
    """Gaussian noise augmentation of the low-resolution input: q_sample(low, level) (level 0: clean)."""
    level = torch.as_tensor(level, dtype=torch.long, device=low.device)
    if level.dim() == 0:
        level = level.expand(low.shape[0])
    out = formulas.q_sample(schedule, low, level.clamp(min=0), noise)
    return torch.where((level == 0)[:, None, None, None], low, out)


# ---------------------------------------------------------------------- training tasks

def _captions(model, recipe, y, g, like):
    """Captions of the batch's scenes, paraphrased as the CLIPs were trained (models.clip.paraphrased_captions),
    and the empty caption `label_dropout` of the time."""
    from course_lib.models.clip import paraphrased_captions
    from course_lib.training.trainer import batch_rand
    caps, _ = paraphrased_captions(y, g, like)
    empty = (batch_rand(g, like) < recipe.label_dropout).cpu()
    return ["" if e else c for c, e in zip(caps, empty.tolist())]


def _eps_loss(model, recipe, x0, cond, g):
    from course_lib import runtime
    from course_lib.training.trainer import batch_randint, batch_randn
    sched = recipe.noise_schedule()
    t = batch_randint(g, sched.T, x0)
    noise = batch_randn(g, x0)
    x_t = formulas.q_sample(sched, x0, t, noise)
    with runtime.autocast(x0.device.type, recipe.bf16):
        out = model(x_t, t, cond)
    return losses.diffusion_loss(sched, out.float(), x0, x_t, t, noise).loss.mean()


def glide_loss(model, recipe, x0, y, g):
    """L_simple of the text-conditional model on captions of the batch's scenes (codes y)."""
    return _eps_loss(model, recipe, x0, _captions(model, recipe, y, g, x0), g)


def inpaint_loss(model, recipe, x0, y, g):
    """L_simple of the inpainting model: random masks (random_masks), the known part of x0 as input."""
    caps = _captions(model, recipe, y, g, x0)
    from course_lib.training.trainer import _rows
    mask = _rows(x0, lambda n: random_masks(n, x0.shape[-1], g))
    return _eps_loss(model, recipe, x0, Prompt(caps, image=x0, mask=mask), g)


UPSAMPLE_AUG_MAX = 500   # training draws the augmentation level uniformly from 0..UPSAMPLE_AUG_MAX-1


def upsample_loss(model, recipe, x0, y, g):
    """L_simple of the upsampler on 64 px x0, given its 32 px area average noise-augmented to a level
    s uniform in 0..UPSAMPLE_AUG_MAX-1 (half the time s = 0, the clean input)."""
    from course_lib.training.trainer import batch_rand, batch_randint, batch_randn
    caps = _captions(model, recipe, y, g, x0)
    low = downsample(x0, model_config(model).low_res)
    level = batch_randint(g, UPSAMPLE_AUG_MAX, x0)
    level = torch.where(batch_rand(g, x0) < 0.5, torch.zeros_like(level), level)
    low = augment(recipe.noise_schedule(), low, level, batch_randn(g, low))
    return _eps_loss(model, recipe, x0, Prompt(caps, low_res=low, aug_level=level), g)


def model_config(model) -> GlideConfig:
    return getattr(model, "module", model).config   # through DDP's wrapper


# ---------------------------------------------------------------------- sampling helpers

def sample(model, prompts, *, steps: int = 50, scale: float = 3.0, seed: int = 0, x_T=None, bf16: bool = False,
           batch_size: int = 128, progress: bool = True, schedule=None, sampler: str = "ddpm", eta: float = 1.0,
           extra: Prompt | None = None, replace_known: bool = False, resample: int = 1, low_pass: bool = False):
    """Samples for `prompts` (one per row) with classifier-free guidance at `scale` (1: the plain
    conditional model, 0: the unconditional one), respaced DDPM (or DDIM) with `steps` steps.

    extra: a Prompt with the inpainting (image, mask) or upsampling (low_res, aug_level) rows.
    replace_known: inpaint by replacement on any model: after each step the known region is
    overwritten with q_sample(image, t_prev) (RePaint's resampling `resample` > 1 times per step).
    low_pass: upsampling with ILVR (Choi et al. 2021): after each step the low frequencies of x_prev
    (its area average at the low resolution) are replaced by those of the low-res input noised to t_prev.
    """
    from course_lib.guidance.cfg import cfg_eps
    from course_lib.samplers import loop, respace
    from course_lib.samplers.ddim import ddim_step
    from course_lib.samplers.ddpm import ddpm_step
    from course_lib.training.recipes import _schedule
    cfg = model_config(model)
    schedule = schedule or _schedule("cosine", 1000)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts given: pass one caption per sample")
    if any(not isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings (captions)")
    if any(not p.strip() for p in prompts):
        warnings.warn("an empty prompt samples the unconditional model (the empty caption, what caption "
                      "dropout trained); guidance has nothing to push towards there", stacklevel=2)
    for p in prompts:
        if p.strip():
            getattr(model, "module", model).tokenizer.ids(p)   # unknown words or an over-long caption: said now
    dev = next(model.parameters()).device
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    if x_T is None:
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must be shaped {shape}, got {tuple(x_T.shape)}")
    spaced = respace.respace(schedule, respace.even_timesteps(schedule.T, steps))
    eps_fn = loop.model_fn(model, bf16=bf16)
    if scale != 1.0:
        eps_fn = cfg_eps(eps_fn, scale, null_class="")
    eps_fn = respace.respaced_model(eps_fn, spaced.timesteps)
    step = ddpm_step if sampler == "ddpm" else functools.partial(ddim_step, eta=eta)
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for lo in range(0, n, batch_size):
        sl = slice(lo, min(n, lo + batch_size))
        p = Prompt(prompts[sl]) if extra is None else extra.rows(sl)._replace(captions=prompts[sl])
        if low_pass:
            out.append(low_pass_upsample(eps_fn, spaced.schedule, x_T[sl].to(dev), p, step=step, generator=g,
                                         progress=progress))
        elif replace_known:
            out.append(replacement_inpaint(eps_fn, spaced.schedule, x_T[sl].to(dev), p, step=step, generator=g,
                                           resample=resample, progress=progress))
        else:
            out.append(loop.sample(eps_fn, spaced.schedule, tuple(x_T[sl].shape), step=step, cond=p,
                                   x_T=x_T[sl].to(dev), generator=g, variance="small", progress=progress, device=dev))
    return torch.cat(out)


@torch.no_grad()
def projected_sampling(eps_fn, schedule, x_T, cond, *, step, generator, project, resample: int = 1,
                       desc: str = "sampling", progress: bool = True):
    """Ancestral sampling with a projection after every step: x_prev = project(step(x_t), t), t the step's
    code indices (B,) (x_prev is at t - 1; -1 on the last step). resample > 1 (RePaint): each step but
    the last is undone (x_t from x_prev by one forward step of noise, q(x_t | x_{t-1})) and redone,
    resample times. Replacement inpainting and ILVR are two projections."""
    from tqdm.auto import tqdm
    from course_lib.samplers.loop import _draws_noise, _elsewhere, randn
    if resample < 1:
        raise ValueError(f"resample must be >= 1, got {resample}")
    B, T = x_T.shape[0], schedule.T
    ab = torch.as_tensor(schedule.alpha_bar, dtype=torch.float32, device=x_T.device)
    # a CPU generator and samples on a GPU: the step's noise is drawn where the generator is and moved
    # (as loop.sample does), so every device adds the same noise
    predraw = _elsewhere(generator, x_T.device) and _draws_noise(step, getattr(step, "keywords", None) or {})
    x = x_T
    for i in tqdm(range(T - 1, -1, -1), desc=desc, disable=not progress):
        t = torch.full((B,), i, dtype=torch.long, device=x.device)
        for r in range(resample):
            eps = eps_fn(x, t, cond)
            noise = {"noise": randn(x.shape, generator, x.device, x.dtype)} if predraw else {}
            x_prev = project(step(schedule, x, t, t - 1, eps, generator=generator, **noise).x_prev, t)
            if r < resample - 1 and i > 0:   # back to x_t: q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, (1 - a_t) I)
                a = ab[i] / ab[i - 1]
                x = a.sqrt() * x_prev + (1 - a).sqrt() * randn(x_prev.shape, generator, x_prev.device).to(x_prev.dtype)
            else:
                x = x_prev
    return x


def _noised(schedule, x0, t, generator):
    """q_sample(x0, t - 1) with noise from generator, or x0 itself on the last step (t - 1 = -1)."""
    from course_lib.samplers.loop import randn
    if int(t[0]) == 0:
        return x0
    return formulas.q_sample(schedule, x0, t - 1, randn(x0.shape, generator, x0.device).to(x0.dtype))


def replacement_inpaint(eps_fn, schedule, x_T, prompt: Prompt, *, step, generator, resample: int = 1,
                        progress: bool = True):
    """Inpainting by replacement (Song et al. 2021, sec. 5; RePaint, Lugmayr et al. 2022) on a model that
    never saw a mask: each step the known region is replaced by the known image noised to the next
    step, q_sample(image, t_prev), so the model only invents the masked part and it must agree with
    the rest. resample > 1: RePaint's resampling, each step undone (x_t from x_{t-1} by one forward
    step of noise) and redone, resample times, to harmonise the two regions."""
    check_mask(prompt.mask, (x_T.shape[0], 1, *x_T.shape[-2:]))
    check_image_range(prompt.image, tuple(x_T.shape), "the known image")
    image, mask = prompt.image.to(x_T.device), prompt.mask.to(x_T.device).to(x_T.dtype)

    def project(x_prev, t):
        return mask * _noised(schedule, image, t, generator) + (1 - mask) * x_prev
    return projected_sampling(eps_fn, schedule, x_T, Prompt(prompt.captions),   # the base model sees only the caption
                              step=step, generator=generator, project=project, resample=resample, desc="inpaint",
                              progress=progress)


def low_pass_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """phi(x): the area average of x at size x size, brought back to x's size by repetition (a projection)."""
    return F.interpolate(downsample(x, size), size=x.shape[-2:], mode="nearest")


def low_pass_upsample(eps_fn, schedule, x_T, prompt: Prompt, *, step, generator, progress: bool = True):
    """ILVR (Choi et al. 2021, "Iterative Latent Variable Refinement", eq. 8) for an upsampler: after each
    step, x_prev <- x_prev - phi(x_prev) + phi(y_prev), phi the low-pass projection (area average at the
    low resolution, repeated back) and y_prev the low-res input, repeated to full size and noised to
    t_prev. The result's area average is then the input exactly (at the last step, t_prev = -1)."""
    low = prompt.low_res.to(x_T.device, x_T.dtype)
    size = low.shape[-1]
    ref = F.interpolate(low, size=x_T.shape[-2:], mode="nearest")       # phi(ref) = ref, its average is `low`

    def project(x_prev, t):
        return x_prev - low_pass_filter(x_prev, size) + low_pass_filter(_noised(schedule, ref, t, generator), size)
    return projected_sampling(eps_fn, schedule, x_T, prompt, step=step, generator=generator, project=project,
                              desc="upsample (ILVR)", progress=progress)


# ---------------------------------------------------------------------- looking inside

@torch.no_grad()
def text_attention(model, x_t, t, captions, *, block: str = "mid_attn"):
    """Where one attention layer looks: (probabilities (B, heads, HW, L + HW), tokens (B, L) ids, mask (B, L)).

    Runs the model once with a hook on the UNet attention block `block` (a module path such as
    "mid_attn" or "down.2.attn.0") and recomputes that block's softmax over [text keys, image keys];
    the first L columns are the caption's tokens (padding columns are 0)."""
    from course_lib.models.clip import PAD
    net = getattr(model, "module", model)
    attn_block = net.unet.get_submodule(block)
    seen = {}

    def hook(mod, args, kwargs):
        seen["x"], seen["context"], seen["mask"] = args[0], args[1], args[2]
    handle = attn_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(x_t, t, list(captions))
    finally:
        handle.remove()
    x, context, cmask = seen["x"], seen["context"], seen["mask"]
    B, C, H, W = x.shape
    nh = attn_block.heads
    q, k, _ = attn_block.qkv(attn_block.normed(x)).reshape(B, 3, nh, C // nh, H * W).unbind(1)
    q, k = q.transpose(-1, -2), k.transpose(-1, -2)                       # (B, nh, HW, hd)
    ck, _ = attn_block.context_kv(context).reshape(B, -1, 2, nh, C // nh).permute(2, 0, 3, 1, 4)
    keys = torch.cat([ck, k], dim=2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(C // nh)
    keep = torch.cat([cmask.bool(), torch.ones(B, H * W, dtype=torch.bool, device=x.device)], 1)
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    tokens = net.tokens(list(captions))
    return scores.softmax(-1), tokens, tokens != PAD


def token_words(model, tokens) -> list:
    """The words of compact token ids (one list per row, padding dropped): <start>, the BPE pieces, <end>."""
    from course_lib.models.clip import PAD, SOT, _bpe
    net = getattr(model, "module", model)
    bpe = net.bpe_ids.tolist()
    eot = net.tokenizer.eot
    out = []
    for row in tokens.tolist():
        words = []
        for i in row:
            if i == PAD:
                continue
            words.append("<start>" if i == SOT else "<end>" if i == eot else _bpe().decode([bpe[i - 2]]).strip())
        out.append(words)
    return out


class CaptionPreference(NamedTuple):
    t: int
    gain: float          # mean over images of L(other caption) - L(true caption): > 0 when the true one helps more
    gain_interval: tuple # its 95% interval (normal approximation over the images)
    share: float         # share of images whose true caption gives the lower loss (0.5: no preference)


SWAPS = ("order", "colors")


def swapped_caption(scene: shapes.Scene, swap: str = "order") -> str:
    """The caption of a two-object scene with one thing swapped between its objects, the same words
    describing another image. swap="order": the objects trade places ("a red circle left of a blue
    square" -> "a blue square left of a red circle"); swap="colors": each keeps its place and shape
    and takes the other's color ("a blue circle left of a red square")."""
    if len(scene.objects) != 2:
        raise ValueError("swapped_caption needs a two-object scene")
    if swap not in SWAPS:
        raise ValueError(f"swap must be one of {SWAPS}, got {swap!r}")
    s = scene.canonical()
    a, b = s.objects
    if swap == "order":
        objects = (b, a)
    else:
        objects = (replace(a, color=b.color), replace(b, color=a.color))
    return shapes.caption(shapes.Scene(objects, relation=s.relation), 0)


@torch.no_grad()
def caption_preference(model, images, captions, others, ts=(200, 400, 600, 800, 900), *, seed: int = 0,
                       batch_size: int = 100) -> list:
    """Does the model's denoising use what tells `captions` from `others`? For each t, images are noised
    to x_t (one seeded noise shared by both captions) and the eps-prediction loss with each caption is
    compared, image by image: the gain of the true caption over the other, and how often it wins. A
    model blind to the difference gains exactly nothing (the losses are equal)."""
    from course_lib.training.recipes import _schedule
    if not (len(images) == len(captions) == len(others)):
        raise ValueError(f"one caption and one other caption per image: {len(images)} images, "
                         f"{len(captions)} captions, {len(others)} others")
    check_image_range(images, (len(images), *images.shape[1:]), "the images")
    net = getattr(model, "module", model)
    dev = next(net.parameters()).device
    schedule = _schedule("cosine", 1000)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in ts:
        noise = formulas.randn(images.shape, generator=g)
        diffs = []
        for lo in range(0, len(images), batch_size):
            sl = slice(lo, lo + batch_size)
            x0, eps = images[sl].to(dev), noise[sl].to(dev)
            tt = torch.full((x0.shape[0],), int(t), device=dev)
            x_t = formulas.q_sample(schedule, x0, tt, eps)
            loss = [((model(x_t, tt, list(c[sl]))[:, :3] - eps) ** 2).mean((1, 2, 3)) for c in (captions, others)]
            diffs.append((loss[1] - loss[0]).float().cpu())
        d = torch.cat(diffs).double()
        half = 1.96 * float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        rows.append(CaptionPreference(int(t), float(d.mean()), (float(d.mean()) - half, float(d.mean()) + half),
                                      float((d > 0).double().mean())))
    return rows


def swap_preference(model, swap: str = "order", n: int = 200, ts=(200, 400, 600, 800, 900), *,
                    seed: int = 0) -> list:
    """caption_preference on n two-object test scenes, each caption against its swapped_caption(scene, swap):
    swap="order" asks whether the model knows which object goes where (or only which objects and which
    axis); swap="colors" whether it binds each color to its shape."""
    data = shapes.ShapesDataset("test", model_config(model).image_size, 3 * n, seed + 11)
    idx = [i for i, sc in enumerate(data.scenes) if len(sc.objects) == 2][:n]
    true = [shapes.caption(data.scenes[i].canonical(), 0) for i in idx]
    other = [swapped_caption(data.scenes[i], swap) for i in idx]
    return caption_preference(model, data.images[idx], true, other, ts, seed=seed)


# ---------------------------------------------------------------------- metrics for the cards

ONE_OBJECT_PROMPTS = ("a red circle on the left", "a blue square at the top", "a green triangle in the center",
                      "a yellow cross on the right", "a large purple circle at the bottom", "a small orange square on the left",
                      "a blue triangle on the right", "a green circle at the top")
TWO_OBJECT_PROMPTS = ("a red circle left of a blue square", "a green triangle above a yellow circle",
                      "a orange cross right of a red triangle", "a blue circle below a purple square",
                      "a yellow square left of a green cross", "a purple triangle above a orange circle",
                      "a red square below a blue triangle", "a green circle right of a yellow square")


def glide_metrics(recipe, model) -> dict:
    """The base model's card: caption accuracy (one- and two-object prompts) without guidance (s = 1)
    and with CFG at s = 3, 50 respaced DDPM steps; and the scene FID of the unconditional model."""
    import time
    from course_lib.eval import attributes
    from course_lib.eval.caption_sweep import wilson_interval
    n_per = max(1, recipe.eval_samples // (2 * len(ONE_OBJECT_PROMPTS)))
    out = {"sampler": f"DDPM, {recipe.eval_steps} respaced steps, small variance",
           "samples_per_prompt": n_per}
    for scale in (1.0, 3.0):
        for name, prompts in (("one_object", ONE_OBJECT_PROMPTS), ("two_object", TWO_OBJECT_PROMPTS)):
            caps = [p for p in prompts for _ in range(n_per)]
            t0 = time.time()
            x = sample(model, caps, steps=recipe.eval_steps, scale=scale, seed=recipe.seed, bf16=recipe.bf16,
                       progress=False).clamp(-1, 1)
            r = attributes.caption_accuracy(x, caps)
            lo, hi = wilson_interval(int(r.correct.sum()), len(caps))
            key = f"{name}_accuracy_s{scale:g}"
            out[key] = round(r.accuracy, 4)
            out[key + "_interval"] = [round(lo, 4), round(hi, 4)]
            out[key + "_errors"] = {k: round(v, 4) for k, v in r.errors.items() if v > 0}
            out[f"seconds_per_sample_s{scale:g}"] = round((time.time() - t0) / len(caps), 4)
    return out


def inpaint_eval_set(n: int, seed: int = 0, size: int = 32):
    """Inpainting test cases from two-object test scenes: the half holding the second object is masked
    and the prompt asks for that object in a new color (so a copy of the original cannot pass).
    Returns (images, masks, prompts)."""
    data = shapes.ShapesDataset("test", size, 4 * n, seed + 7)
    imgs, masks, prompts = [], [], []
    g = torch.Generator().manual_seed(seed)
    for i in range(len(data)):
        scene = data.scenes[i] if hasattr(data, "scenes") else shapes.Scene.from_code(data.labels[i].tolist())
        if len(scene.objects) != 2:
            continue
        a, b = scene.objects
        axis_side = {"left of": ("right",), "right of": ("left",), "above": ("bottom",), "below": ("top",)}[scene.relation]
        colors = [c for c in shapes.COLOR_NAMES if c not in (a.color, b.color)]
        new_b = shapes.Obj(b.shape, colors[int(torch.randint(len(colors), (1,), generator=g))], b.size)
        new = shapes.Scene((a, new_b), relation=scene.relation)
        imgs.append(data.images[i])
        masks.append(half_mask(1, size, axis_side[0])[0])
        prompts.append(shapes.caption(new, 0))
        if len(prompts) == n:
            break
    return torch.stack(imgs), torch.stack(masks), prompts


def inpaint_metrics(recipe, model, *, base=None) -> dict:
    """Caption accuracy of the filled scenes (the prompt names the masked object anew) and the RMS error
    on the known region, for the fine-tuned inpainting model (and, given `base`, replacement on it)."""
    from course_lib.eval import attributes
    from course_lib.eval.caption_sweep import wilson_interval
    images, masks, prompts = inpaint_eval_set(recipe.eval_samples, recipe.seed)
    out = {"cases": len(prompts), "sampler": f"DDPM, {recipe.eval_steps} respaced steps, CFG s=3"}
    rows = [("mask_channels", model, False)] + ([("replacement", base, True)] if base is not None else [])
    for name, m, replace_known in rows:
        x = sample(m, prompts, steps=recipe.eval_steps, scale=3.0, seed=recipe.seed, bf16=recipe.bf16, progress=False,
                   extra=Prompt(prompts, image=images, mask=masks), replace_known=replace_known).clamp(-1, 1)
        r = attributes.caption_accuracy(x, prompts)
        out[f"{name}_caption_accuracy"] = round(r.accuracy, 4)
        out[f"{name}_caption_accuracy_interval"] = [round(v, 4) for v in wilson_interval(int(r.correct.sum()), len(prompts))]
        out[f"{name}_known_region_rms"] = round(known_rms(x, images, masks), 4)
    return out


def known_rms(x, images, masks) -> float:
    """RMS difference between samples and the known image over the known pixels (mask 1)."""
    m = masks.expand_as(images)
    return float((((x - images) ** 2) * m).sum().div(m.sum().clamp(min=1)).sqrt())


def upsample_metrics(recipe, model, levels=(0, 100, 250)) -> dict:
    """The upsampler given the area average of test renders at 64 px, per augmentation level s: RMS error
    against the 64 px truth, RMS of the result's own area average against the clean low-res input (does
    it keep what it was given?), and caption accuracy against the scene's own caption; then the same at
    s = 0 with ILVR's low-pass replacement (low_pass_upsample), and bilinear interpolation for scale."""
    from course_lib.eval import attributes
    from course_lib.training.recipes import _schedule
    data = shapes.ShapesDataset("test", 64, recipe.eval_samples, recipe.seed + 3)
    truth = data.images
    caps = [shapes.caption(shapes.Scene.from_code(c.tolist()), 0) for c in data.labels]
    low = downsample(truth, model_config(model).low_res)
    out = {"sampler": f"DDPM, {recipe.eval_steps} respaced steps, CFG s=1 (no guidance)", "samples": len(caps)}
    sched = _schedule("cosine", 1000)
    for s in levels:
        noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(recipe.seed + s))
        lo = augment(sched, low, s, noise)
        level = torch.full((len(caps),), s, dtype=torch.long)
        x = sample(model, caps, steps=recipe.eval_steps, scale=1.0, seed=recipe.seed, bf16=recipe.bf16, progress=False,
                   extra=Prompt(caps, low_res=lo, aug_level=level)).clamp(-1, 1)
        out[f"rms_s{s}"] = round(float((x - truth).pow(2).mean().sqrt()), 4)
        out[f"low_res_rms_s{s}"] = round(float((downsample(x, low.shape[-1]) - low).pow(2).mean().sqrt()), 4)
        out[f"caption_accuracy_s{s}"] = round(attributes.caption_accuracy(x, caps).accuracy, 4)
    x = sample(model, caps, steps=recipe.eval_steps, scale=1.0, seed=recipe.seed, bf16=recipe.bf16, progress=False,
               extra=Prompt(caps, low_res=low, aug_level=torch.zeros(len(caps), dtype=torch.long)), low_pass=True).clamp(-1, 1)
    out["rms_ilvr_s0"] = round(float((x - truth).pow(2).mean().sqrt()), 4)
    out["caption_accuracy_ilvr_s0"] = round(attributes.caption_accuracy(x, caps).accuracy, 4)
    bilinear = F.interpolate(low, size=truth.shape[-2:], mode="bilinear", align_corners=False)
    out["rms_bilinear"] = round(float((bilinear - truth).pow(2).mean().sqrt()), 4)
    out["caption_accuracy_truth"] = round(attributes.caption_accuracy(truth, caps).accuracy, 4)
    return out
