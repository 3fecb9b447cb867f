"""Run-time settings shared by every lesson: the two speeds, the device, the seed.

`COURSE_QUICK=1` (set by `make test` and CI) asks for fewer samples and steps;
every cell still runs. `pick(quick=..., full=...)` returns the value for this speed.
"""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo, read once per process (autocast asks every forward)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_is_fast(device_type: str = "cpu") -> bool:
    """Whether bf16 autocast speeds models up here. On a CPU only with native bf16 arithmetic
    (AVX512-BF16 or AMX): without it PyTorch emulates bf16, about 10x slower than fp32 (measured on
    an AVX2 EPYC: a training step of the Fashion UNet took 24.6 s under autocast, 2.8 s in fp32).
    `COURSE_BF16=0` or `=1` overrides the detection."""
    forced = os.environ.get("COURSE_BF16")
    if forced is not None:
        return forced not in ("", "0", "false", "False")
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def autocast(device_type: str, enabled: bool = True):
    """bf16 autocast on `device_type` when asked for (`enabled`) and fast there (bf16_is_fast); else fp32."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled and bf16_is_fast(device_type))
