"""One entry point for attention, used by every model in the course.

`attention(q, k, v)` with q, k, v shaped (B, H, L, D). backend:
- "auto": the Triton flash-attention kernel (lesson 10) where it serves, torch SDPA everywhere else
  (`auto_backend` says which, and why);
- "sdpa": torch.nn.functional.scaled_dot_product_attention;
- "triton": the course's kernel (`course_lib.kernels.flash_attention`); on the CPU it runs only
  in Triton's interpreter (TRITON_INTERPRET=1 before triton is imported), slowly;
- "reference": the plain PyTorch specification (`course_lib.kernels.reference`).

Every backend computes the same function, special values included: a query row holding NaN or
inf gives a NaN output row, a NaN in a visible key or value reaches the rows that see it, and a
row that sees no key returns exactly 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.kernels.reference import attention_mask, attention_reference, check_key_padding_mask

BACKENDS = ("auto", "sdpa", "triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256
TRITON_MIN_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores, cp.async


def _check(q, k, v, key_padding_mask):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention expects tensors, got {name} of type {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"attention expects {name} shaped (B, H, L, D), got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"attention needs floating-point q, k, v, got {name}.dtype={x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "need q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv)")
    check_key_padding_mask(key_padding_mask, k.shape[0], k.shape[2])


def auto_backend(q, k, v):
    """("triton" or "sdpa", why): the course's kernel where it serves, SDPA everywhere else.

    Triton runs for fp16 / bf16 on a CUDA GPU of compute capability 8.0 or more (Ampere,
    Hopper) with head dims up to 256. Everything else goes to SDPA, which works there: the CPU,
    fp32 (the kernel's fp32 path is for checking, not speed; ask for backend="triton" to use it),
    fp64, larger head dims, older GPUs, and machines without Triton.
    """
    if not q.is_cuda:
        return "sdpa", f"tensors on {q.device.type}, not CUDA"
    if q.dtype not in TRITON_DTYPES:
        return "sdpa", f"{q.dtype} (the kernel serves fp16 and bf16)"
    if max(q.shape[-1], v.shape[-1]) > TRITON_MAX_HEAD_DIM:
        return "sdpa", f"head dim {max(q.shape[-1], v.shape[-1])} > {TRITON_MAX_HEAD_DIM}"
    capability = torch.cuda.get_device_capability(q.device)
    if capability < TRITON_MIN_CAPABILITY:
        return "sdpa", f"compute capability {capability} < {TRITON_MIN_CAPABILITY}"
    if not _triton_available():
        return "sdpa", "triton is not installed"
    return "triton", f"{q.dtype} on compute capability {capability}"


def _sdpa(q, k, v, causal, key_padding_mask):
    empty = None
    if key_padding_mask is None and (not causal or q.shape[2] == k.shape[2]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # lets SDPA pick a fused kernel
    else:
        keep = attention_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask,
                              device=q.device)  # (1 or B, 1, Lq, Lk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        empty = ~keep.any(dim=-1, keepdim=True)  # (1 or B, 1, Lq, 1): rows that see no key
    # SDPA's CPU kernels return a finite row for a query holding NaN; the definition gives NaN
    bad_query = ~torch.isfinite(q).all(dim=-1, keepdim=True)  # (B, H, Lq, 1)
    out = out.masked_fill(bad_query, float("nan"))
    if empty is not None:
        out = out.masked_fill(empty, 0.0)  # SDPA gives NaN there; only these rows become 0
    return out


def attention(q, k, v, *, causal=False, key_padding_mask=None, backend="auto"):
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv).

    causal: query i sees keys j <= i + Lk - Lq. key_padding_mask: bool (B, Lk), True = real key.
    Rows that see no key return 0 on every backend; NaN propagates the same way on every backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    _check(q, k, v, key_padding_mask)
    if backend == "auto":
        backend, _ = auto_backend(q, k, v)
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    if backend == "triton":
        from course_lib.kernels.flash_attention import flash_attention
        return flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    return _sdpa(q, k, v, causal, key_padding_mask)


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
