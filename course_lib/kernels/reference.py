"""The plain PyTorch specification of attention: softmax(Q K^T * scale + mask) V.

Every fast path (torch SDPA, the Triton kernel in `flash_attention.py`) is tested
against this function. It materialises the full (Lq, Lk) score matrix, so it reads
and writes O(L^2) memory; lesson 10 explains why that is the cost a fused kernel
removes. Works in any dtype, float64 included, on any device.
"""
from __future__ import annotations

import math

import torch


def attention_mask(lq, lk, *, causal=False, key_padding_mask=None, device=None):
    """The bool matrix of which key each query may see: (1, 1, Lq, Lk), or (B, 1, Lq, Lk) with padding.

    causal: query i sees keys j <= i + (Lk - Lq) (aligned at the end, as when a
        query block is appended to a cache of keys); with Lq > Lk the first
        Lq - Lk queries see no key at all.
    key_padding_mask: bool (B, Lk), True where the key is real, False where padding.
    """
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril(diagonal=lk - lq)
    keep = keep[None, None]  # (1, 1, Lq, Lk)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    return keep


def attention_reference(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    """Attention as written in "Attention Is All You Need", eq. (1).

    q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv) -> (B, H, Lq, Dv).
    causal: query i sees keys j <= i + (Lk - Lq) (aligned at the end, as when a
        query block is appended to a cache of keys).
    key_padding_mask: bool (B, Lk), True where the key is real, False where padding.
    scale: multiplies Q K^T; 1 / sqrt(D) when None.
    Rows whose keys are all masked return zeros (instead of NaN), and their
    gradients are zeros too: no NaN is ever created, not even in the backward pass.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale  # (B, H, Lq, Lk): the O(L^2) tensor
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # softmax in fp32, as every fused kernel does
    keep = attention_mask(q.shape[2], k.shape[2], causal=causal,
                          key_padding_mask=key_padding_mask, device=q.device)
    empty = ~keep.any(dim=-1, keepdim=True)  # rows that see no key
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~keep, 0.0)  # empty rows -> all zeros
    return torch.einsum("bhqk,bhkd->bhqd", probs.to(v.dtype), v)
