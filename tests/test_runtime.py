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
