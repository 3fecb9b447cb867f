"""Checks of scalar and tensor arguments shared by diffusion/, samplers/ and guidance/ (not public API).

Each raises TypeError for the wrong kind of value and ValueError for a value out of range, with a
message naming the parameter and its valid range, so that a mistake is reported where it is made
and never surfaces as NaN samples or an error from inside torch.
"""
from __future__ import annotations

import math
import numbers

import torch


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python, numpy or 0-d integer tensor; not a bool, not a float such as 10.5)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must lie in [{'-inf' if minimum is None else minimum}, "
                         f"{'inf' if maximum is None else maximum}], got {value}")
    return value


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (Python, numpy or a one-element tensor) within the given bounds."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    where = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {where}, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must lie in {where}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must lie in {where}, got {value}")
    return value


def check_index_tensor(name: str, values, *, low: int | None = None, high: int | None = None) -> torch.Tensor:
    """Integer indices (a sequence or tensor) as a flat int64 tensor. Float values are accepted only
    when they are whole numbers (1.0, not 0.9); a bool or non-numeric entry is a TypeError."""
    if isinstance(values, torch.Tensor):
        t = values
    else:
        try:
            t = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a sequence of integers, got {values!r}") from e
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dtype.is_floating_point:
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError(f"{name} must hold whole numbers (step indices), got {t.flatten().tolist()[:8]}")
    t = t.flatten().to(torch.long)
    if t.numel() and ((low is not None and int(t.min()) < low) or (high is not None and int(t.max()) > high)):
        raise ValueError(f"{name} must lie in [{low}, {high}], got values from {int(t.min())} to {int(t.max())}")
    return t


def check_like(name: str, value, x: torch.Tensor, x_name: str = "x_t") -> torch.Tensor:
    """A floating-point tensor of exactly x's shape, on x's device (eps, v, noise, x0 beside x_t)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor shaped like {x_name} {tuple(x.shape)}, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.shape != x.shape:
        raise ValueError(f"{name} shape {tuple(value.shape)} differs from {x_name} shape {tuple(x.shape)}"
                         + ("; split a learned-variance output first (formulas.split_model_output)"
                            if name == "eps" and value.dim() > 1 and x.dim() > 1 and value.shape[1] == 2 * x.shape[1]
                            else ""))
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but {x_name} is on {x.device}; move them to one device")
    return value
