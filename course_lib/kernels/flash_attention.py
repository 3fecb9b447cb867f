"""FlashAttention-2 in Triton: softmax(Q K^T * scale + mask) V without the (Lq, Lk) score matrix.

Forward: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning"), Algorithm 1. One program owns BLOCK_M query rows and
walks over the keys BLOCK_N at a time, keeping the online-softmax state of every row
(m_i the running max, l_i the running sum of exponentials, acc the unnormalised output)
in registers; it divides by l_i once at the end and saves L = m + log l (the logsumexp)
for the backward pass. Scores never reach main memory.

Backward: Algorithm 2, by default split into two kernels so that no atomics are needed: one
program per key block accumulates dK and dV over all query blocks, one program per query block
accumulates dQ over all key blocks. Both rebuild P = exp(S - L) from the saved logsumexp.
D_i = rowsum(dO_i * O_i) (the `delta` below) comes from a small preprocessing kernel.
`deterministic=False` runs Algorithm 2 as written instead: the dK/dV program also adds its
dS K into an fp32 dQ with atomics (5 matrix products and 1 exp per score instead of 7 and 2),
faster, but the order of the additions, hence the last bits of dQ, changes from run to run.

Beyond the paper's kernel (lesson 10 walks through each piece):
- cross attention, Lq != Lk; `causal` is aligned at the end: query i sees keys j <= i + Lk - Lq;
- an optional key padding mask (B, Lk), True = a real key; a row that sees no key returns 0;
- any head dimension up to 256. The head dimension is a compile-time constant, and the feature
  axis is cut into at most two pieces whose widths are powers of two and multiples of 16 (what
  `tl.arange` and the tensor cores need); each product is the sum of one `tl.dot` per piece.
  Lanes past D read 0 and are never stored. The tensor-core work, as a multiple of the useful work
  (`head_dim_pieces`, `head_dim_waste`):
      D =  16, 32, 64, 128, 256     one piece            1.00x
      D =  40 -> 32 + 16 = 48                            1.20x
      D =  80 -> 64 + 16                                 1.00x
      D =  96 -> 64 + 32                                 1.00x
      D = 160 -> 128 + 32                                1.00x
      D =  24 -> 32 (1.33x), 100 -> 128 (1.28x), 200 -> 256 (1.28x): the worst cases, never in the course
  (padding to the next power of two, the simple rule, costs 1.6x at 40, 80 and 160.)
- any strides: each 4-D tensor comes with its (batch, head, position, feature) strides. A
  feature stride of 1 is a compile-time constant (Triton specialises 1), and ALIGN, the largest
  power of two up to 16 that divides every other stride, tells the compiler how far apart rows
  start, so that rows of 40 bf16 (80 bytes, a multiple of 16) load as 16-byte vectors and
  asynchronous copies (cp.async) instead of 2-byte scalars;
- fp32 / fp16 / bf16 inputs; dot products accumulate in fp32, softmax state is fp32.

`flash_attention(q, k, v)` runs on CUDA tensors, or on CPU tensors in Triton's interpreter
when TRITON_INTERPRET=1 was set before triton was imported (how the tests and the lesson
run it without a GPU: slowly, and only to check the numbers). What the compiled code looks like
on a Hopper GPU (registers, spills, vector loads, wgmma) is checked without a GPU by
`course_lib.kernels.ptx_report`.
Used by `course_lib.nn.attention.attention(backend="triton")` and lesson 10.
"""
from __future__ import annotations

