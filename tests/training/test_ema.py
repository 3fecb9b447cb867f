"""Polyak averaging of weights: one update by hand, and the warm-up of the decay."""
import pytest
import torch
from torch import nn


from course_lib.training.ema import EMA


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_rate_warm_up():
    ema = EMA(_net(), decay=0.999)
    assert ema.rate(0) == pytest.approx(0.1)        # (1 + 0) / (10 + 0)
    assert ema.rate(10) == pytest.approx(11 / 20)
    assert ema.rate(10_000) == 0.999                 # capped at the decay
    rates = [ema.rate(k) for k in range(0, 20_000, 100)]
    assert rates == sorted(rates)


def test_one_update_by_hand():
    net = _net()
    ema = EMA(net, decay=0.9)
    before = {n: p.clone() for n, p in ema.model.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(3.0)
    step = 100
    d = min(0.9, (1 + step) / (10 + step))
    assert d == 0.9
    ema.update(net, step)
    for n, p in net.named_parameters():
        torch.testing.assert_close(dict(ema.model.named_parameters())[n], d * before[n] + (1 - d) * p)
    assert torch.equal(ema.model[1].running_mean, torch.full((4,), 3.0))  # buffers are copied


def test_early_update_uses_warm_up_rate():
    net = _net()
    ema = EMA(net, decay=0.999)
    w0 = ema.model[0].weight.clone()
    with torch.no_grad():
        net[0].weight.mul_(-1)
    ema.update(net, 0)
    torch.testing.assert_close(ema.model[0].weight, 0.1 * w0 + 0.9 * net[0].weight)


def test_ema_is_a_frozen_copy():
    net = _net()
    ema = EMA(net)
    assert ema.model is not net and not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        net[0].weight.add_(1)
    assert not torch.equal(ema.model[0].weight, net[0].weight)


@pytest.mark.parametrize("decay", [1.0, -0.1, 2.0])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMA(_net(), decay)
