"""The attribute classifier of the shapes world: reads a scene's code (data.shapes.LABEL_FIELDS:
how many objects, each object's shape, color and size, the position of one object or the axis
of two) from an image. It is the judge of caption accuracy (eval.attributes, lessons 06-09),
trained on ground-truth renders only and never used for guidance.

A plain CNN: three stages of two 3x3 convolutions (32x32 -> 16 -> 8 -> 4), then a shared MLP and
one linear head per field. Positions and relations need to know where things are, so the last
4x4 map is flattened rather than pooled. 64x64 inputs are average-pooled to 32x32 first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from course_lib.data.shapes import FIELD_CLASSES, LABEL_FIELDS


@dataclass(frozen=True)
class AttributeClassifierConfig:
    widths: tuple = (32, 64, 128)   # channels of the three stages (32, 16 and 8 px)
    hidden: int = 256               # width of the shared MLP
    dropout: float = 0.1            # before the heads
    groups: int = 8                 # GroupNorm groups


class AttributeClassifier(nn.Module):
    """images (B, 3, 32 or 64, same) in [-1, 1] -> logits (B, sum of FIELD_CLASSES), one slice per field."""

    def __init__(self, config: AttributeClassifierConfig = AttributeClassifierConfig()):
        super().__init__()
        self.config = cfg = config
        layers, c_in = [], 3
        for w in cfg.widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.GroupNorm(cfg.groups, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(cfg.groups, w), nn.SiLU(), nn.AvgPool2d(2)]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, cfg.hidden), nn.SiLU(), nn.Dropout(cfg.dropout))
        self.head = nn.Linear(cfg.hidden, sum(FIELD_CLASSES.values()))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The shared features (B, hidden): the space caption-set distances are measured in."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != x.shape[-2] or x.shape[-1] not in (32, 64):
            raise ValueError(f"the attribute classifier takes RGB images (B, 3, 32, 32) or (B, 3, 64, 64), "
                             f"got {tuple(x.shape)}")
        if x.shape[-1] == 64:
            x = F.avg_pool2d(x, 2)
        return self.mlp(self.features(x))                        # (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))                          # (B, 33)


def split_logits(logits: torch.Tensor) -> dict:
    """{field: logits (B, classes)} from the classifier's concatenated output."""
    out, i = {}, 0
    for f in LABEL_FIELDS:
        out[f] = logits[:, i:i + FIELD_CLASSES[f]]
        i += FIELD_CLASSES[f]
    return out


def attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over fields of the cross-entropy, fields marked -1 (not applicable) left out."""
    total = logits.new_zeros(())
    for j, (f, lg) in enumerate(split_logits(logits).items()):
        if (labels[:, j] >= 0).any():
            total = total + F.cross_entropy(lg.float(), labels[:, j], ignore_index=-1)
    return total


@torch.no_grad()
def predict_codes(model: AttributeClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The most likely scene code (B, len(LABEL_FIELDS)) of each image; fields that do not apply to
    the predicted count (the second object of one, the position of two) are set to -1."""
    model.eval()
    codes = []
    for i in range(0, images.shape[0], batch_size):
        parts = split_logits(model(images[i:i + batch_size]).float())
        c = torch.stack([parts[f].argmax(1) for f in LABEL_FIELDS], 1)
        one = c[:, 0] == 0
        c[one, 4:7] = -1
        c[one, 8] = -1
        c[~one, 7] = -1
        codes.append(c)
    return torch.cat(codes) if codes else torch.empty(0, len(LABEL_FIELDS), dtype=torch.long)