import functools
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
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """acc + a @ b in fp32.

    INTERPRET_BF16 is set only for bf16 in Triton's interpreter, whose tl.dot (Triton 3.8)
    multiplies the raw uint16 bit patterns of bf16; widening to fp32 first changes no number,
    because the product of two bf16 values is exact in fp32, as in a tensor core.
    """
    if INTERPRET_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


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
def _aligned(stride, ALIGN: tl.constexpr):
    """stride, known to the compiler as a multiple of ALIGN (the host checked that it is one)."""
    return (stride // ALIGN) * ALIGN


@triton.jit
def _load_tile(base, offs_l, stride_l, stride_d, L,
               OFF: tl.constexpr, WIDTH: tl.constexpr, DIM: tl.constexpr, CHECK_L: tl.constexpr):
    """Features [OFF, OFF + WIDTH) of rows offs_l of one (L, DIM) matrix: a (len(offs_l), WIDTH) tile.

    Rows >= L (only checked when CHECK_L) and features >= DIM read 0. Both masks are
    compile-time decisions where they can be: a piece that ends before DIM and rows known to be
    inside L load without a mask, and a feature mask against the constant DIM stays constant
    over runs of lanes, so it does not stop vector loads.
    """
    offs_d = OFF + tl.arange(0, WIDTH)
    ptrs = base + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d
    if OFF + WIDTH > DIM:
        if CHECK_L:
            x = tl.load(ptrs, mask=(offs_l[:, None] < L) & (offs_d[None, :] < DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < DIM, other=0.0)
    else:
        if CHECK_L:
            x = tl.load(ptrs, mask=offs_l[:, None] < L, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(base, x, offs_l, stride_l, stride_d, L,
                OFF: tl.constexpr, WIDTH: tl.constexpr, DIM: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Store a (len(offs_l), WIDTH) tile as features [OFF, OFF + WIDTH) of one (L, DIM) matrix, padding left out."""
    offs_d = OFF + tl.arange(0, WIDTH)
    ptrs = base + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d
    mask = offs_l[:, None] < L
    if OFF + WIDTH > DIM:
        mask = mask & (offs_d[None, :] < DIM)
    tl.store(ptrs, _cast(x, base.dtype.element_ty, INTERPRET_BF16), mask=mask)


@triton.jit
def _keep(offs_m, offs_n, kpm, Lk, causal_offset, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: may query offs_m[i] see key offs_n[j]?

    Keys past Lk are padding of the last block. Causal, aligned at the end:
    j <= i + causal_offset with causal_offset = Lk - Lq. kpm: (BLOCK_N,) int32, 1 = real key.
    """
    keep = (offs_m[:, None] >= 0) & (offs_n[None, :] < Lk)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    if HAS_KPM:
        keep = keep & (kpm[None, :] != 0)
    return keep


@triton.jit
def _padded_keys(PAD_base, start_n, Lk, BLOCK_N: tl.constexpr):
    """How many keys of [start_n, start_n + BLOCK_N) the padding mask hides: two scalar loads.

    PAD_base points at one row of PAD_CUM, the running count of padded keys (PAD_CUM[j] = number
    of False among kpm[:j]), so that a block can tell whether it needs the mask at all.
    """
    return tl.load(PAD_base + tl.minimum(start_n + BLOCK_N, Lk)) - tl.load(PAD_base + start_n)


# ----------------------------------------------------------------------------------------------
# Forward: FlashAttention-2, Algorithm 1
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K_base, V_base, KPM_base, PAD_base, offs_m, lo, hi,
                    stride_kl, stride_kd, stride_vl, stride_vd, stride_kpm_l,
                    Lk, qk_scale, causal_offset,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                    HEAD_DIM_V: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
                    PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Keys [lo, hi), BLOCK_N at a time: Algorithm 1's inner loop, the online-softmax update.

    Scores are kept in log2 units, so every exp is an exp2. MASK=False is the fast path for key
    blocks that every row of this block may see (all inside Lk, before the causal diagonal): the
    running max is taken on the raw scores Q K^T and scaled once per row, so each score costs one
    FMA, s * qk_scale - m, before its exp2 (this needs qk_scale > 0; the caller sends every block
    through the masked path otherwise). With a key padding mask, only the blocks that hold a
    padded key pay for it (one select per score), found from PAD_CUM by two scalar loads.
    MASK=True builds the whole (BLOCK_M, BLOCK_N) mask: causal diagonal, ragged end of Lk, padding.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k0 = _load_tile(K_base, offs_n, stride_kl, stride_kd, Lk, 0, D0, HEAD_DIM, MASK)       # (BLOCK_N, D0)
        s = _dot(q0, tl.trans(k0), tl.zeros([q0.shape[0], BLOCK_N], dtype=tl.float32), PRECISION, INTERPRET_BF16)
        if D1 > 0:  # the second piece of the head dim adds into the same scores
            k1 = _load_tile(K_base, offs_n, stride_kl, stride_kd, Lk, D0, D1, HEAD_DIM, MASK)  # (BLOCK_N, D1)
            s = _dot(q1, tl.trans(k1), s, PRECISION, INTERPRET_BF16)                        # (BLOCK_M, BLOCK_N) = Q K^T
        if MASK:
            kpm = offs_n
            if HAS_KPM:
                kpm = tl.load(KPM_base + offs_n * stride_kpm_l, mask=offs_n < Lk, other=0)
            s = tl.where(_keep(offs_m, offs_n, kpm, Lk, causal_offset, CAUSAL, HAS_KPM), s * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(s, 1))                  # (BLOCK_M,) new running max, log2 units
            m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)   # a row with no key yet: avoid -inf - -inf
            p = tl.math.exp2(s - m_safe[:, None])                 # (BLOCK_M, BLOCK_N) P~ of the paper
        else:
            if HAS_KPM:
                if _padded_keys(PAD_base, start_n, Lk, BLOCK_N) > 0:  # runtime branch: only padded blocks
                    kpm = tl.load(KPM_base + offs_n * stride_kpm_l)
                    s = tl.where(kpm[None, :] != 0, s, float("-inf"))  # raw units: -inf * qk_scale stays -inf
            m_ij = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(s * qk_scale - m_safe[:, None])      # one FMA per score
        alpha = tl.math.exp2(m_i - m_safe)                        # rescales what was summed so far
        l_i = l_i * alpha + tl.sum(p, 1)
        p = _cast(p, q0.dtype, INTERPRET_BF16)                    # P~ in the input dtype for the tensor cores
        v0 = _load_tile(V_base, offs_n, stride_vl, stride_vd, Lk, 0, DV0, HEAD_DIM_V, MASK)     # (BLOCK_N, DV0)
        acc0 = _dot(p, v0, acc0 * alpha[:, None], PRECISION, INTERPRET_BF16)                 # (BLOCK_M, DV0)
        if DV1 > 0:
            v1 = _load_tile(V_base, offs_n, stride_vl, stride_vd, Lk, DV0, DV1, HEAD_DIM_V, MASK)
            acc1 = _dot(p, v1, acc1 * alpha[:, None], PRECISION, INTERPRET_BF16)             # (BLOCK_M, DV1)
        m_i = m_ij
    return acc0, acc1, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KPM, PAD_CUM,
              # strides of the 4-D tensors in elements: batch, head, position, feature
              stride_qb, stride_qh, stride_ql, stride_qd,
              stride_kb, stride_kh, stride_kl, stride_kd,
              stride_vb, stride_vh, stride_vl, stride_vd,
              stride_ob, stride_oh, stride_ol, stride_od,
              stride_kpm_b, stride_kpm_l, stride_pad_b,
              H, Lq, Lk, qk_scale,
              LQ_BUCKET, LK_BUCKET,  # the autotuner's key: lengths rounded up to a power of two (unused here)
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              HEAD_DIM_V: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr, ALIGN: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Program p computes O[b, h, m*BLOCK_M : (m+1)*BLOCK_M] and its logsumexp, p = (b*H + h) * n_m + m.

    Q (B, H, Lq, D), K (B, H, Lk, D), V (B, H, Lk, Dv) -> O (B, H, Lq, Dv) and LSE (B, H, Lq) fp32
    in log2 units, +inf for rows that see no key. KPM (B, Lk) int32 and PAD_CUM (B, Lk + 1) int32
    when HAS_KPM. HEAD_DIM = D = D0 + D1 (minus padding), HEAD_DIM_V = Dv = DV0 + DV1 (idem).
    One grid axis: the query blocks of one head are neighbours (they share K and V in L2), and
    B * H is not limited to the 65535 of a second grid axis.
    """
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    off_bh = pid // n_m
    start_m = pid % n_m
    if CAUSAL:
        start_m = n_m - 1 - start_m  # the longest rows first
    off_b = (off_bh // H).to(tl.int64)  # int64: batch * stride can pass 2^31 at full scale
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    Q_base = Q + off_b * _aligned(stride_qb, ALIGN) + off_h * _aligned(stride_qh, ALIGN)
    K_base = K + off_b * _aligned(stride_kb, ALIGN) + off_h * _aligned(stride_kh, ALIGN)
    V_base = V + off_b * _aligned(stride_vb, ALIGN) + off_h * _aligned(stride_vh, ALIGN)
    stride_ql = _aligned(stride_ql, ALIGN)
    stride_kl = _aligned(stride_kl, ALIGN)
    stride_vl = _aligned(stride_vl, ALIGN)
    KPM_base = KPM + off_b * stride_kpm_b
    PAD_base = PAD_CUM + off_b * stride_pad_b

    # Algorithm 1: load the query block once, start the running state m_i = -inf, l_i = 0, acc = 0.
    q0 = _load_tile(Q_base, offs_m, stride_ql, stride_qd, Lq, 0, D0, HEAD_DIM, True)  # (BLOCK_M, D0)
    q1 = q0
    if D1 > 0:
        q1 = _load_tile(Q_base, offs_m, stride_ql, stride_qd, Lq, D0, D1, HEAD_DIM, True)  # (BLOCK_M, D1)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, DV0], dtype=tl.float32)
    acc1 = acc0
    if DV1 > 0:
        acc1 = tl.zeros([BLOCK_M, DV1], dtype=tl.float32)

    # Which key blocks need a mask? Keys [0, n_full) are seen by every row of this block;
    # keys [n_full, hi) hold the causal diagonal or the ragged end of Lk.
    causal_offset = Lk - Lq
    hi = Lk
    n_full = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + causal_offset)  # last key any row sees, + 1
        first_row_sees = tl.maximum(start_m * BLOCK_M + causal_offset + 1, 0)
        n_full = tl.minimum(n_full, (first_row_sees // BLOCK_N) * BLOCK_N)
    if qk_scale <= 0:
        n_full = 0  # the fast path's max of raw scores needs a positive scale
    acc0, acc1, l_i, m_i = _attn_fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, K_base, V_base, KPM_base, PAD_base, offs_m, 0, n_full,
        stride_kl, stride_kd, stride_vl, stride_vd, stride_kpm_l, Lk, qk_scale, causal_offset,
        False, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, D0, D1, HEAD_DIM_V, DV0, DV1, PRECISION, INTERPRET_BF16)
    acc0, acc1, l_i, m_i = _attn_fwd_inner(
        acc0, acc1, l_i, m_i, q0, q1, K_base, V_base, KPM_base, PAD_base, offs_m, n_full, hi,
        stride_kl, stride_kd, stride_vl, stride_vd, stride_kpm_l, Lk, qk_scale, causal_offset,
        True, CAUSAL, HAS_KPM, BLOCK_N, HEAD_DIM, D0, D1, HEAD_DIM_V, DV0, DV1, PRECISION, INTERPRET_BF16)

    # Algorithm 1, after the loop: normalise once, O = acc / l_i, and keep L = m_i + log l_i for the backward.
    empty = l_i == 0.0                                    # rows that saw no key: output exactly 0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # +inf makes P = exp2(S - L) = 0
    O_base = O + off_b * stride_ob + off_h * stride_oh
    o0 = tl.where(empty[:, None], 0.0, acc0 / l_safe[:, None])
    _store_tile(O_base, o0, offs_m, stride_ol, stride_od, Lq, 0, DV0, HEAD_DIM_V, INTERPRET_BF16)
    if DV1 > 0:
        o1 = tl.where(empty[:, None], 0.0, acc1 / l_safe[:, None])
        _store_tile(O_base, o1, offs_m, stride_ol, stride_od, Lq, DV0, DV1, HEAD_DIM_V, INTERPRET_BF16)
    tl.store(LSE + off_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


# ----------------------------------------------------------------------------------------------
# Backward: FlashAttention-2, Algorithm 2
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_ob, stride_oh, stride_ol, stride_od,
                         stride_dob, stride_doh, stride_dol, stride_dod,
                         H, Lq,
                         HEAD_DIM_V: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i), the D of Algorithm 2: (B, H, Lq) fp32."""
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    off_bh = pid // n_m
    start_m = pid % n_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    O_base = O + off_b * stride_ob + off_h * stride_oh
    DO_base = DO + off_b * stride_dob + off_h * stride_doh
    o = _load_tile(O_base, offs_m, stride_ol, stride_od, Lq, 0, DV0, HEAD_DIM_V, True)      # (BLOCK_M, DV0)
    do = _load_tile(DO_base, offs_m, stride_dol, stride_dod, Lq, 0, DV0, HEAD_DIM_V, True)  # (BLOCK_M, DV0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    if DV1 > 0:
        o = _load_tile(O_base, offs_m, stride_ol, stride_od, Lq, DV0, DV1, HEAD_DIM_V, True)
        do = _load_tile(DO_base, offs_m, stride_dol, stride_dod, Lq, DV0, DV1, HEAD_DIM_V, True)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + off_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_step(dk0, dk1, dv0, dv1, k0, k1, v0, v1, kpm, Q_base, DO_base, LSE_base, DELTA_base,
                   DQ_base, offs_n, start_m, stride_ql, stride_qd, stride_dol, stride_dod,
                   stride_dqal, Lq, Lk, qk_scale, sm_scale, causal_offset,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                   BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   HEAD_DIM_V: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr,
                   PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """One query block's contribution to this key block's dK, dV (and, with ATOMIC_DQ, to dQ).

    The scores are rebuilt transposed, S^T = K Q^T (BLOCK_N, BLOCK_M), so that dV += P^T dO and
    dK += dS^T Q need no transpose of the big operand. No mask is needed away from the causal
    diagonal: query rows past Lq load as 0 with L = +inf, so their P is exactly 0; keys past Lk
    and padded keys only touch their own rows of dK and dV, which are zeroed or never stored.
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q0 = _load_tile(Q_base, offs_m, stride_ql, stride_qd, Lq, 0, D0, HEAD_DIM, True)      # (BLOCK_M, D0)
    lse = tl.load(LSE_base + offs_m, mask=offs_m < Lq, other=float("inf"))           # (BLOCK_M,)
    s_t = _dot(k0, tl.trans(q0), tl.zeros([k0.shape[0], BLOCK_M], dtype=tl.float32), PRECISION, INTERPRET_BF16)
    if D1 > 0:
        q1 = _load_tile(Q_base, offs_m, stride_ql, stride_qd, Lq, D0, D1, HEAD_DIM, True)
        s_t = _dot(k1, tl.trans(q1), s_t, PRECISION, INTERPRET_BF16)                  # (BLOCK_N, BLOCK_M)
    p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])                                 # P^T = exp(S^T - L): one FMA
    if MASK:
        keep_t = tl.trans(_keep(offs_m, offs_n, kpm, Lk, causal_offset, CAUSAL, HAS_KPM))
        p_t = tl.where(keep_t, p_t, 0.0)
    elif ATOMIC_DQ:  # dQ sums over keys: padded keys and keys past Lk must give exactly 0 there
        keep_n = offs_n < Lk
        if HAS_KPM:
            keep_n = keep_n & (kpm != 0)
        p_t = tl.where(keep_n[:, None], p_t, 0.0)
    do0 = _load_tile(DO_base, offs_m, stride_dol, stride_dod, Lq, 0, DV0, HEAD_DIM_V, True)  # (BLOCK_M, DV0)
    delta = tl.load(DELTA_base + offs_m, mask=offs_m < Lq, other=0.0)                 # (BLOCK_M,)
    p_lo = _cast(p_t, do0.dtype, INTERPRET_BF16)
    dv0 = _dot(p_lo, do0, dv0, PRECISION, INTERPRET_BF16)                               # dV += P^T dO
    dp_t = _dot(v0, tl.trans(do0), tl.zeros([k0.shape[0], BLOCK_M], dtype=tl.float32), PRECISION, INTERPRET_BF16)
    if DV1 > 0:
        do1 = _load_tile(DO_base, offs_m, stride_dol, stride_dod, Lq, DV0, DV1, HEAD_DIM_V, True)
        dv1 = _dot(p_lo, do1, dv1, PRECISION, INTERPRET_BF16)
        dp_t = _dot(v1, tl.trans(do1), dp_t, PRECISION, INTERPRET_BF16)             # dP^T = V dO^T
    ds_t = _cast(p_t * (dp_t - delta[None, :]), q0.dtype, INTERPRET_BF16)             # dS = P o (dP - D)
    dk0 = _dot(ds_t, q0, dk0, PRECISION, INTERPRET_BF16)                                # dK += dS^T Q
    if D1 > 0:
        dk1 = _dot(ds_t, q1, dk1, PRECISION, INTERPRET_BF16)
    if ATOMIC_DQ:  # Algorithm 2, line 21: dQ_i += dS_ij K_j, added by every key block's program
        dq_mask = offs_m[:, None] < Lq
        dq0 = _dot(tl.trans(ds_t), k0, tl.zeros([BLOCK_M, D0], dtype=tl.float32), PRECISION, INTERPRET_BF16)
        tl.atomic_add(DQ_base + offs_m[:, None] * stride_dqal + tl.arange(0, D0)[None, :], dq0 * sm_scale,
                      mask=dq_mask, sem="relaxed")
        if D1 > 0:
            dq1 = _dot(tl.trans(ds_t), k1, tl.zeros([BLOCK_M, D1], dtype=tl.float32), PRECISION, INTERPRET_BF16)
            tl.atomic_add(DQ_base + offs_m[:, None] * stride_dqal + D0 + tl.arange(0, D1)[None, :],
                          dq1 * sm_scale, mask=dq_mask, sem="relaxed")
    return dk0, dk1, dv0, dv1


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, KPM, DK, DV, DQ_ACC,
                   stride_qb, stride_qh, stride_ql, stride_qd,
                   stride_kb, stride_kh, stride_kl, stride_kd,
                   stride_vb, stride_vh, stride_vl, stride_vd,
                   stride_dob, stride_doh, stride_dol, stride_dod,
                   stride_dkb, stride_dkh, stride_dkl, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvl, stride_dvd,
                   stride_kpm_b, stride_kpm_l,
                   H, Lq, Lk, qk_scale, sm_scale,
                   LQ_BUCKET, LK_BUCKET,
                   HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   HEAD_DIM_V: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr, ALIGN: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Program p computes dK, dV for keys [n*BLOCK_N, (n+1)*BLOCK_N), p = (b*H + h) * n_n + n.

    Algorithm 2's outer loop over key blocks; its inner loop over query blocks runs masked only
    on the causal diagonal. With ATOMIC_DQ it also adds dQ into DQ_ACC, (B, H, Lq, D) fp32 contiguous.
    """
    n_n = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0)
    off_bh = pid // n_n
    start_n = (pid % n_n) * BLOCK_N
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    stride_ql = _aligned(stride_ql, ALIGN)
    stride_dol = _aligned(stride_dol, ALIGN)
    Q_base = Q + off_b * _aligned(stride_qb, ALIGN) + off_h * _aligned(stride_qh, ALIGN)
    DO_base = DO + off_b * _aligned(stride_dob, ALIGN) + off_h * _aligned(stride_doh, ALIGN)
    K_base = K + off_b * _aligned(stride_kb, ALIGN) + off_h * _aligned(stride_kh, ALIGN)
    V_base = V + off_b * _aligned(stride_vb, ALIGN) + off_h * _aligned(stride_vh, ALIGN)
    LSE_base = LSE + off_bh.to(tl.int64) * Lq
    DELTA_base = DELTA + off_bh.to(tl.int64) * Lq
    DQ_base = DQ_ACC + off_bh.to(tl.int64) * Lq * HEAD_DIM

    k0 = _load_tile(K_base, offs_n, _aligned(stride_kl, ALIGN), stride_kd, Lk, 0, D0, HEAD_DIM, True)
    v0 = _load_tile(V_base, offs_n, _aligned(stride_vl, ALIGN), stride_vd, Lk, 0, DV0, HEAD_DIM_V, True)
    k1 = k0
    v1 = v0
    if D1 > 0:
        k1 = _load_tile(K_base, offs_n, _aligned(stride_kl, ALIGN), stride_kd, Lk, D0, D1, HEAD_DIM, True)
    if DV1 > 0:
        v1 = _load_tile(V_base, offs_n, _aligned(stride_vl, ALIGN), stride_vd, Lk, DV0, DV1, HEAD_DIM_V, True)
    kpm = offs_n
    if HAS_KPM:
        kpm = tl.load(KPM + off_b * stride_kpm_b + offs_n * stride_kpm_l, mask=offs_n < Lk, other=0)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, DV0], dtype=tl.float32)
    dk1 = dk0
    dv1 = dv0
    if D1 > 0:
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    if DV1 > 0:
        dv1 = tl.zeros([BLOCK_N, DV1], dtype=tl.float32)

    # causal: queries i < start_n - causal_offset see none of these keys; queries from m_full on see all of them
    causal_offset = Lk - Lq
    lo = 0
    m_full = 0
    if CAUSAL:
        lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M, Lq)
        m_full = tl.maximum(m_full, lo)
    for start_m in range(lo, m_full, BLOCK_M):  # the causal diagonal, masked
        dk0, dk1, dv0, dv1 = _bwd_dkdv_step(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, kpm, Q_base, DO_base, LSE_base, DELTA_base, DQ_base,
            offs_n, start_m, stride_ql, stride_qd, stride_dol, stride_dod, HEAD_DIM, Lq, Lk, qk_scale, sm_scale,
            causal_offset, True, CAUSAL, HAS_KPM, ATOMIC_DQ, BLOCK_M, HEAD_DIM, D0, D1, HEAD_DIM_V, DV0, DV1,
            PRECISION, INTERPRET_BF16)
    for start_m in range(m_full, Lq, BLOCK_M):  # every other query block: no mask
        start_m = tl.multiple_of(start_m, BLOCK_M)
        dk0, dk1, dv0, dv1 = _bwd_dkdv_step(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, kpm, Q_base, DO_base, LSE_base, DELTA_base, DQ_base,
            offs_n, start_m, stride_ql, stride_qd, stride_dol, stride_dod, HEAD_DIM, Lq, Lk, qk_scale, sm_scale,
            causal_offset, False, CAUSAL, HAS_KPM, ATOMIC_DQ, BLOCK_M, HEAD_DIM, D0, D1, HEAD_DIM_V, DV0, DV1,
            PRECISION, INTERPRET_BF16)

    if HAS_KPM:  # padded keys get no gradient (their rows above were computed without the mask)
        real = (kpm != 0)[:, None]
        dk0 = tl.where(real, dk0, 0.0)
        dv0 = tl.where(real, dv0, 0.0)
        if D1 > 0:
            dk1 = tl.where(real, dk1, 0.0)
        if DV1 > 0:
            dv1 = tl.where(real, dv1, 0.0)
    DK_base = DK + off_b * stride_dkb + off_h * stride_dkh
    DV_base = DV + off_b * stride_dvb + off_h * stride_dvh
    _store_tile(DK_base, dk0 * sm_scale, offs_n, stride_dkl, stride_dkd, Lk, 0, D0, HEAD_DIM, INTERPRET_BF16)
    _store_tile(DV_base, dv0, offs_n, stride_dvl, stride_dvd, Lk, 0, DV0, HEAD_DIM_V, INTERPRET_BF16)
    if D1 > 0:  # S = scale * Q K^T, so dK = scale * dS^T Q: one multiply per element of dK, at the end
        _store_tile(DK_base, dk1 * sm_scale, offs_n, stride_dkl, stride_dkd, Lk, D0, D1, HEAD_DIM, INTERPRET_BF16)
    if DV1 > 0:
        _store_tile(DV_base, dv1, offs_n, stride_dvl, stride_dvd, Lk, DV0, DV1, HEAD_DIM_V, INTERPRET_BF16)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, KPM, PAD_CUM, DQ,
                 stride_qb, stride_qh, stride_ql, stride_qd,
                 stride_kb, stride_kh, stride_kl, stride_kd,
                 stride_vb, stride_vh, stride_vl, stride_vd,
                 stride_dob, stride_doh, stride_dol, stride_dod,
                 stride_dqb, stride_dqh, stride_dql, stride_dqd,
                 stride_kpm_b, stride_kpm_l, stride_pad_b,
                 H, Lq, Lk, qk_scale, sm_scale,
                 LQ_BUCKET, LK_BUCKET,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                 HEAD_DIM_V: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr, ALIGN: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Program p computes dQ for queries [m*BLOCK_M, (m+1)*BLOCK_M), p = (b*H + h) * n_m + m.

    Algorithm 2 adds dS K into dQ from every key block's program (atomics, or a lock); here one
    program owns a query block and walks over the keys, rebuilding P and dP a second time instead.
    Key blocks before n_full run without a mask (padded ones with one select, as in the forward).
    """
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    off_bh = pid // n_m
    start_m = pid % n_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    stride_kl = _aligned(stride_kl, ALIGN)
    stride_vl = _aligned(stride_vl, ALIGN)
    Q_base = Q + off_b * _aligned(stride_qb, ALIGN) + off_h * _aligned(stride_qh, ALIGN)
    K_base = K + off_b * _aligned(stride_kb, ALIGN) + off_h * _aligned(stride_kh, ALIGN)
    V_base = V + off_b * _aligned(stride_vb, ALIGN) + off_h * _aligned(stride_vh, ALIGN)
    DO_base = DO + off_b * _aligned(stride_dob, ALIGN) + off_h * _aligned(stride_doh, ALIGN)
    KPM_base = KPM + off_b * stride_kpm_b
    PAD_base = PAD_CUM + off_b * stride_pad_b

    q0 = _load_tile(Q_base, offs_m, _aligned(stride_ql, ALIGN), stride_qd, Lq, 0, D0, HEAD_DIM, True)
    do0 = _load_tile(DO_base, offs_m, _aligned(stride_dol, ALIGN), stride_dod, Lq, 0, DV0, HEAD_DIM_V, True)
    q1 = q0
    do1 = do0
    if D1 > 0:
        q1 = _load_tile(Q_base, offs_m, _aligned(stride_ql, ALIGN), stride_qd, Lq, D0, D1, HEAD_DIM, True)
    if DV1 > 0:
        do1 = _load_tile(DO_base, offs_m, _aligned(stride_dol, ALIGN), stride_dod, Lq, DV0, DV1, HEAD_DIM_V, True)
    lse = tl.load(LSE + off_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = dq0
    if D1 > 0:
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)

    causal_offset = Lk - Lq
    hi = Lk
    n_full = (Lk // BLOCK_N) * BLOCK_N  # the last, ragged key block is masked: its p would multiply k = 0
    if CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + causal_offset)
        n_full = tl.minimum(n_full, (tl.maximum(start_m * BLOCK_M + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N)
    n_full = tl.maximum(tl.minimum(n_full, hi), 0)
    for start_n in range(0, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        masked = start_n >= n_full
        k0 = _load_tile(K_base, offs_n, stride_kl, stride_kd, Lk, 0, D0, HEAD_DIM, True)    # (BLOCK_N, D0)
        s = _dot(q0, tl.trans(k0), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, INTERPRET_BF16)
        if D1 > 0:
            k1 = _load_tile(K_base, offs_n, stride_kl, stride_kd, Lk, D0, D1, HEAD_DIM, True)
            s = _dot(q1, tl.trans(k1), s, PRECISION, INTERPRET_BF16)                      # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse[:, None])                                   # one FMA per score
        if masked:  # runtime branch, a select: the causal diagonal and the ragged end of Lk
            kpm = offs_n
            if HAS_KPM:
                kpm = tl.load(KPM_base + offs_n * stride_kpm_l, mask=offs_n < Lk, other=0)
            p = tl.where(_keep(offs_m, offs_n, kpm, Lk, causal_offset, CAUSAL, HAS_KPM), p, 0.0)
        elif HAS_KPM:
            if _padded_keys(PAD_base, start_n, Lk, BLOCK_N) > 0:
                kpm = tl.load(KPM_base + offs_n * stride_kpm_l)
                p = tl.where(kpm[None, :] != 0, p, 0.0)
        v0 = _load_tile(V_base, offs_n, stride_vl, stride_vd, Lk, 0, DV0, HEAD_DIM_V, True)  # (BLOCK_N, DV0)
        dp = _dot(do0, tl.trans(v0), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, INTERPRET_BF16)
        if DV1 > 0:
            v1 = _load_tile(V_base, offs_n, stride_vl, stride_vd, Lk, DV0, DV1, HEAD_DIM_V, True)
            dp = _dot(do1, tl.trans(v1), dp, PRECISION, INTERPRET_BF16)                 # dP = dO V^T
        ds = _cast(p * (dp - delta[:, None]), k0.dtype, INTERPRET_BF16)
        dq0 = _dot(ds, k0, dq0, PRECISION, INTERPRET_BF16)                               # dQ += dS K
        if D1 > 0:
            dq1 = _dot(ds, k1, dq1, PRECISION, INTERPRET_BF16)
    DQ_base = DQ + off_b * stride_dqb + off_h * stride_dqh
    _store_tile(DQ_base, dq0 * sm_scale, offs_m, stride_dql, stride_dqd, Lq, 0, D0, HEAD_DIM, INTERPRET_BF16)
    if D1 > 0:
        _store_tile(DQ_base, dq1 * sm_scale, offs_m, stride_dql, stride_dqd, Lq, D0, D1, HEAD_DIM, INTERPRET_BF16)


# ----------------------------------------------------------------------------------------------
# Tiles of the head dimension
# ----------------------------------------------------------------------------------------------

def head_dim_pieces(d):
    """(P0, P1): the feature axis of width d as one or two tiles, powers of two and multiples of 16.

    d is rounded up to a multiple of 16 (the tensor cores' K step), then split into the largest
    power of two that fits and the power of two that covers the rest (P1 = 0: one piece).
    40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32), 64 -> (64, 0), 24 -> (32, 0).
    """
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dimensions from 1 to {MAX_HEAD_DIM} are supported, got {d}")
    d16 = -(-d // 16) * 16
    p0 = 1 << (d16.bit_length() - 1)  # largest power of two <= d16
    rest = d16 - p0
    if rest == 0:
        return p0, 0
    p1 = triton.next_power_of_2(rest)
    return (2 * p0, 0) if p1 == p0 else (p0, p1)


def head_dim_waste(d):
    """Tensor-core work on the feature axis over useful work: sum(head_dim_pieces(d)) / d."""
    return sum(head_dim_pieces(d)) / d


def _stride_align(*tensors):
    """ALIGN: the largest of 1, 2, 4, 8, 16 dividing every stride but the feature stride of every tensor."""
    g = 16
    for x in tensors:
        for s in x.stride()[:-1]:
            g = math.gcd(g, s)
    return g


def _bucket(n):
    """The autotuner's key for a length: the next power of two, at least 64 (2, 77 and 64 share one)."""
    return max(64, triton.next_power_of_2(n))


