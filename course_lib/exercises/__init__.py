"""Checkers for the exercises at the end of each lesson.

A checker runs the learner's function on fixed inputs, compares with the library's answer and,
when they differ, says *how*: a wrong shape, a dtype, a constant factor, a known slip (a swapped
coefficient, an index off by one), not only that the answer is wrong. Each lesson registers
checkers in a module of this package named after the concept (`exercises.forward_process`,
`exercises.ddpm`, ...), built on `check` and `check_function` below.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch


class Verdict(NamedTuple):
    ok: bool
    message: str

    def __str__(self):
        return ("Correct! " if self.ok else "Not yet: ") + self.message

    def _repr_html_(self):  # shown in a notebook cell
        color = "#1a7f37" if self.ok else "#b42318"
        return f'<div style="color:{color};font-weight:600">{str(self)}</div>'


def _close(a, b, rtol, atol):
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)


def check(result, expected, *, mistakes: Mapping[str, torch.Tensor] | None = None,
          rtol: float = 1e-4, atol: float = 1e-5, what: str = "your answer") -> Verdict:
    """Compare `result` with `expected`; if wrong, name the most likely mistake.

    mistakes: {"description of a known slip": the value that slip produces}.
    """
    if result is None:
        return Verdict(False, f"{what} returned None; did you forget `return`?")
    if not isinstance(result, torch.Tensor):
        try:
            result = torch.as_tensor(result)
        except Exception:
            return Verdict(False, f"{what} should be a tensor, got {type(result).__name__}")
    expected = torch.as_tensor(expected)
    if result.shape != expected.shape:
        hint = ""
        if result.numel() == expected.numel():
            hint = " (same number of elements: a reshape or transpose is off)"
        elif result.dim() != expected.dim():
            hint = " (a missing or extra dimension: check broadcasting of per-timestep values)"
        return Verdict(False, f"shape {tuple(result.shape)} but expected {tuple(expected.shape)}{hint}")
    if not result.dtype.is_floating_point and expected.dtype.is_floating_point:
        return Verdict(False, f"dtype {result.dtype}; expected a floating-point tensor")
    if not torch.isfinite(result.double()).all():
        return Verdict(False, "contains NaN or inf (a division by zero, or a log/sqrt of a negative number?)")
    if _close(result, expected, rtol, atol):
        return Verdict(True, "matches the library.")
    for description, value in (mistakes or {}).items():
        if _close(result, torch.as_tensor(value), rtol, atol):
            return Verdict(False, f"it looks like {description}.")
    if not result.double().abs().any():
        return Verdict(False, "every value is 0: is a placeholder (torch.zeros_like) still there?")
    ratio = _constant_ratio(result, expected)
    if ratio is not None:
        return Verdict(False, f"off by a constant factor of {ratio:.4g} everywhere: a missing sqrt, "
                              "a square, or a scale (such as 2 or 1/2) slipped in?")
    err = (result.double() - expected.double()).abs().max().item()
    return Verdict(False, f"values differ (largest difference {err:.3g}); compare one element by hand.")


def _constant_ratio(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    mask = b.abs() > 1e-8
    if mask.sum() < 2:
        return None
    r = a[mask] / b[mask]
    if r[0] == 0:  # a zero result is not "off by a factor"
        return None
    if torch.allclose(r, r[0].expand_as(r), rtol=1e-4) and not torch.isclose(r[0], torch.tensor(1.0, dtype=r.dtype)):
        return float(r[0])
    return None


def check_function(fn: Callable, reference: Callable, inputs: list, *,
                   mistakes: Mapping[str, Callable] | None = None, **tolerances) -> Verdict:
    """Run fn and reference on each args tuple in `inputs`; mistakes map a description to a wrong
    implementation, so the checker can say which slip the learner's function reproduces."""
    for args in inputs:
        try:
            result = fn(*args)
        except Exception as e:  # the learner's code raised: say so plainly
            return Verdict(False, f"your function raised {type(e).__name__}: {e}")
        known = {d: m(*args) for d, m in (mistakes or {}).items()}
        verdict = check(result, reference(*args), mistakes=known, **tolerances)
        if not verdict.ok:
            return verdict
    return Verdict(True, f"matches the library on {len(inputs)} test input(s).")
