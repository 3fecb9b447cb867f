"""The noise-aware classifier of lesson 04: shapes, dependence on t, attention pooling, input checks."""
import pytest
import torch

from course_lib.nn.attention import attention
from course_lib.nn.classifier import AttentionPool, NoisyClassifier, NoisyClassifierConfig

SMALL = NoisyClassifierConfig(base_channels=8, channel_mults=(1, 2), head_channels=8, norm_groups=4,
                              attention_resolutions=(14,))


def _model(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    return NoisyClassifier(cfg).eval()


def test_logit_shape_and_batch_independence():
    model = _model()
    x, t = torch.randn(5, 1, 28, 28), torch.tensor([0, 10, 500, 900, 999])
    with torch.no_grad():
        logits = model(x, t)
        assert logits.shape == (5, 10) and torch.isfinite(logits).all()
        torch.testing.assert_close(model(x[2:3], t[2:3]), logits[2:3], rtol=1e-5, atol=1e-5)


def test_default_config_and_size():
    model = NoisyClassifier().eval()
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28), torch.tensor([3, 4])).shape == (2, 10)


def test_the_logits_depend_on_t():
    model = _model()
    for p in model.parameters():  # zero-initialised layers would hide the timestep path
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([0])), model(x, torch.tensor([999])))


def test_gradient_reaches_the_input():
    model = _model()
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    model(x, torch.tensor([5, 600])).log_softmax(1)[:, 3].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_attention_pool_is_the_mean_query_over_mean_and_positions():
    torch.manual_seed(0)
    pool = AttentionPool(ch=8, positions=4, head_channels=4, out_dim=3).eval()
    h = torch.randn(2, 8, 2, 2)
    x = torch.cat([h.flatten(2).mean(2, keepdim=True), h.flatten(2)], 2).transpose(1, 2) + pool.pos
    q, k, v = pool.qkv(x).chunk(3, dim=-1)
    heads = [torch.softmax(q[:, :1, s] @ k[:, :, s].transpose(1, 2) / 2.0, -1) @ v[:, :, s]
             for s in (slice(0, 4), slice(4, 8))]  # two heads of 4 channels, scale 1/sqrt(4)
    expected = pool.out(torch.cat(heads, -1)[:, 0])
    with torch.no_grad():
        torch.testing.assert_close(pool(h), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32), (1, 28, 28)])
def test_bad_image_shape(shape):
    with pytest.raises(ValueError, match="x_t shaped"):
        _model()(torch.zeros(shape), torch.zeros(shape[0], dtype=torch.long))


def test_bad_t():
    with pytest.raises(ValueError, match="t must be"):
        _model()(torch.zeros(2, 1, 28, 28), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="t must be"):
        _model()(torch.zeros(2, 1, 28, 28), 5)
