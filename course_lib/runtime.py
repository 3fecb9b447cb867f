"""Run-time settings shared by every lesson: the two speeds, the device, the seed.

`COURSE_QUICK=1` (set by `make test` and CI) asks for fewer samples and steps;
every cell still runs. `pick(quick=..., full=...)` returns the value for this speed.
"""
from __future__ import annotations

import os

import torch


def is_quick() -> bool:
    """True when COURSE_QUICK=1 is set in the environment."""
    return os.environ.get("COURSE_QUICK", "0") not in ("", "0", "false", "False")


def pick(*, quick, full):
    """The value for the current speed: `quick` under COURSE_QUICK=1, else `full`."""
    return quick if is_quick() else full


def default_device() -> torch.device:
    """CUDA when present, else the CPU. Models and tensors follow their inputs after that."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
