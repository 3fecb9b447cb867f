"""One entry point for attention, used by every model in the course.

`attention(q, k, v)` with q, k, v shaped (B, H, L, D). backend:
- "auto": the Triton flash-attention kernel on CUDA (lesson 10), torch SDPA elsewhere;
- "sdpa": torch.nn.functional.scaled_dot_product_attention;
- "triton": the course's kernel (`course_lib.kernels.flash_attention`); on the CPU it runs only
  in Triton's interpreter (TRITON_INTERPRET=1 before triton is imported), slowly;
- "reference": the plain PyTorch specification (`course_lib.kernels.reference`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from course_lib.kernels.reference import attention_mask, attention_reference

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
    if key_padding_mask is None and (not causal or q.shape[2] == k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # lets SDPA pick a fused kernel
    keep = attention_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask,
                          device=q.device)  # (1 or B, 1, Lq, Lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return torch.nan_to_num(out, nan=0.0)  # rows with every key masked -> 0, as the reference


def attention(q, k, v, *, causal=False, key_padding_mask=None, backend="auto"):
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv).

    causal: query i sees keys j <= i + Lk - Lq. key_padding_mask: bool (B, Lk), True = real key.
    Rows that see no key return 0 on every backend.
    """
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