# ----------------------------------------------------------------------------------------------
# Launch configurations: fixed small blocks in the interpreter, autotuned on a GPU
# ----------------------------------------------------------------------------------------------

def is_interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_attn_fwd, triton.runtime.JITFunction)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; `keep_config` drops what does not fit.
# Forward: 128 x 128 tiles with 8 warps where they fit (FlashAttention-2's choice on Hopper),
# 64-row blocks so that small problems still fill the GPU (2 x 16 heads x 256 tokens is 64 blocks
# of 128 rows for 132 SMs, 128 blocks of 64). Backward: the dK/dV program keeps dK and dV of its
# BLOCK_N keys in registers and streams narrow query blocks past them; the dQ program the
# other way round (the Triton tutorial's 32 x 128 and 128 x 32). Every product keeps at least 64 rows
# (BLOCK_N for the dK/dV program's, BLOCK_M for the others): Hopper's wgmma works on 64-row slabs, and
# Triton falls back to the older mma.sync below that; and every streamed tile gives each thread at
# least 2 elements of a 16-wide piece, since one 2-byte element per thread can only load as a scalar.
CONFIGS = {
    "_attn_fwd": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
    "_attn_bwd_dkdv": [(32, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3), (32, 64, 8, 2)],
    "_attn_bwd_dq": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 16, 4, 2)],
}
SHARED_MEMORY_BYTES = 227 * 1024  # per block on sm_90 (H100, H200); sm_80 has 163 KB
REGISTER_BUDGET = 128             # fp32 values per thread the tiles below may take (255 is the hardware limit)


