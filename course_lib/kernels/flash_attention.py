"""FlashAttention-2 in Triton: softmax(Q K^T * scale + mask) V without the (Lq, Lk) score matrix.

Forward: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning"), Algorithm 1. One program owns BLOCK_M query rows and
walks over the keys BLOCK_N at a time, keeping the online-softmax state of every row
(m_i the running max, l_i the running sum of exponentials, acc the unnormalised output)
in registers; it divides by l_i once at the end and saves L = m + log l (the logsumexp)
for the backward pass. Scores never reach main memory.

Backward: Algorithm 2, split into two kernels so that no atomics are needed: one program per
key block accumulates dK and dV over all query blocks, one program per query block
accumulates dQ over all key blocks. Both rebuild P = exp(S - L) from the saved logsumexp.
D_i = rowsum(dO_i * O_i) (the `delta` below) comes from a small preprocessing kernel.

Beyond the paper's kernel (lesson 10 walks through each piece):
- cross attention, Lq != Lk; `causal` is aligned at the end: query i sees keys j <= i + Lk - Lq;
- an optional key padding mask (B, Lk), True = a real key; a row that sees no key returns 0;
- any head dimension up to 256 (40, 80, 160 of Stable Diffusion 1.x included): the feature
  axis is padded to a power of two with masked loads (padded lanes read 0 and are never stored);
- any strides: each 4-D tensor comes with its (batch, head, position, feature) strides;
- fp32 / fp16 / bf16 inputs; dot products accumulate in fp32, softmax state is fp32.

`flash_attention(q, k, v)` runs on CUDA tensors, or on CPU tensors in Triton's interpreter
when TRITON_INTERPRET=1 was set before triton was imported (how the tests and the lesson
run it without a GPU: slowly, and only to check the numbers).
Used by `course_lib.nn.attention.attention(backend="triton")` and lesson 10.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e)), and exp2 is the fast instruction

# Block sizes for Triton's interpreter (CPU). Small blocks keep many blocks in a short test
# sequence; the tests change these to try other tilings. On a GPU the autotuner picks.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32


# ----------------------------------------------------------------------------------------------
# Small device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """a @ b with fp32 accumulation.

    INTERPRET_BF16 is set only for bf16 in Triton's interpreter, whose tl.dot (Triton 3.8)
    multiplies the raw uint16 bit patterns of bf16; widening to fp32 first changes no number,
    because the product of two bf16 values is exact in fp32, as in a tensor core.
    """
    if INTERPRET_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype, INTERPRET_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does.

    Triton's interpreter (3.8) truncates fp32 -> bf16, a bias of half a bf16 ulp on average that
    sums up over long rows; there we round by hand on the bits (add 0x7FFF plus the lowest kept bit).
    """
    if INTERPRET_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_tile(base, offs_l, offs_d, stride_l, stride_d, L, head_dim):
    """A (len(offs_l), len(offs_d)) tile of one (L, head_dim) matrix; rows >= L and lanes >= head_dim read 0."""
    ptrs = base + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=(offs_l[:, None] < L) & (offs_d[None, :] < head_dim), other=0.0)


@triton.jit
def _store_tile(base, x, offs_l, offs_d, stride_l, stride_d, L, head_dim, INTERPRET_BF16: tl.constexpr):
    """Store a tile into one (L, head_dim) matrix, leaving padded rows and lanes out."""
    ptrs = base + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d
    mask = (offs_l[:, None] < L) & (offs_d[None, :] < head_dim)
    tl.store(ptrs, _cast(x, base.dtype.element_ty, INTERPRET_BF16), mask=mask)


