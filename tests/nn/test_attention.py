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


def _cpu_backends():
    """The backends that run here: SDPA, the reference, and the kernel when Triton interprets it."""
    names = ["sdpa", "reference", "auto"]
    if importlib.util.find_spec("triton") is not None:
        from course_lib.kernels import flash_attention as fa
        if fa.is_interpreted():
            names.append("triton")
    return names


@pytest.mark.parametrize("with_padding, causal", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, inside the interpreter
def test_nan_propagates_the_same_way_on_every_backend(with_padding, causal):
    """A NaN query row gives a NaN row (SDPA's CPU kernel alone returned a finite one); a NaN value
    of a visible key reaches every row that sees it; a row that sees no key stays exactly 0."""
    q, k, v = qkv(Lq=6, Lk=9, D=16)
    q[0, 1, 4, 2] = float("nan")
    v[0, 0, 0, 5] = float("nan")  # the first key: every query of batch 0, head 0 sees it, causal or not
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1] = False               # batch 1 sees no key at all
    kw = dict(causal=causal, key_padding_mask=kpm if with_padding else None)
    for backend in _cpu_backends():
        out = attention(q, k, v, backend=backend, **kw)
        assert torch.isnan(out[0, 1, 4]).all(), backend
        assert torch.isnan(out[0, 0, :, 5]).all() and torch.isfinite(out[0, 0, :, :5]).all(), backend
        assert torch.isfinite(out[0, 1, :4]).all() and torch.isfinite(out[0, 1, 5:]).all(), backend
        if with_padding:
            assert torch.all(out[1] == 0), backend
        else:
            assert torch.isfinite(out[1]).all(), backend


def test_masks_must_be_bool():
    """A float mask of zeros used to mask every key, and 0.5 meant 'masked' to the kernel, 'visible' to the reference."""
    q, k, v = qkv()
    for mask in (torch.zeros(2, 9), torch.full((2, 9), 0.5), torch.ones(2, 9, dtype=torch.int64)):
        for backend in ("sdpa", "reference", "auto"):
            with pytest.raises(TypeError, match="bool"):
                attention(q, k, v, key_padding_mask=mask, backend=backend)


def test_integer_inputs_are_an_error():
    """The reference used to return truncated integers."""
    q, k, v = (x.round().long() for x in qkv())
    for backend in ("sdpa", "reference", "auto"):
        with pytest.raises(TypeError, match="floating-point"):
            attention(q, k, v, backend=backend)
    from course_lib.kernels.reference import attention_reference
    with pytest.raises(TypeError, match="floating-point"):
        attention_reference(q, k, v)


class _FakeCuda:
    """Just what auto_backend reads of a CUDA tensor."""
    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, dtype, d):
        self.dtype, self.shape = dtype, (2, 8, 1024, d)


@pytest.mark.parametrize("dtype, d, capability, want", [
    (torch.bfloat16, 40, (9, 0), "triton"), (torch.float16, 256, (8, 0), "triton"),
    (torch.float32, 64, (9, 0), "sdpa"),    # fp32 unless asked for (backend="triton")
    (torch.float64, 64, (9, 0), "sdpa"),
    (torch.bfloat16, 320, (9, 0), "sdpa"),  # head dims the kernel does not take
    (torch.float16, 64, (7, 5), "sdpa"),    # Turing: no bf16 tensor cores, no cp.async
])
def test_auto_backend(dtype, d, capability, want, monkeypatch):
    from course_lib.nn import attention as attention_module
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(attention_module, "_triton_available", lambda: True)
    x = _FakeCuda(dtype, d)
    backend, why = attention_module.auto_backend(x, x, x)
    assert backend == want, why
    monkeypatch.setattr(attention_module, "_triton_available", lambda: False)
    assert attention_module.auto_backend(x, x, x)[0] == "sdpa"
    q, _, _ = qkv()
    assert attention_module.auto_backend(q, q, q) == ("sdpa", "tensors on cpu, not CUDA")