def tile_footprint(kernel, block_m, block_n, num_warps, num_stages, d, dv, elem):
    """(shared-memory bytes, fp32 registers per thread) a configuration needs, estimated from its tiles.

    Shared memory holds the operands the tensor cores read: the tile loaded once (Q for the forward
    and dQ, K and V for dK/dV) and, num_stages times over, the tiles streamed by the loop.
    Registers hold the fp32 accumulators and the (BLOCK_M, BLOCK_N) score tiles (S, whose registers P
    reuses; the backward also dP and dS), spread over 32 * num_warps threads. The estimate leaves out
    what every configuration needs besides (addresses, row statistics: about 60 registers in ptxas'
    reports), so REGISTER_BUDGET is well under the 255 a thread may have.
    """
    dp, dvp = sum(head_dim_pieces(d)), sum(head_dim_pieces(dv))
    if kernel == "_attn_fwd":
        smem = elem * (block_m * dp + num_stages * block_n * (dp + dvp))      # Q once, K and V per stage
        regs = block_m * dvp + block_m * block_n                              # acc; S (P takes its place)
    elif kernel == "_attn_bwd_dkdv":
        smem = elem * (block_n * (dp + dvp) + num_stages * block_m * (dp + dvp))  # K, V once; Q, dO per stage
        regs = block_n * (dp + dvp) + 3 * block_m * block_n                   # dK, dV; S, dP, dS
    else:
        smem = elem * (block_m * (dp + dvp) + num_stages * block_n * (dp + dvp))  # Q, dO once; K, V per stage
        regs = block_m * dp + 3 * block_m * block_n                           # dQ; S, dP, dS
    return smem, regs / (32 * num_warps)


