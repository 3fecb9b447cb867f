"""Run-time settings shared by every lesson: the two speeds, the device, the threads, the precision.

`COURSE_QUICK=1` (set by `make test` and CI) asks for fewer samples and steps;
every cell still runs. `pick(quick=..., full=...)` returns the value for this speed.

`device()` is the one device choice (CUDA when present, `COURSE_DEVICE=cpu|cuda|cuda:N` to
override, `COURSE_DEVICE=sim` for a CPU stand-in that fails where CUDA would: course_lib.simdevice);
`threads()` the CPU threads (the affinity mask, `COURSE_THREADS` to override);
`describe()` the line each notebook prints: device, precision and threads it runs with.
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


class DeviceError(RuntimeError):
    """A device was asked for that this machine does not have."""


def device(requested=None) -> torch.device:
    """The device lessons and recipes run on: `requested` if given, else `COURSE_DEVICE`, else CUDA
    when present, else the CPU. Models and tensors follow their inputs after that.

    Asking for CUDA ("cuda", "cuda:N") where there is none, or for a GPU index past the last, is a
    DeviceError that says what this machine has.
    """
    name = requested if requested is not None else (os.environ.get("COURSE_DEVICE") or None)
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "sim":        # a stand-in for a GPU that fails where CUDA would (course_lib.simdevice)
        from course_lib import simdevice
        return simdevice.enable()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for (--device or COURSE_DEVICE), but CUDA is not "
                              f"available here (torch {torch.__version__}, "
                              f"built for CUDA {torch.version.cuda or 'none'}): use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported by the course: use cpu, cuda or cuda:N")
    return dev


def default_device() -> torch.device:
    """The same as device(); kept for older notebooks."""
    return device()


def threads() -> int:
    """CPU threads for this process: `COURSE_THREADS` if set, else `OMP_NUM_THREADS` if set, else the
    CPUs in this process's affinity mask (what a container or `taskset` allows, not the machine's
    count), shared among the processes torchrun starts on this node (LOCAL_WORLD_SIZE)."""
    for var in ("COURSE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{var}={value!r} is not a whole number of threads") from None
            if n < 1:
                raise ValueError(f"{var}={value!r}: the thread count must be at least 1")
            return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def set_threads(n: int | None = None) -> int:
    """torch.set_num_threads(n or threads()), only when it changes anything; returns the count."""
    global _threads_set
    n = threads() if n is None else n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _threads_set = True
    return n


_threads_set = False


def ensure_threads() -> int:
    """set_threads() once per process (the trainer and samplers call this); afterwards the thread count
    is left as it is, so a later torch.set_num_threads of the caller's own is respected."""
    return torch.get_num_threads() if _threads_set else set_threads()


def hardware(dev=None) -> str:
    """The hardware in words, for cards and benchmark results: the GPU's name, or the CPU's and its threads."""
    dev = torch.device(dev) if dev is not None else device()
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}); host {cpu_name()}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def cpu_name() -> str:
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def precision(dev, bf16: bool = True) -> str:
    """What runtime.autocast(dev.type, bf16) runs in: "bf16 autocast" or "fp32"."""
    return "bf16 autocast" if bf16 and bf16_is_fast(torch.device(dev).type) else "fp32"


def describe(dev=None, bf16: bool = True) -> str:
    """One line for the top of a notebook: the device, the precision and the CPU threads it runs with.
    Sets the thread count first (set_threads), so the line says what is in effect."""
    dev = device(dev)
    n = set_threads()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    from course_lib import simdevice
    if simdevice.is_sim(dev):
        name = f"the simulated GPU of COURSE_DEVICE=sim, on {name}"
    return f"device {dev} ({name}), {precision(dev, bf16)}, {n} CPU thread{'s' if n > 1 else ''}"


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
