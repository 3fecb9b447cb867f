"""The plain PyTorch specification of attention: softmax(Q K^T * scale + mask) V.

Every fast path (torch SDPA, the Triton kernel in `flash_attention.py`) is tested
against this function. It materialises the full (Lq, Lk) score matrix, so it reads
and writes O(L^2) memory; lesson 10 explains why that is the cost a fused kernel
removes. Works in any floating dtype, float64 included, on any device.
"""
from __future__ import annotations

import math

import torch


def check_key_padding_mask(key_padding_mask, batch, lk):
    """A key padding mask is None or a bool (B, Lk) tensor; anything else is a clear error.

    (A float mask of 0.0 and 1.0, or 0.5, would otherwise mean different things to different
    backends: `bool()` makes 0.5 visible, a float attn_mask would add it to the scores.)
    """
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
        raise TypeError(f"key_padding_mask must be a bool tensor (True = a real key), got {got}; "
                        "for a 0/1 or float mask pass mask > 0.5, or mask.bool()")
    if tuple(key_padding_mask.shape) != (batch, lk):
        raise ValueError(f"key_padding_mask must be (B, Lk) = {(batch, lk)}, got {tuple(key_padding_mask.shape)}")


def attention_mask(lq, lk, *, causal=False, key_padding_mask=None, device=None):
    """The bool matrix of which key each query may see: (1, 1, Lq, Lk), or (B, 1, Lq, Lk) with padding.

    causal: query i sees keys j <= i + (Lk - Lq) (aligned at the end, as when a
        query block is appended to a cache of keys); with Lq > Lk the first
        Lq - Lk queries see no key at all.
    key_padding_mask: bool (B, Lk), True where the key is real, False where padding.
    """
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, key_padding_mask.shape[0], lk)
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril(diagonal=lk - lq)
    keep = keep[None, None]  # (1, 1, Lq, Lk)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :].to(device=device)
    return keep


def attention_reference(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    """Attention as written in "Attention Is All You Need", eq. (1).

    q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv) -> (B, H, Lq, Dv), floating point.
    causal: query i sees keys j <= i + (Lk - Lq) (aligned at the end, as when a
        query block is appended to a cache of keys).
    key_padding_mask: bool (B, Lk), True where the key is real, False where padding.
    scale: multiplies Q K^T; 1 / sqrt(D) when None.
    Rows whose keys are all masked return exactly zeros (instead of NaN), and their
    gradients are zeros too: no NaN is ever created, not even in the backward pass.
    NaN in the inputs propagates: a query row holding NaN gives a NaN output row.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not x.dtype.is_floating_point:
            raise TypeError(f"attention needs floating-point q, k, v, got {name}.dtype={x.dtype}")
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, k.shape[0], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number, got {scale}")
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale  # (B, H, Lq, Lk): the O(L^2) tensor
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # softmax in fp32, as every fused kernel does
    keep = attention_mask(q.shape[2], k.shape[2], causal=causal,
                          key_padding_mask=key_padding_mask, device=q.device)
    empty = ~keep.any(dim=-1, keepdim=True)  # rows that see no key
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~keep, 0.0)  # empty rows -> all zeros
    out = torch.einsum("bhqk,bhkd->bhqd", probs.to(v.dtype), v)
    return out.masked_fill(empty, 0.0)  # exactly 0, even where a NaN in v met a zero probability