def keep_config(kernel, block_m, block_n, num_warps, num_stages, d, dv, elem):
    """Does a configuration fit: its tiles in shared memory, its accumulators in registers?"""
    smem, regs = tile_footprint(kernel, block_m, block_n, num_warps, num_stages, d, dv, elem)
    return smem <= SHARED_MEMORY_BYTES and regs <= REGISTER_BUDGET


def candidate_configs(kernel, d, dv, elem):
    """The configurations the autotuner may pick for this kernel and these head dims (never none)."""
    configs = CONFIGS[kernel]
    kept = [c for c in configs if keep_config(kernel, *c, d, dv, elem)]
    return kept or configs[-1:]


def _prune(kernel, configs, named_args, **kwargs):
    """The autotuner's early pruning: keep the candidates of `candidate_configs` for this call's head dims."""
    elem = named_args["Q"].element_size()
    d, dv = kwargs["HEAD_DIM"], kwargs["HEAD_DIM_V"]
    wanted = set(candidate_configs(kernel, d, dv, elem))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]


_tuned = {}
_AUTOTUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "HAS_KPM"]


def _launcher(kernel):
    """`kernel` itself with interpreter blocks, or an autotuned copy of it on a GPU."""
    if is_interpreted():
        return kernel, dict(BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N)
    if kernel not in _tuned:
        name = kernel.__name__
        configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                   for bm, bn, w, s in CONFIGS[name]]
        extra = dict(reset_to_zero=["DQ_ACC"]) if name == "_attn_bwd_dkdv" else {}
        key = _AUTOTUNE_KEY + (["ATOMIC_DQ"] if name == "_attn_bwd_dkdv" else [])
        _tuned[kernel] = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": functools.partial(_prune, name)},
                                         **extra)(kernel)
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


