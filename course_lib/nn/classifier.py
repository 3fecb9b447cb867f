"""A small convolutional classifier for clean 28x28 Fashion-MNIST.

It is the course's *evaluation* network: its penultimate features define the FID of
lessons 02-05 and its predictions measure class accuracy of samples. It is never used
for guidance (lesson 04 trains a separate noise-aware classifier for that), so guidance
cannot "fool" the metric it is judged by.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1       # grey images
    width: int = 32            # channels of the first conv stage (doubled in the second)
    feature_dim: int = 128     # the feature vector FID is computed on
    num_classes: int = 10


def _stage(c_in, c_out):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.MaxPool2d(2))


class FashionClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        cfg = self.config = config
        self.body = nn.Sequential(_stage(cfg.in_channels, cfg.width), _stage(cfg.width, 2 * cfg.width),
                                  nn.Flatten(), nn.Dropout(0.3),
                                  nn.Linear(2 * cfg.width * 7 * 7, cfg.feature_dim), nn.ReLU())
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x):
        """(B, 1, 28, 28) in [-1, 1] -> (B, feature_dim): the space FID is measured in."""
        from course_lib.nn.unet import check_model_input
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1:] != (self.config.in_channels, 28, 28):
            raise ValueError(f"expects images shaped (B, {self.config.in_channels}, 28, 28), "
                             f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        check_model_input(self, x, "x")
        return self.body(x)

    def forward(self, x, t=None):
        """Class logits (B, num_classes). t is accepted and ignored (a clean-image classifier)."""
        return self.head(self.features(x))


# --- the noise-aware classifier of lesson 04 (used for guidance, never for evaluation) ---

@dataclass(frozen=True)
class NoisyClassifierConfig:
    """ADM's guidance classifier (Dhariwal & Nichol 2021, sec. 4.1): the downsampling half of the
    UNet, conditioned on t through AdaGN, ending in attention pooling."""
    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple = (7,)
    head_channels: int = 32
    norm_groups: int = 8
    num_classes: int = 10


class AttentionPool(nn.Module):
    """ADM's AttentionPool2d: a query made from the mean feature attends over all positions
    (plus itself), with a learned position embedding; the pooled vector is projected to logits."""

    def __init__(self, ch: int, positions: int, head_channels: int, out_dim: int):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.pos = nn.Parameter(torch.randn(positions + 1, ch) / ch ** 0.5)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.out = nn.Linear(ch, out_dim)

    def forward(self, h):                                    # (B, C, H, W)
        from course_lib.nn.attention import attention
        B, C = h.shape[:2]
        x = h.flatten(2).transpose(1, 2)                     # (B, HW, C)
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.pos.to(x.dtype)  # (B, 1 + HW, C)
        q, k, v = self.qkv(x).reshape(B, -1, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        pooled = attention(q[:, :, :1], k, v)                # (B, nh, 1, hd): the mean token's query
        return self.out(pooled.reshape(B, C))


class NoisyClassifier(nn.Module):
    """p(y | x_t, t): logits (B, num_classes) for noised images x_t at step t."""

    def __init__(self, config: NoisyClassifierConfig = NoisyClassifierConfig()):
        super().__init__()
        from course_lib.nn.embeddings import TimestepEmbedding
        from course_lib.nn.unet import AttentionBlock, Downsample, ResBlock
        cfg = self.config = config
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.time_embed = TimestepEmbedding(ch, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        cur, size = ch, cfg.image_size
        for i, m in enumerate(cfg.channel_mults):
            w = ch * m
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(cur, w, emb_dim, 0.0, cfg.norm_groups, True))
                if size in cfg.attention_resolutions:
                    self.blocks.append(AttentionBlock(w, cfg.head_channels, cfg.norm_groups))
                cur = w
            if i < len(cfg.channel_mults) - 1:
                self.blocks.append(Downsample(cur))
                size = (size + 1) // 2
        self.mid = ResBlock(cur, cur, emb_dim, 0.0, cfg.norm_groups, True)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cur)
        self.pool = AttentionPool(cur, size * size, cfg.head_channels, cfg.num_classes)

    def forward(self, x_t, t):
        """x_t (B, C, H, W), t (B,) integer steps -> logits (B, num_classes)."""
        cfg = self.config
        from course_lib.nn.unet import ResBlock, check_model_input, check_timesteps_input
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4 \
                or x_t.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expects x_t shaped (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(getattr(x_t, 'shape', ())) or type(x_t).__name__}")
        check_model_input(self, x_t, "x_t")
        check_timesteps_input(t, x_t)
        emb = self.time_embed(t)
        h = self.conv_in(x_t)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        h = self.mid(h, emb)
        return self.pool(torch.nn.functional.silu(self.norm_out(h)))
