"""The two speeds and the default device."""
import pytest
import torch

from course_lib import runtime


@pytest.mark.parametrize("value,quick", [("1", True), ("yes", True), ("true", True),
                                         ("0", False), ("", False), ("false", False), ("False", False)])
def test_is_quick_and_pick(monkeypatch, value, quick):
    monkeypatch.setenv("COURSE_QUICK", value)
    assert runtime.is_quick() is quick
    assert runtime.pick(quick=10, full=1000) == (10 if quick else 1000)


def test_unset_is_full_speed(monkeypatch):
    monkeypatch.delenv("COURSE_QUICK", raising=False)
    assert not runtime.is_quick() and runtime.pick(quick="q", full="f") == "f"


def test_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.default_device() == torch.device("cuda")


def test_bf16_is_fast_reads_the_cpu_flags_and_the_override(monkeypatch):
    monkeypatch.delenv("COURSE_BF16", raising=False)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "fma"})
    assert not runtime.bf16_is_fast("cpu")
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert runtime.bf16_is_fast("cpu")
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"amx_bf16"})
    assert runtime.bf16_is_fast("cpu") and not runtime.bf16_is_fast("mps")
    monkeypatch.setenv("COURSE_BF16", "0")
    assert not runtime.bf16_is_fast("cpu")
    monkeypatch.setenv("COURSE_BF16", "1")
    assert runtime.bf16_is_fast("cpu")


def test_autocast_is_bf16_only_where_fast_and_asked(monkeypatch):
    x = torch.randn(2, 3)
    w = torch.randn(3, 3)
    monkeypatch.setenv("COURSE_BF16", "1")
    with runtime.autocast("cpu", True):
        assert (x @ w).dtype == torch.bfloat16
    with runtime.autocast("cpu", False):
        assert (x @ w).dtype == torch.float32
    monkeypatch.setenv("COURSE_BF16", "0")
    with runtime.autocast("cpu", True):
        assert (x @ w).dtype == torch.float32