def _check_inputs(q, k, v, key_padding_mask, scale):
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
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = a real key), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}; "
                            "for a float or 0/1 mask use mask > 0.5, or mask.bool()")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must be (B, Lk) = {(k.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number, got {scale}")
    if min(q.shape + k.shape[2:3] + v.shape[3:]) == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "the kernel needs at least one query, one key and one feature")
    if q.device.type != "cuda" and not is_interpreted():
        raise RuntimeError("the Triton kernel needs CUDA tensors; to run it on the CPU in Triton's interpreter, "
                           "set TRITON_INTERPRET=1 before triton is first imported")


# ----------------------------------------------------------------------------------------------
# Host side: the arguments of each kernel, and the launches
# ----------------------------------------------------------------------------------------------

def _dims(q, v):
    """Compile-time sizes of the feature axes: HEAD_DIM, its pieces, and the same for the values."""
    D, DV = q.shape[-1], v.shape[-1]
    (D0, D1), (DV0, DV1) = head_dim_pieces(D), head_dim_pieces(DV)
    return dict(HEAD_DIM=D, D0=D0, D1=D1, HEAD_DIM_V=DV, DV0=DV0, DV1=DV1)


def _kpm_args(kpm, dummy):
    """KPM (B, Lk) int32 and PAD_CUM (B, Lk + 1) int32 with their strides, or unused stand-ins.

    int32 rather than int8: 4 bytes per key cost nothing beside Q, K and V, and keep the mask's loads
    apart from 2-byte loads in the compiled code (ptx_report counts those as scalar loads of Q, K, V)."""
    if kpm is None:
        return (dummy, dummy), (0, 0, 0)
    pad_cum = torch.nn.functional.pad((kpm == 0).to(torch.int32).cumsum(1, dtype=torch.int32), (1, 0))
    return (kpm, pad_cum), (*_strides(kpm), pad_cum.stride(0))


def fwd_args(q, k, v, o, lse, kpm, causal, scale, precision):
    """Everything `_attn_fwd` is launched with but the blocks: (positional args, constexpr kwargs)."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    (kpm_t, pad_t), kpm_strides = _kpm_args(kpm, lse)
    args = (q, k, v, o, lse, kpm_t, pad_t, *_strides(q), *_strides(k), *_strides(v), *_strides(o), *kpm_strides,
            H, Lq, Lk, scale * LOG2E, _bucket(Lq), _bucket(Lk))
    const = dict(**_dims(q, v), ALIGN=_stride_align(q, k, v), CAUSAL=causal, HAS_KPM=kpm is not None,
                 PRECISION=precision, INTERPRET_BF16=is_interpreted() and q.dtype == torch.bfloat16)
    return args, const


def bwd_dkdv_args(q, k, v, do, lse, delta, kpm, dk, dv, dq_acc, causal, scale, precision):
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    (kpm_t, _), kpm_strides = _kpm_args(kpm, lse)
    args = (q, k, v, do, lse, delta, kpm_t, dk, dv, dq_acc,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), *kpm_strides[:2],
            H, Lq, Lk, scale * LOG2E, scale, _bucket(Lq), _bucket(Lk))
    const = dict(**_dims(q, v), ALIGN=_stride_align(q, k, v, do), CAUSAL=causal, HAS_KPM=kpm is not None,
                 ATOMIC_DQ=dq_acc.dim() == 4, PRECISION=precision,
                 INTERPRET_BF16=is_interpreted() and q.dtype == torch.bfloat16)
    return args, const


def bwd_dq_args(q, k, v, do, lse, delta, kpm, dq, causal, scale, precision):
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    (kpm_t, pad_t), kpm_strides = _kpm_args(kpm, lse)
    args = (q, k, v, do, lse, delta, kpm_t, pad_t, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *kpm_strides,
            H, Lq, Lk, scale * LOG2E, scale, _bucket(Lq), _bucket(Lk))
    const = dict(**_dims(q, v), ALIGN=_stride_align(q, k, v, do), CAUSAL=causal, HAS_KPM=kpm is not None,
                 PRECISION=precision, INTERPRET_BF16=is_interpreted() and q.dtype == torch.bfloat16)
    return args, const


def grid_1d(n_blocks, batch_heads):
    """The launch grid: one axis of n_blocks * B * H programs (a second axis would cap B * H at 65535)."""
    n = n_blocks * batch_heads
    if n >= 2**31:
        raise ValueError(f"{n} programs do not fit in one grid axis (2^31 - 1); split the batch")
    return (n,)


def _forward(q, k, v, causal, kpm, scale, precision):
    """O (B, H, Lq, Dv) in q's dtype and memory order, and LSE (B, H, Lq) fp32 in log2 units."""
    B, H, Lq, _ = q.shape
    o = _alloc((B, H, Lq, v.shape[3]), q.dtype, q.device, like=q)
    lse = _alloc((B, H, Lq), torch.float32, q.device)
    kernel, blocks = _launcher(_attn_fwd)
    args, const = fwd_args(q, k, v, o, lse, kpm, causal, scale, precision)
    kernel[lambda meta: grid_1d(triton.cdiv(Lq, meta["BLOCK_M"]), B * H)](*args, **const, **blocks)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, kpm, scale, precision, deterministic):
    """dQ, dK, dV in the dtypes and memory orders of q, k, v."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    dims = _dims(q, v)
    delta = _alloc((B, H, Lq), torch.float32, q.device)
    pre_block = INTERPRET_BLOCK_M if is_interpreted() else 64
    _attn_bwd_preprocess[grid_1d(triton.cdiv(Lq, pre_block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, Lq,
        HEAD_DIM_V=dims["HEAD_DIM_V"], DV0=dims["DV0"], DV1=dims["DV1"], BLOCK_M=pre_block)

    dq = _alloc(q.shape, q.dtype, q.device, like=q)
    dk = _alloc(k.shape, k.dtype, k.device, like=k)
    dv = _alloc(v.shape, v.dtype, v.device, like=v)
    # atomic dQ: an fp32 (B, H, Lq, D) buffer that every key block adds into, zeroed first
    dq_acc = torch.empty(1, dtype=torch.float32, device=q.device) if deterministic else \
        torch.zeros(q.shape, dtype=torch.float32, device=q.device)

    kernel, blocks = _launcher(_attn_bwd_dkdv)
    args, const = bwd_dkdv_args(q, k, v, do, lse, delta, kpm, dk, dv, dq_acc, causal, scale, precision)
    kernel[lambda meta: grid_1d(triton.cdiv(Lk, meta["BLOCK_N"]), B * H)](*args, **const, **blocks)
    if not deterministic:
        dq.copy_(dq_acc)
        return dq, dk, dv

    kernel, blocks = _launcher(_attn_bwd_dq)
    args, const = bwd_dq_args(q, k, v, do, lse, delta, kpm, dq, causal, scale, precision)
    kernel[lambda meta: grid_1d(triton.cdiv(Lq, meta["BLOCK_M"]), B * H)](*args, **const, **blocks)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """The thin autograd wrapper: forward saves O and the logsumexp, backward recomputes P from them."""

    @staticmethod
    def forward(ctx, q, k, v, causal, key_padding_mask, scale, precision, deterministic):
        kpm = None if key_padding_mask is None else key_padding_mask.to(device=q.device, dtype=torch.int32)
        o, lse = _forward(q, k, v, causal, kpm, scale, precision)
        ctx.save_for_backward(q, k, v, o, lse, kpm)
        ctx.causal, ctx.scale, ctx.precision, ctx.deterministic = causal, scale, precision, deterministic
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, kpm = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, kpm, ctx.scale, ctx.precision, ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, fp32_precision=None,
                    deterministic=True):
    """softmax(q k^T * scale + mask) v with the Triton FlashAttention-2 kernel; differentiable in q, k, v.

    q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv), any strides; D, Dv <= 256.
    causal: query i sees keys j <= i + Lk - Lq. key_padding_mask: bool (B, Lk), True = real key.
    scale: 1 / sqrt(D) when None. Rows that see no key return 0 (and get zero gradients).
    fp32_precision: for float32 inputs, "ieee" (exact fp32 products) or "tf32" (tensor cores);
        None follows torch.get_float32_matmul_precision() ("highest" -> "ieee").
    deterministic: True (default) computes dQ in its own kernel, the same bits every run; False adds
        dQ with fp32 atomics from the dK/dV kernel (FlashAttention-2's Algorithm 2), faster.
    Returns (B, H, Lq, Dv) in q's dtype, laid out in memory like q.
    """
    _check_inputs(q, k, v, key_padding_mask, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    precision = _precision(fp32_precision, q.dtype)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), key_padding_mask, scale, precision,
                                        bool(deterministic))
