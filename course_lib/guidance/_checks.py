"""Input checks and one small helper shared by the guidance wrappers (not public API)."""
from __future__ import annotations

import math
import numbers

import torch


def check_scale(scale, name: str = "scale") -> float:
    """A guidance scale: a finite real number >= 0, returned as a float."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 turns guidance off), got {scale}")
    return float(scale)


def check_image(x_t) -> None:
    if not isinstance(x_t, torch.Tensor) or not x_t.dtype.is_floating_point:
        raise TypeError(f"x_t must be a floating-point tensor, got {getattr(x_t, 'dtype', type(x_t).__name__)}")
    if x_t.dim() < 2:
        raise ValueError(f"x_t must be batched, shape (B, C, ...), got {tuple(x_t.shape)}")


def check_labels(y, batch: int, what: str) -> torch.Tensor:
    """Class labels y: an integer tensor of shape (batch,) with no negative entry."""
    if y is None:
        raise ValueError(f"{what} needs class labels: pass cond=y, an integer tensor of shape ({batch},), "
                         "to the guided noise predictor (loop.sample(..., cond=y))")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{what}: cond must be a tensor of class labels, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{what}: class labels must be an integer tensor (torch.long), got {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{what}: class labels must have shape ({batch},), one per sample, got {tuple(y.shape)}")
    if batch and int(y.min()) < 0:
        raise ValueError(f"{what}: class labels must be >= 0, got {int(y.min())}")
    return y


def join_output(eps: torch.Tensor, v) -> torch.Tensor:
    """The inverse of formulas.split_model_output: eps, or eps and v stacked along channels."""
    return eps if v is None else torch.cat([eps, v], dim=1)