@triton.jit
def _keep(offs_m, offs_n, kpm, Lk, causal_offset, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: may query offs_m[i] see key offs_n[j]?

    Keys past Lk are padding of the last block. Causal, aligned at the end:
    j <= i + causal_offset with causal_offset = Lk - Lq. kpm: (BLOCK_N,) int8, 1 = real key.
    """
    keep = (offs_m[:, None] >= 0) & (offs_n[None, :] < Lk)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    if HAS_KPM:
        keep = keep & (kpm[None, :] != 0)
    return keep


# ----------------------------------------------------------------------------------------------
# Forward: FlashAttention-2, Algorithm 1
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, offs_m, lo, hi,
                    stride_kl, stride_kd, stride_vl, stride_vd, stride_kpm_l,
                    Lk, head_dim, head_dim_v, qk_scale, causal_offset,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Keys [lo, hi), BLOCK_N at a time: Algorithm 1's inner loop, the online-softmax update.

    Scores are kept in log2 units (qk_scale = scale * log2 e), so every exp is an exp2.
    MASK=False is the fast path for key blocks that every row of this block may see.
    """
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base, offs_n, offs_d, stride_kl, stride_kd, Lk, head_dim)   # (BLOCK_N, BLOCK_D)
        v = _load_tile(V_base, offs_n, offs_dv, stride_vl, stride_vd, Lk, head_dim_v)  # (BLOCK_N, BLOCK_DV)
        s = _dot(q, tl.trans(k), PRECISION, INTERPRET_BF16) * qk_scale                # (BLOCK_M, BLOCK_N)
        if MASK:
            kpm = offs_n
            if HAS_KPM:
                kpm = tl.load(KPM_base + offs_n * stride_kpm_l, mask=offs_n < Lk, other=0)
            s = tl.where(_keep(offs_m, offs_n, kpm, Lk, causal_offset, CAUSAL, HAS_KPM), s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))                   # (BLOCK_M,) new running max
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)    # a row with no key yet: avoid -inf - -inf
        p = tl.math.exp2(s - m_safe[:, None])                  # (BLOCK_M, BLOCK_N) P~ of the paper
        alpha = tl.math.exp2(m_i - m_safe)                     # rescales what was summed so far
        l_i = l_i * alpha + tl.sum(p, 1)
        p = _cast(p, v.dtype, INTERPRET_BF16)                  # P~ in the input dtype for the tensor cores
        acc = acc * alpha[:, None] + _dot(p, v, PRECISION, INTERPRET_BF16)  # (BLOCK_M, BLOCK_DV)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KPM,
              # strides of the 4-D tensors in elements: batch, head, position, feature
              stride_qb, stride_qh, stride_ql, stride_qd,
              stride_kb, stride_kh, stride_kl, stride_kd,
              stride_vb, stride_vh, stride_vl, stride_vd,
              stride_ob, stride_oh, stride_ol, stride_od,
              stride_kpm_b, stride_kpm_l,
              H, Lq, Lk, head_dim, head_dim_v, qk_scale,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Program (m, b*H + h) computes O[b, h, m*BLOCK_M : (m+1)*BLOCK_M] and its logsumexp.

    Q (B, H, Lq, D), K (B, H, Lk, D), V (B, H, Lk, Dv) -> O (B, H, Lq, Dv) and LSE (B, H, Lq) fp32
    in log2 units, +inf for rows that see no key. KPM (B, Lk) int8 when HAS_KPM.
    head_dim = D and head_dim_v = Dv are the true sizes; BLOCK_D, BLOCK_DV their padded widths.
    """
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)  # int64: batch * stride can pass 2^31 at full scale
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    Q_base = Q + off_b * stride_qb + off_h * stride_qh
    K_base = K + off_b * stride_kb + off_h * stride_kh
    V_base = V + off_b * stride_vb + off_h * stride_vh
    KPM_base = KPM + off_b * stride_kpm_b

    # Algorithm 1: load the query block once, start the running state m_i = -inf, l_i = 0, acc = 0.
    q = _load_tile(Q_base, offs_m, offs_d, stride_ql, stride_qd, Lq, head_dim)  # (BLOCK_M, BLOCK_D)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Which key blocks need a mask? Keys [0, n_full) are seen by every row of this block;
    # keys [n_full, hi) hold the causal diagonal, the ragged end of Lk, or padded keys.
    causal_offset = Lk - Lq
    hi = Lk
    n_full = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + causal_offset)  # last key any row sees, + 1
        first_row_sees = tl.maximum(start_m * BLOCK_M + causal_offset + 1, 0)
        n_full = tl.minimum(n_full, (first_row_sees // BLOCK_N) * BLOCK_N)
    if HAS_KPM:
        n_full = 0
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, offs_m, 0, n_full,
                                    stride_kl, stride_kd, stride_vl, stride_vd, stride_kpm_l,
                                    Lk, head_dim, head_dim_v, qk_scale, causal_offset,
                                    False, CAUSAL, HAS_KPM, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, INTERPRET_BF16)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, offs_m, n_full, hi,
                                    stride_kl, stride_kd, stride_vl, stride_vd, stride_kpm_l,
                                    Lk, head_dim, head_dim_v, qk_scale, causal_offset,
                                    True, CAUSAL, HAS_KPM, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, INTERPRET_BF16)

    # Algorithm 1, after the loop: normalise once, O = acc / l_i, and keep L = m_i + log l_i for the backward.
    empty = l_i == 0.0                                    # rows that saw no key: output 0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # +inf makes P = exp2(S - L) = 0
    O_base = O + off_b * stride_ob + off_h * stride_oh
    _store_tile(O_base, o, offs_m, offs_dv, stride_ol, stride_od, Lq, head_dim_v, INTERPRET_BF16)
    tl.store(LSE + off_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


# ----------------------------------------------------------------------------------------------
# Backward: FlashAttention-2, Algorithm 2
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_ob, stride_oh, stride_ol, stride_od,
                         stride_dob, stride_doh, stride_dol, stride_dod,
                         H, Lq, head_dim_v,
                         BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i), the D of Algorithm 2: (B, H, Lq) fp32."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    O_base = O + off_b * stride_ob + off_h * stride_oh
    DO_base = DO + off_b * stride_dob + off_h * stride_doh
    o = _load_tile(O_base, offs_m, offs_dv, stride_ol, stride_od, Lq, head_dim_v)     # (BLOCK_M, BLOCK_DV)
    do = _load_tile(DO_base, offs_m, offs_dv, stride_dol, stride_dod, Lq, head_dim_v)  # (BLOCK_M, BLOCK_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(DELTA + off_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, KPM, DK, DV,
                   stride_qb, stride_qh, stride_ql, stride_qd,
                   stride_kb, stride_kh, stride_kl, stride_kd,
                   stride_vb, stride_vh, stride_vl, stride_vd,
                   stride_dob, stride_doh, stride_dol, stride_dod,
                   stride_dkb, stride_dkh, stride_dkl, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvl, stride_dvd,
                   stride_kpm_b, stride_kpm_l,
                   H, Lq, Lk, head_dim, head_dim_v, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Program (n, b*H + h) computes dK, dV for keys [n*BLOCK_N, (n+1)*BLOCK_N) (Algorithm 2's outer loop).

    The scores are rebuilt transposed, S^T = K Q^T (BLOCK_N, BLOCK_M), so that
    dV += P^T dO and dK += dS^T Q need no transpose of the big operand.
    """
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    Q_base = Q + off_b * stride_qb + off_h * stride_qh
    DO_base = DO + off_b * stride_dob + off_h * stride_doh
    LSE_base = LSE + off_bh.to(tl.int64) * Lq
    DELTA_base = DELTA + off_bh.to(tl.int64) * Lq

    k = _load_tile(K + off_b * stride_kb + off_h * stride_kh, offs_n, offs_d, stride_kl, stride_kd, Lk, head_dim)
    v = _load_tile(V + off_b * stride_vb + off_h * stride_vh, offs_n, offs_dv, stride_vl, stride_vd, Lk, head_dim_v)
    kpm = offs_n
    if HAS_KPM:
        kpm = tl.load(KPM + off_b * stride_kpm_b + offs_n * stride_kpm_l, mask=offs_n < Lk, other=0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    causal_offset = Lk - Lq
    lo = 0
    if CAUSAL:  # queries i < start_n - causal_offset see none of these keys
        lo = (tl.maximum(start_n * BLOCK_N - causal_offset, 0) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q_base, offs_m, offs_d, stride_ql, stride_qd, Lq, head_dim)        # (BLOCK_M, BLOCK_D)
        do = _load_tile(DO_base, offs_m, offs_dv, stride_dol, stride_dod, Lq, head_dim_v)  # (BLOCK_M, BLOCK_DV)
        lse = tl.load(LSE_base + offs_m, mask=offs_m < Lq, other=float("inf"))    # (BLOCK_M,)
        delta = tl.load(DELTA_base + offs_m, mask=offs_m < Lq, other=0.0)        # (BLOCK_M,)
        s_t = _dot(k, tl.trans(q), PRECISION, INTERPRET_BF16) * qk_scale                  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])                                     # P^T = exp(S^T - L)
        keep_t = tl.trans(_keep(offs_m, offs_n, kpm, Lk, causal_offset, CAUSAL, HAS_KPM))
        p_t = tl.where(keep_t, p_t, 0.0)
        dv += _dot(_cast(p_t, do.dtype, INTERPRET_BF16), do, PRECISION, INTERPRET_BF16)   # dV += P^T dO
        dp_t = _dot(v, tl.trans(do), PRECISION, INTERPRET_BF16)                    # dP^T = V dO^T
        ds_t = p_t * (dp_t - delta[None, :])                                       # dS = P o (dP - D)
        dk += _dot(_cast(ds_t, q.dtype, INTERPRET_BF16), q, PRECISION, INTERPRET_BF16)    # dK += dS^T Q
    dk = dk * sm_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
    DK_base = DK + off_b * stride_dkb + off_h * stride_dkh
    DV_base = DV + off_b * stride_dvb + off_h * stride_dvh
    _store_tile(DK_base, dk, offs_n, offs_d, stride_dkl, stride_dkd, Lk, head_dim, INTERPRET_BF16)
    _store_tile(DV_base, dv, offs_n, offs_dv, stride_dvl, stride_dvd, Lk, head_dim_v, INTERPRET_BF16)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, KPM, DQ,
                 stride_qb, stride_qh, stride_ql, stride_qd,
                 stride_kb, stride_kh, stride_kl, stride_kd,
                 stride_vb, stride_vh, stride_vl, stride_vd,
                 stride_dob, stride_doh, stride_dol, stride_dod,
                 stride_dqb, stride_dqh, stride_dql, stride_dqd,
                 stride_kpm_b, stride_kpm_l,
                 H, Lq, Lk, head_dim, head_dim_v, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Program (m, b*H + h) computes dQ for queries [m*BLOCK_M, (m+1)*BLOCK_M).

    Algorithm 2 adds dS K into dQ from every key block's program (atomics, or a lock); here one
    program owns a query block and walks over the keys, rebuilding P and dP a second time instead.
    """
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    Q_base = Q + off_b * stride_qb + off_h * stride_qh
    K_base = K + off_b * stride_kb + off_h * stride_kh
    V_base = V + off_b * stride_vb + off_h * stride_vh
    DO_base = DO + off_b * stride_dob + off_h * stride_doh
    KPM_base = KPM + off_b * stride_kpm_b

    q = _load_tile(Q_base, offs_m, offs_d, stride_ql, stride_qd, Lq, head_dim)          # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO_base, offs_m, offs_dv, stride_dol, stride_dod, Lq, head_dim_v)  # (BLOCK_M, BLOCK_DV)
    lse = tl.load(LSE + off_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_offset = Lk - Lq
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + causal_offset)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base, offs_n, offs_d, stride_kl, stride_kd, Lk, head_dim)     # (BLOCK_N, BLOCK_D)
        v = _load_tile(V_base, offs_n, offs_dv, stride_vl, stride_vd, Lk, head_dim_v)  # (BLOCK_N, BLOCK_DV)
        kpm = offs_n
        if HAS_KPM:
            kpm = tl.load(KPM_base + offs_n * stride_kpm_l, mask=offs_n < Lk, other=0)
        s = _dot(q, tl.trans(k), PRECISION, INTERPRET_BF16) * qk_scale                # (BLOCK_M, BLOCK_N)
        p = tl.where(_keep(offs_m, offs_n, kpm, Lk, causal_offset, CAUSAL, HAS_KPM),
                     tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION, INTERPRET_BF16)                          # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k.dtype, INTERPRET_BF16), k, PRECISION, INTERPRET_BF16)
    dq = dq * sm_scale
    DQ_base = DQ + off_b * stride_dqb + off_h * stride_dqh
    _store_tile(DQ_base, dq, offs_m, offs_d, stride_dql, stride_dqd, Lq, head_dim, INTERPRET_BF16)


# ----------------------------------------------------------------------------------------------
# Launch configurations: fixed small blocks in the interpreter, autotuned on a GPU
# ----------------------------------------------------------------------------------------------

def is_interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_attn_fwd, triton.runtime.JITFunction)


_GPU_CONFIGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages); the autotuner drops what does not fit
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
    (64, 32, 4, 2), (32, 32, 4, 1),
]


def _prune(configs, named_args, **kwargs):
    """Keep configs whose K and V tiles (times the pipeline stages) plausibly fit in shared memory."""
    elem = named_args["Q"].element_size()
    width = kwargs["BLOCK_D"] + kwargs["BLOCK_DV"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] * width * elem * c.num_stages + c.kwargs["BLOCK_M"] * width * elem <= 160 * 1024]
    return kept or configs[-1:]


_tuned = {}


def _launcher(kernel):
    """`kernel` itself with interpreter blocks, or an autotuned copy of it on a GPU."""
    if is_interpreted():
        return kernel, dict(BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N)
    if kernel not in _tuned:
        configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                   for bm, bn, w, s in _GPU_CONFIGS]
        _tuned[kernel] = triton.autotune(configs, key=["Lq", "Lk", "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_KPM"],
                                         prune_configs_by={"early_config_prune": _prune})(kernel)
    return _tuned[kernel], {}


def _alloc(shape, dtype, device, like=None):
    """A new uninitialised tensor; with `like`, its dimensions laid out in `like`'s stride order.

    So a (B, L, H, D) tensor viewed as (B, H, L, D) gets gradients in the same memory order.
    Every output of this module is allocated here (the tests fill it with NaN).
    """
    if like is None:
        return torch.empty(shape, dtype=dtype, device=device)
    order = sorted(range(len(shape)), key=lambda i: -like.stride(i))  # outermost first
    x = torch.empty([shape[i] for i in order], dtype=dtype, device=device)
    return x.permute([order.index(i) for i in range(len(shape))])


def _block_dim(d):
    """Feature axis padded to a power of two (tl.arange needs one), at least 16 (tl.dot needs it)."""
    return max(16, triton.next_power_of_2(d))


def _precision(precision, dtype):
    if dtype != torch.float32:
        return "ieee"  # unused: fp16 and bf16 products are exact in the fp32 accumulator
    if precision is None:
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"fp32_precision must be 'ieee', 'tf32' or None, got {precision!r}")
    return precision


def _strides(x):
    return tuple(x.stride())


def _check_inputs(q, k, v, key_padding_mask):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"flash_attention expects {name} shaped (B, H, L, D), got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"flash_attention supports float32, float16 and bfloat16, got {name}.dtype={x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "need q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv)")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dimensions up to {MAX_HEAD_DIM} are supported, got D={q.shape[-1]}, Dv={v.shape[-1]}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, Lk) = {(k.shape[0], k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")
    if min(q.shape + k.shape[2:3] + v.shape[3:]) == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "the kernel needs at least one query, one key and one feature")
    if q.device.type != "cuda" and not is_interpreted():
        raise RuntimeError("the Triton kernel needs CUDA tensors; to run it on the CPU in Triton's interpreter, "
                           "set TRITON_INTERPRET=1 before triton is first imported")


# ----------------------------------------------------------------------------------------------
# Host side: launch the kernels
# ----------------------------------------------------------------------------------------------

def _forward(q, k, v, causal, kpm, scale, precision):
    """O (B, H, Lq, Dv) in q's dtype and memory order, and LSE (B, H, Lq) fp32 in log2 units."""
    B, H, Lq, D = q.shape
    Lk, DV = k.shape[2], v.shape[3]
    o = _alloc((B, H, Lq, DV), q.dtype, q.device, like=q)
    lse = _alloc((B, H, Lq), torch.float32, q.device)
    kernel, blocks = _launcher(_attn_fwd)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    kpm_arg, kpm_strides = (kpm, _strides(kpm)) if kpm is not None else (lse, (0, 0))  # unused pointer
    kernel[grid](q, k, v, o, lse, kpm_arg,
                 *_strides(q), *_strides(k), *_strides(v), *_strides(o), *kpm_strides,
                 H, Lq, Lk, D, DV, scale * LOG2E,
                 CAUSAL=causal, HAS_KPM=kpm is not None,
                 BLOCK_D=_block_dim(D), BLOCK_DV=_block_dim(DV),
                 PRECISION=precision, INTERPRET_BF16=is_interpreted() and q.dtype == torch.bfloat16, **blocks)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, kpm, scale, precision):
    """dQ, dK, dV in the dtypes and memory orders of q, k, v."""
    B, H, Lq, D = q.shape
    Lk, DV = k.shape[2], v.shape[3]
    interpret_bf16 = is_interpreted() and q.dtype == torch.bfloat16
    delta = _alloc((B, H, Lq), torch.float32, q.device)
    pre_block = INTERPRET_BLOCK_M if is_interpreted() else 64
    _attn_bwd_preprocess[(triton.cdiv(Lq, pre_block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, Lq, DV, BLOCK_M=pre_block, BLOCK_DV=_block_dim(DV))

    dq = _alloc(q.shape, q.dtype, q.device, like=q)
    dk = _alloc(k.shape, k.dtype, k.device, like=k)
    dv = _alloc(v.shape, v.dtype, v.device, like=v)
    kpm_arg, kpm_strides = (kpm, _strides(kpm)) if kpm is not None else (delta, (0, 0))
    common = dict(CAUSAL=causal, HAS_KPM=kpm is not None, BLOCK_D=_block_dim(D), BLOCK_DV=_block_dim(DV),
                  PRECISION=precision, INTERPRET_BF16=interpret_bf16)
    sizes = (H, Lq, Lk, D, DV, scale * LOG2E, scale)

    kernel, blocks = _launcher(_attn_bwd_dkdv)
    grid = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, do, lse, delta, kpm_arg, dk, dv,
                 *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                 *kpm_strides, *sizes, **common, **blocks)

    kernel, blocks = _launcher(_attn_bwd_dq)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, do, lse, delta, kpm_arg, dq,
                 *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                 *kpm_strides, *sizes, **common, **blocks)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """The thin autograd wrapper: forward saves O and the logsumexp, backward recomputes P from them."""

    @staticmethod
    def forward(ctx, q, k, v, causal, key_padding_mask, scale, precision):
        kpm = None if key_padding_mask is None else key_padding_mask.to(device=q.device, dtype=torch.int8)
        o, lse = _forward(q, k, v, causal, kpm, scale, precision)
        ctx.save_for_backward(q, k, v, o, lse, kpm)
        ctx.causal, ctx.scale, ctx.precision = causal, scale, precision
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, kpm = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, kpm, ctx.scale, ctx.precision)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, fp32_precision=None):
    """softmax(q k^T * scale + mask) v with the Triton FlashAttention-2 kernel; differentiable in q, k, v.

    q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv), any strides; D, Dv <= 256.
    causal: query i sees keys j <= i + Lk - Lq. key_padding_mask: bool (B, Lk), True = real key.
    scale: 1 / sqrt(D) when None. Rows that see no key return 0 (and get zero gradients).
    fp32_precision: for float32 inputs, "ieee" (exact fp32 products) or "tf32" (tensor cores);
        None follows torch.get_float32_matmul_precision() ("highest" -> "ieee").
    Returns (B, H, Lq, Dv) in q's dtype, laid out in memory like q.
    """
    _check_inputs(q, k, v, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    precision = _precision(fp32_precision, q.dtype)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), key_padding_mask, scale, precision)
