"""`attention()`: every backend computes the same function; bad inputs get a clear error."""
import importlib.util

import pytest
import torch

from course_lib.nn.attention import BACKENDS, attention


def qkv(B=2, H=2, Lq=7, Lk=9, D=16, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=g).to(dtype), torch.randn(B, H, Lk, D, generator=g).to(dtype),
            torch.randn(B, H, Lk, D if Dv is None else Dv, generator=g).to(dtype))


@pytest.mark.parametrize("Lq, Lk, causal", [(7, 9, False), (9, 9, True), (5, 9, True), (9, 5, True)])
@pytest.mark.parametrize("with_padding", [False, True])
def test_sdpa_matches_reference(Lq, Lk, causal, with_padding):
    q, k, v = qkv(Lq=Lq, Lk=Lk, Dv=12)
    kpm = torch.tensor([[True] * Lk, [False, False] + [True] * (Lk - 2)]) if with_padding else None
    kw = dict(causal=causal, key_padding_mask=kpm)
    want = attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    for backend in ("auto", "sdpa"):
        got = attention(q, k, v, backend=backend, **kw)
        assert got.shape == (2, 2, Lq, 12)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_rows_without_keys_are_zero_on_every_cpu_backend():
    q, k, v = qkv(Lq=6, Lk=4)
    kpm = torch.tensor([[True, True, True, True], [False, False, False, False]])
    for backend in ("sdpa", "reference"):
        out = attention(q, k, v, causal=True, key_padding_mask=kpm, backend=backend)
        assert torch.all(out[1] == 0) and torch.all(out[0, :, :2] == 0), backend  # Lq > Lk: rows 0, 1 see nothing
        assert torch.isfinite(out).all()


def test_gradients_flow():
    q, k, v = (x.requires_grad_() for x in qkv())
    attention(q, k, v, causal=True).square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_triton_backend():
    """On CUDA, or in Triton's interpreter, the kernel agrees; otherwise the error says what to do."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from course_lib.kernels import flash_attention as fa
    q, k, v = qkv(Lq=20, Lk=24)
    if torch.cuda.is_available():
        q, k, v = (x.cuda() for x in (q, k, v))
    elif not fa.is_interpreted():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            attention(q, k, v, backend="triton")
        return
    got = attention(q, k, v, causal=True, backend="triton")
    torch.testing.assert_close(got, attention(q, k, v, causal=True, backend="reference"), rtol=1e-4, atol=1e-4)


def test_clear_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        attention(q[0], k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="one device"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="shapes do not match"):
        attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="shapes do not match"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 3, dtype=torch.bool))
    assert BACKENDS == ("auto", "sdpa", "triton", "reference")
