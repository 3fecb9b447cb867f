"""The ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", sec. 3), sized for
28x28 and 32/64 px images on a laptop CPU.

- ResBlock: GroupNorm -> SiLU -> conv, then the timestep (and class) embedding enters through
  adaptive group norm, AdaGN(h, e) = (1 + scale(e)) * GroupNorm(h) + shift(e) (ADM eq. 1
  written with 1 + scale so a zero-initialised layer is the identity), then SiLU -> conv;
  the skip connection is added and the sum scaled by 1/sqrt(2) (ADM sec. 3, "rescale
  residual connections").
- AttentionBlock: multi-head self-attention at chosen resolutions; with a `context`
  (text tokens, lesson 07) the tokens' keys and values are joined to the image's (GLIDE).
- Class conditioning (lesson 04): a class embedding added to the timestep embedding;
  index num_classes is the null class (classifier-free guidance, lesson 05).
- learn_sigma: the output has 2x the channels, eps then the variance interpolation v.
Every attention goes through `course_lib.nn.attention.attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn
import torch.nn.functional as F

from course_lib.nn.attention import attention
from course_lib.nn.embeddings import TimestepEmbedding


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 28                 # height = width of the input
    in_channels: int = 1                 # image channels (1 grey, 3 RGB, 4 latents)
    base_channels: int = 32              # channels at full resolution
    channel_mults: tuple = (1, 2, 2)     # channels per level = base * mult; each level halves the size
    num_res_blocks: int = 2              # ResBlocks per level on the way down (one more on the way up)
    attention_resolutions: tuple = (7,)  # feature-map sizes that get self-attention
    head_channels: int = 32              # channels per attention head
    dropout: float = 0.0                 # dropout inside ResBlocks
    num_classes: int | None = None       # class-conditional when set; index num_classes is the null class
    learn_sigma: bool = False            # also output the variance interpolation v (Improved DDPM)
    context_dim: int | None = None       # width of text tokens joined to attention (GLIDE); None: no text
    norm_groups: int = 8                 # GroupNorm groups (ADM uses 32 at larger widths)
    rescale_residual: bool = True        # (skip + h) / sqrt(2) in ResBlocks
    cond_channels: int = 0               # extra input channels joined to x_t and not predicted (GLIDE's
                                         # inpainting mask and image, an upsampler's low-resolution image)
    attention_positions: bool = False    # a learned position embedding (zero at init) added to each
                                         # attention's normalised input, so its queries know where they are

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


PRESETS = {
    # ~1.2M parameters: the Fashion-MNIST model of lessons 02-05 (one ResBlock per level down,
    # two up: half the cost of ADM's two/three, chosen to train in about an hour on one CPU core)
    "fashion": UNetConfig(num_res_blocks=1),
    # ~1.2M parameters: the 32x32 RGB shapes model of lessons 06-07 (levels 32, 16, 8; attention
    # at 8x8, 64 positions), the fashion model's widths with three input channels
    "shapes": UNetConfig(image_size=32, in_channels=3, attention_resolutions=(8,), num_res_blocks=1),
    # a toy for tests and the visible training demonstration
    "tiny": UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                       attention_resolutions=(14,), head_channels=16, norm_groups=4),
}


def preset(name: str, **changes) -> UNetConfig:
    """A named UNetConfig, optionally with fields changed: preset("fashion", learn_sigma=True)."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **changes)


