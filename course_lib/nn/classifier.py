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
        if x.dim() != 4 or x.shape[1:] != (self.config.in_channels, 28, 28):
            raise ValueError(f"expects images shaped (B, {self.config.in_channels}, 28, 28), got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x, t=None):
        """Class logits (B, num_classes). t is accepted and ignored (a clean-image classifier)."""
        return self.head(self.features(x))
