"""One entry point for attention, used by every model in the course.

`attention(q, k, v)` with q, k, v shaped (B, H, L, D). backend:
- "auto": the Triton flash-attention kernel on CUDA (lesson 10), torch SDPA elsewhere;
- "sdpa": torch.nn.functional.scaled_dot_product_attention;
- "triton": the course's kernel (`course_lib.kernels.flash_attention`);
- "reference": the plain PyTorch specification (`course_lib.kernels.reference`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.kernels.reference import attention_reference

BACKENDS = ("auto", "sdpa", "triton", "reference")


def _check(q, k, v, key_padding_mask):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"attention expects {name} shaped (B, H, L, D), got {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "need q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv)")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, Lk) = {(k.shape[0], k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")


def _sdpa(q, k, v, causal, key_padding_mask):
    mask = None
    if causal or key_padding_mask is not None:
        lq, lk = q.shape[2], k.shape[2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            mask = mask.tril(diagonal=lk - lq)
        mask = mask[None, None]
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return torch.nan_to_num(out, nan=0.0)  # rows with every key masked -> 0, as the reference
    return F.scaled_dot_product_attention(q, k, v)


def attention(q, k, v, *, causal=False, key_padding_mask=None, backend="auto"):
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    _check(q, k, v, key_padding_mask)
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_available() else "sdpa"
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