def zero_module(module: nn.Module) -> nn.Module:
    """Initialise a layer to output zeros, so a residual branch starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, ch_in, ch_out, emb_dim, dropout, groups, rescale):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ch_in)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * ch_out)  # AdaGN scale and shift
        self.norm2 = nn.GroupNorm(groups, ch_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(ch_out, ch_out, 3, padding=1))
        self.skip = nn.Identity() if ch_in == ch_out else nn.Conv2d(ch_in, ch_out, 1)
        self.scale = 1 / math.sqrt(2) if rescale else 1.0

    def forward(self, x, emb):                      # x (B, C, H, W), emb (B, E)
        h = self.conv1(F.silu(self.norm1(x)))       # (B, C', H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift     # AdaGN
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) + h) * self.scale


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions; optional text tokens joined to the keys/values."""

    def __init__(self, ch, head_channels, groups, context_dim=None, size=None):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = nn.GroupNorm(groups, ch)
        # ADM's attention has no position embedding (the convolutions' padding is all it knows of
        # place); with `size` a learned one, zero at init, is added to the queries' and keys' input
        self.pos = nn.Parameter(torch.zeros(1, ch, size, size)) if size else None
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.context_kv = nn.Linear(context_dim, 2 * ch) if context_dim else None
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def normed(self, x):
        """What the queries, keys and values are computed from: GroupNorm(x), plus the positions."""
        h = self.norm(x)
        if self.pos is not None:
            if tuple(self.pos.shape[-2:]) != tuple(x.shape[-2:]):
                raise ValueError(f"this attention block learned positions on a {tuple(self.pos.shape[-2:])} grid, "
                                 f"got a {tuple(x.shape[-2:])} feature map; run the model at its image_size")
            h = h + self.pos
        return h

    def forward(self, x, context=None, context_mask=None):  # x (B, C, H, W), context (B, L, Dc)
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.normed(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        q, k, v = (z.transpose(-1, -2) for z in (q, k, v))        # (B, nh, HW, hd)
        mask = None
        if context is not None and self.context_kv is not None:
            ck, cv = self.context_kv(context).reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # (B, nh, L + HW, hd)
            if context_mask is not None:
                mask = torch.cat([context_mask.bool(), torch.ones(B, H * W, dtype=torch.bool, device=x.device)], 1)
        h = attention(q, k, v, key_padding_mask=mask)               # (B, nh, HW, hd)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return (x + self.proj(h)) / math.sqrt(2)  # ADM rescales the attention residual too


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Level(nn.Module):
    """ResBlocks (each followed by attention at this resolution, if asked)."""

    def __init__(self, chans, emb_dim, cfg: UNetConfig, use_attn, size=None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(a, b, emb_dim, cfg.dropout, cfg.norm_groups, cfg.rescale_residual)
                                 for a, b in chans)
        pos = size if cfg.attention_positions else None
        self.attn = nn.ModuleList(AttentionBlock(b, cfg.head_channels, cfg.norm_groups, cfg.context_dim, pos)
                                  if use_attn else nn.Identity() for _, b in chans)


class UNet(nn.Module):
    """eps_theta(x_t, t, y, context): the noise predictor of every pixel-space lesson."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        cfg = self.config = config
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.time_embed = TimestepEmbedding(ch, emb_dim)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, ch, 3, padding=1)
        widths = [ch * m for m in cfg.channel_mults]
        sizes = [cfg.image_size // 2 ** i for i in range(len(widths))]
        self.down, self.downsample, skips, cur = nn.ModuleList(), nn.ModuleList(), [ch], ch
        for i, w in enumerate(widths):
            chans = [(cur if j == 0 else w, w) for j in range(cfg.num_res_blocks)]
            self.down.append(Level(chans, emb_dim, cfg, sizes[i] in cfg.attention_resolutions, sizes[i]))
            skips += [w] * cfg.num_res_blocks
            cur = w
            if i < len(widths) - 1:
                self.downsample.append(Downsample(w))
                skips.append(w)
        self.mid = Level([(cur, cur), (cur, cur)], emb_dim, cfg, use_attn=False)
        self.mid_attn = AttentionBlock(cur, cfg.head_channels, cfg.norm_groups, cfg.context_dim,
                                       sizes[-1] if cfg.attention_positions else None)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            chans = []
            for _ in range(cfg.num_res_blocks + 1):
                chans.append((cur + skips.pop(), w))
                cur = w
            self.up.append(Level(chans, emb_dim, cfg, sizes[i] in cfg.attention_resolutions, sizes[i]))
            if i > 0:
                self.upsample.append(Upsample(w))
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cur)
        self.conv_out = zero_module(nn.Conv2d(cur, cfg.out_channels, 3, padding=1))

    def _check(self, x_t, t, y, context, context_mask=None):
        cfg = self.config
        if not isinstance(x_t, torch.Tensor):
            raise TypeError(f"x_t must be a tensor shaped (B, {cfg.in_channels}, H, W), got {type(x_t).__name__}")
        if x_t.dim() != 4 or x_t.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects x_t shaped (B, {cfg.in_channels}, H, W), got {tuple(x_t.shape)}")
        check_model_input(self, x_t, "x_t")
        if x_t.shape[-1] % 2 ** (len(cfg.channel_mults) - 1) or x_t.shape[-2] % 2 ** (len(cfg.channel_mults) - 1):
            raise ValueError(f"height and width must be divisible by {2 ** (len(cfg.channel_mults) - 1)}, "
                             f"got {tuple(x_t.shape[-2:])}")
        check_timesteps_input(t, x_t)
        if y is not None:
            if self.class_embed is None:
                raise ValueError("this UNet is unconditional (num_classes=None) but y was given")
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"y must be a tensor of integer class indices of shape ({x_t.shape[0]},), "
                                f"got {type(y).__name__}")
            if y.shape != (x_t.shape[0],) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
                raise ValueError(f"y must be integer class indices of shape ({x_t.shape[0]},), "
                                 f"got {y.dtype} {tuple(y.shape)}")
            if int(y.min()) < 0 or int(y.max()) > cfg.num_classes:
                raise ValueError(f"y must lie in [0, {cfg.num_classes}] ({cfg.num_classes} is the null class)")
            if y.device != x_t.device:
                raise ValueError(f"y is on {y.device} but x_t is on {x_t.device}; move them to one device")
        if context is not None:
            if cfg.context_dim is None:
                raise ValueError("this UNet takes no context (context_dim=None)")
            if not isinstance(context, torch.Tensor) or not context.dtype.is_floating_point:
                raise TypeError(f"context must be a floating-point tensor (B, L, {cfg.context_dim}), got "
                                f"{getattr(context, 'dtype', type(context).__name__)}")
            if context.dim() != 3 or context.shape[0] != x_t.shape[0] or context.shape[2] != cfg.context_dim:
                raise ValueError(f"context must be shaped ({x_t.shape[0]}, L, {cfg.context_dim}), "
                                 f"got {tuple(context.shape)}")
            if context_mask is not None and (not isinstance(context_mask, torch.Tensor)
                                             or context_mask.shape != context.shape[:2]):
                raise ValueError(f"context_mask must be a tensor shaped {tuple(context.shape[:2])} (True: a real "
                                 f"token), got {tuple(getattr(context_mask, 'shape', ()))}")

    def forward(self, x_t, t, y=None, context=None, context_mask=None, *, emb=None, x_cond=None):
        """x_t (B, C, H, W), t (B,) int, y (B,) class or null class -> (B, out_channels, H, W).

        context (B, L, context_dim) text tokens joined to every attention's keys and values, with
        context_mask (B, L) bool (True: a real token); emb (B, 4 * base_channels) an extra embedding
        added to the timestep embedding (GLIDE's pooled text); x_cond (B, cond_channels, H, W) extra
        input channels joined to x_t (inpainting, upsampling)."""
        self._check(x_t, t, y, context, context_mask)
        time_emb = self.time_embed(t)                                # (B, E)
        if emb is not None:
            if emb.shape != time_emb.shape:
                raise ValueError(f"emb must be shaped {tuple(time_emb.shape)}, got {tuple(emb.shape)}")
            time_emb = time_emb + emb
        emb = time_emb
        if self.class_embed is not None:
            if y is None:  # unconditional use of a conditional model: the null class
                y = torch.full_like(t, self.config.num_classes)
            emb = emb + self.class_embed(y)
        if self.config.cond_channels:
            want = (x_t.shape[0], self.config.cond_channels, *x_t.shape[2:])
            if x_cond is None or tuple(x_cond.shape) != want:
                raise ValueError(f"this UNet takes x_cond shaped {want} (its cond_channels), got "
                                 f"{None if x_cond is None else tuple(x_cond.shape)}")
            x_t = torch.cat([x_t, x_cond.to(x_t.dtype)], dim=1)
        elif x_cond is not None:
            raise ValueError("this UNet takes no x_cond (cond_channels=0)")
        h = self.conv_in(x_t)
        hs = [h]
        for i, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn):
                h = self._attn(attn, res(h, emb), context, context_mask)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid.res[0](h, emb)
        h = self.mid_attn(h, context, context_mask)
        h = self.mid.res[1](h, emb)
        for i, level in enumerate(self.up):
            for res, attn in zip(level.res, level.attn):
                h = self._attn(attn, res(torch.cat([h, hs.pop()], dim=1), emb), context, context_mask)
            if i < len(self.upsample):
                h = self.upsample[i](h, hs[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _attn(block, h, context, context_mask):
        return h if isinstance(block, nn.Identity) else block(h, context, context_mask)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:   # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def check_model_input(model: nn.Module, x, name: str = "x_t") -> None:
    """A model's image input: a floating-point tensor with a non-empty batch, of the weights' dtype
    (unless autocast is on, which casts it) and on the weights' device. Errors here, not in a conv."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); give at least one image")
    p = next(model.parameters(), None)
    if p is None:
        return
    if x.device != p.device:
        raise ValueError(f"{name} is on {x.device} but the model's weights are on {p.device}; "
                         f"move one to the other (model.to(x.device))")
    if x.dtype != p.dtype and not _autocast_on(x.device.type):
        raise TypeError(f"{name} is {x.dtype} but the model's weights are {p.dtype}: cast the input "
                        f"(x.to({p.dtype})) or run under autocast (runtime.autocast)")


def check_timesteps_input(t, x) -> None:
    """t for a model: an integer tensor of shape (B,) on x's device with t >= 0 (a float t such as
    0.5 is an error: the models are trained on integer steps)."""
    if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
        raise ValueError(f"t must be a tensor of shape ({x.shape[0]},), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor (torch.long) of diffusion steps, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"t is on {t.device} but x_t is on {x.device}; move them to one device")
    if int(t.min()) < 0:
        raise ValueError(f"t must be >= 0 (a diffusion step 0..T-1), got {int(t.min())}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
