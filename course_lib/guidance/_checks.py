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


def check_image(x_t, name: str = "x_t") -> None:
    if not isinstance(x_t, torch.Tensor) or not x_t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x_t, 'dtype', type(x_t).__name__)}")
    if x_t.dim() < 2:
        raise ValueError(f"{name} must be batched, shape (B, C, ...), got {tuple(x_t.shape)}")


def check_steps(t, batch: int, what: str) -> torch.Tensor:
    """Timesteps t for a wrapper that has no schedule: an integer tensor of shape (batch,), >= 0
    (the model checks the upper end against its own schedule)."""
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what}: t must be an integer tensor of shape ({batch},), got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.shape != (batch,):
        raise ValueError(f"{what}: t must have shape ({batch},), one step per sample, got {tuple(t.shape)}")
    if batch and int(t.min()) < 0:
        raise ValueError(f"{what}: t must be >= 0, got {int(t.min())}")
    return t


def check_labels(y, batch: int, what: str, device=None) -> torch.Tensor:
    """Class labels y: an integer tensor of shape (batch,) with no negative entry (on `device` if given)."""
    if y is None:
        raise ValueError(f"{what} needs class labels: pass cond=y, an integer tensor of shape ({batch},), "
                         "to the guided noise predictor (loop.sample(..., cond=y))")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{what}: cond must be a tensor of class labels, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{what}: class labels must be an integer tensor (torch.long), got {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{what}: class labels must have shape ({batch},), one per sample, got {tuple(y.shape)}")
    if device is not None and y.device != device:
        raise ValueError(f"{what}: class labels are on {y.device} but x_t is on {device}; move them to one device")
    if batch and int(y.min()) < 0:
        raise ValueError(f"{what}: class labels must be >= 0, got {int(y.min())}")
    return y


def join_output(eps: torch.Tensor, v) -> torch.Tensor:
    """The inverse of formulas.split_model_output: eps, or eps and v stacked along channels."""
    return eps if v is None else torch.cat([eps, v], dim=1)
