"""The ADM UNet: shapes for every conditioning, zero-initialised output, conditioning that
matters, and a clear error for every bad input."""
import pytest
import torch

from course_lib.nn import unet as unet_lib
from course_lib.nn.unet import UNet, UNetConfig, count_parameters, preset


def _perturb(model, seed=0, scale=0.05):
    """Move every weight (including the zero-initialised ones) so each input can change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs(B=2, C=1, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, size, size, generator=g), torch.randint(0, 1000, (B,), generator=g)


def test_tiny_shape_and_zero_initialised_output():
    model = UNet(preset("tiny")).eval()
    x, t = _inputs()
    out = model(x, t)
    assert out.shape == (2, 1, 28, 28)
    assert torch.equal(out, torch.zeros_like(out))  # conv_out starts at zero, as in ADM


def test_learn_sigma_doubles_the_channels():
    model = UNet(preset("tiny", learn_sigma=True, in_channels=3, image_size=32))
    assert model.config.out_channels == 6
    x, t = _inputs(C=3, size=32)
    assert model(x, t).shape == (2, 6, 32, 32)


def test_other_sizes_divisible_by_the_levels():
    model = UNet(preset("tiny"))
    for size in (8, 16):
        x, t = _inputs(size=size)
        assert model(x, t).shape == (2, 1, size, size)


def test_class_conditional():
    model = _perturb(UNet(preset("tiny", num_classes=10)))
    assert model.class_embed.num_embeddings == 11  # ten classes and the null class
    x, t = _inputs()
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([1, 1]))
        null = model(x, t, torch.tensor([10, 10]))
        none = model(x, t)
    assert a.shape == (2, 1, 28, 28)
    assert not torch.allclose(a, b)  # the class reaches the output
    assert torch.equal(none, null)   # y=None means the null class


def test_context_and_context_mask():
    model = _perturb(UNet(preset("tiny", context_dim=8)))
    x, t = _inputs()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    with torch.no_grad():
        plain = model(x, t)
        with_ctx = model(x, t, context=ctx)
        masked = model(x, t, context=ctx, context_mask=mask)
        ctx2 = ctx.clone()
        ctx2[0, 3:] = 100.0  # change only the masked-out tokens of sample 0
        masked2 = model(x, t, context=ctx2, context_mask=mask)
    assert with_ctx.shape == (2, 1, 28, 28)
    assert not torch.allclose(plain, with_ctx)  # the tokens reach the output
    torch.testing.assert_close(masked[1], with_ctx[1], rtol=1e-4, atol=1e-5)  # an all-True row changes nothing
    torch.testing.assert_close(masked2[0], masked[0], rtol=1e-5, atol=1e-6)  # masked tokens are ignored


def test_batch_items_are_independent():
    model = _perturb(UNet(preset("tiny")))
    x, t = _inputs(B=3)
    with torch.no_grad():
        full = model(x, t)
        single = model(x[1:2], t[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter():
    model = _perturb(UNet(preset("tiny", num_classes=3, context_dim=4, learn_sigma=True))).train()
    x, t = _inputs()
    out = model(x, t, torch.tensor([0, 3]), context=torch.randn(2, 2, 4))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []  # every layer, the zero-initialised ones included, can learn


def test_presets_and_parameter_count():
    assert isinstance(preset("fashion"), UNetConfig)
    assert preset("fashion", learn_sigma=True).learn_sigma and not unet_lib.PRESETS["fashion"].learn_sigma
    model = UNet(preset("fashion", learn_sigma=True))
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    assert n * 4 < 10_000_000  # a shipped float32 checkpoint stays under 10 MB (DESIGN.md)
    with pytest.raises(ValueError, match="unknown UNet preset 'huge'.*fashion.*tiny"):
        preset("huge")


@pytest.mark.parametrize("case,error,match", [
    ("channels", ValueError, r"\(B, 1, H, W\)"),
    ("3d", ValueError, r"\(B, 1, H, W\)"),
    ("int", TypeError, "floating-point"),
    ("t_shape", ValueError, r"t must be a tensor of shape \(2,\)"),
    ("t_list", ValueError, r"t must be a tensor"),
    ("y_range", ValueError, r"\[0, 10\]"),
    ("y_negative", ValueError, r"\[0, 10\]"),
    ("y_float", ValueError, "integer class indices"),
    ("y_shape", ValueError, "integer class indices"),
    ("y_unconditional", ValueError, "unconditional"),
    ("context", ValueError, "no context"),
    ("size", ValueError, "divisible by 2"),
])
def test_bad_inputs_raise_clear_errors(case, error, match):
    cond = UNet(preset("tiny", num_classes=10))
    plain = UNet(preset("tiny"))
    x, t = _inputs()
    calls = {
        "channels": lambda: plain(torch.randn(2, 3, 28, 28), t),
        "3d": lambda: plain(torch.randn(2, 28, 28), t),
        "int": lambda: plain(torch.zeros(2, 1, 28, 28, dtype=torch.long), t),
        "t_shape": lambda: plain(x, torch.tensor([1, 2, 3])),
        "t_list": lambda: plain(x, [1, 2]),
        "y_range": lambda: cond(x, t, torch.tensor([0, 11])),
        "y_negative": lambda: cond(x, t, torch.tensor([-1, 0])),
        "y_float": lambda: cond(x, t, torch.tensor([0.0, 1.0])),
        "y_shape": lambda: cond(x, t, torch.tensor([0, 1, 2])),
        "y_unconditional": lambda: plain(x, t, torch.tensor([0, 1])),
        "context": lambda: plain(x, t, context=torch.randn(2, 3, 8)),
        "size": lambda: plain(torch.randn(2, 1, 27, 27), t),
    }
    with pytest.raises(error, match=match):
        calls[case]()


def test_attention_positions_start_at_zero_and_know_where_they_are():
    """attention_positions=True: a learned (C, H, W) embedding per attention block, zero at init, so
    a model warm-started from one without them computes the same output at step 0; once learned,
    it breaks the attention's permutation symmetry (it is the only place-dependent term added)."""
    plain = _perturb(UNet(preset("tiny", context_dim=8)))
    pos = UNet(preset("tiny", context_dim=8, attention_positions=True)).eval()
    missing, unexpected = pos.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.endswith(".pos") for k in missing)
    assert pos.mid_attn.pos.shape == (1, pos.mid_attn.norm.num_channels, 14, 14)   # tiny: 28 -> 14
    x, t = _inputs()
    ctx = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pos(x, t, context=ctx), plain(x, t, context=ctx), rtol=0, atol=0)
    pos.train()
    pos(x, t, context=ctx).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pos.named_parameters() if n.endswith(".pos"))
    block = pos.mid_attn
    with torch.no_grad():
        block.pos.normal_(generator=torch.Generator().manual_seed(3))
        feat = torch.randn(1, block.norm.num_channels, 14, 14, generator=torch.Generator().manual_seed(4))
        rolled = feat.roll(1, dims=-1)
        # without positions, attention commutes with shuffling the positions; with them, it does not
        assert not torch.allclose(block(rolled), block(feat).roll(1, dims=-1), atol=1e-4)
        block.pos.zero_()
        torch.testing.assert_close(block(rolled), block(feat).roll(1, dims=-1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="learned positions on a"):
        block(torch.randn(1, block.norm.num_channels, 4, 4))
