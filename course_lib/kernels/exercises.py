"""Checkers for the exercises of lesson 10 (attention kernels).

Each `check_*` takes the learner's function, tries it on random inputs against the answer and
returns a message: "Correct: ..." or what looks wrong (a shape, a missing rescale, a factor off,
a sum over the wrong axis), found by comparing with the usual mistakes.
"""
from __future__ import annotations

import math

import torch

__all__ = ["check_merge", "check_fused_intensity", "check_softmax_backward"]


def _close(a, b, tol=1e-9):
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)


# ---- exercise 1: merging two online-softmax states ---------------------------------------------

def _merge_answer(m1, l1, acc1, m2, l2, acc2):
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, l1 * a1 + l2 * a2, acc1 * a1[:, None] + acc2 * a2[:, None]


def _chunk_state(s, v):
    """(m, l, acc) of one chunk of scores s (R, n) and values v (n, D)."""
    m = s.max(dim=1).values
    p = torch.exp(s - m[:, None])
    return m, p.sum(dim=1), p @ v


def check_merge(merge):
    """merge(m1, l1, acc1, m2, l2, acc2) -> (m, l, acc): the state of two key chunks together.

    m (R,) running max, l (R,) sum of exp(s - m), acc (R, D) sum of exp(s - m) v, unnormalised.
    """
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 12, generator=g, dtype=torch.float64) * 4
    s[:, 7:] += 3.0  # the second chunk holds the larger scores, so the rescale matters
    v = torch.randn(12, 3, generator=g, dtype=torch.float64)
    one, two = _chunk_state(s[:, :7], v[:7]), _chunk_state(s[:, 7:], v[7:])
    try:
        got = merge(*one, *two)
    except Exception as e:  # noqa: BLE001 - report any failure to the learner
        return f"merge raised {type(e).__name__}: {e}"
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        return "merge should return three things: (m, l, acc)"
    m, l, acc = (torch.as_tensor(x, dtype=torch.float64) for x in got)
    want_m, want_l, want_acc = _merge_answer(*one, *two)
    for name, x, w in (("m", m, want_m), ("l", l, want_l), ("acc", acc, want_acc)):
        if x.shape != w.shape:
            return f"{name} has shape {tuple(x.shape)}, expected {tuple(w.shape)}"
    if not _close(m, want_m):
        if _close(m, one[0] + two[0]) or _close(m, torch.minimum(one[0], two[0])):
            return "m should be the larger of the two maxima, max(m1, m2)"
        return "m is wrong: the merged running max is max(m1, m2)"
    if _close(l, one[1] + two[1]):
        return "l adds l1 + l2 without rescaling: each sum was taken relative to its own max; multiply by exp(m_k - m)"
    if _close(l, one[1] * torch.exp(m - one[0]) + two[1] * torch.exp(m - two[0])):
        return "the rescale factor is upside down: use exp(m_k - m) (at most 1), not exp(m - m_k)"
    if not _close(l, want_l):
        return "l is wrong: l = l1 * exp(m1 - m) + l2 * exp(m2 - m)"
    if _close(acc, want_acc / want_l[:, None]):
        return "acc is already divided by l: keep it unnormalised, divide once at the very end"
    if _close(acc, one[2] + two[2]):
        return "acc adds acc1 + acc2 without rescaling: multiply each by its exp(m_k - m)"
    if not _close(acc, want_acc):
        return "acc is wrong: acc = acc1 * exp(m1 - m)[:, None] + acc2 * exp(m2 - m)[:, None]"
    full = torch.softmax(s, dim=1) @ v
    return f"Correct: acc / l matches softmax(s) v to {float((acc / l[:, None] - full).abs().max()):.1e}"


# ---- exercise 2: arithmetic intensity of a fused kernel ----------------------------------------

def _intensity_answer(Lq, Lk, D, bytes_per_element):
    return 4 * Lq * Lk * D / (bytes_per_element * (2 * Lq * D + 2 * Lk * D))


def check_fused_intensity(fused_intensity):
    """fused_intensity(Lq, Lk, D, bytes_per_element) -> FLOP per byte of one (batch, head) when
    Q, K, V are read once and O written once, counting 2 FLOPs per multiply-add of Q K^T and P V."""
    cases = [(4096, 4096, 64, 2), (4096, 77, 40, 2), (81, 81, 64, 4), (1024, 1152, 64, 2)]
    for Lq, Lk, D, nbytes in cases:
        try:
            got = float(fused_intensity(Lq, Lk, D, nbytes))
        except Exception as e:  # noqa: BLE001
            return f"fused_intensity({Lq}, {Lk}, {D}, {nbytes}) raised {type(e).__name__}: {e}"
        want = _intensity_answer(Lq, Lk, D, nbytes)
        if math.isclose(got, want, rel_tol=1e-6):
            continue
        ratio = got / want
        hints = {
            0.5: "half the answer: count both matmuls, Q K^T and P V, at 2 FLOPs per multiply-add",
            2.0: "twice the answer: 4 * Lq * Lk * D FLOPs already counts both matmuls",
            0.25: "a quarter of the answer: 2 FLOPs per multiply-add, and two matmuls",
            float(nbytes): "the bytes are missing: divide by bytes_per_element too",
            4 / 3: "too few bytes: O is written as well as Q, K, V read (2 * Lq * D + 2 * Lk * D elements)",
        }
        for r, hint in hints.items():
            if math.isclose(ratio, r, rel_tol=1e-3):
                return f"for (Lq, Lk, D) = {(Lq, Lk, D)} you gave {got:.4g}, expected {want:.4g}: {hint}"
        if math.isclose(got, 4 * Lq * Lk * D / (nbytes * 2 * (Lq + Lk)), rel_tol=1e-6):
            return "the bytes miss the head dimension: each of Q, K, V, O has L * D elements"
        return f"for (Lq, Lk, D, bytes) = {(Lq, Lk, D, nbytes)} you gave {got:.4g}, expected {want:.4g}"
    return ("Correct: it simplifies to Lq * Lk / (Lq + Lk) FLOP per byte at 2 bytes per element, "
            "whatever D is")


# ---- exercise 3: the softmax backward of FlashAttention ----------------------------------------

def check_softmax_backward(softmax_backward):
    """softmax_backward(p, dp, o, do) -> dS for one head: p, dp (Lq, Lk); o, do (Lq, Dv).

    dS_ij = P_ij (dP_ij - D_i) with D_i = rowsum(dO_i * O_i), equal to rowsum(P_i * dP_i).
    """
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(9, 4, generator=g, dtype=torch.float64)
    do = torch.randn(6, 4, generator=g, dtype=torch.float64)
    p = torch.softmax(s, dim=1)
    o = p @ v
    (ds_true,) = torch.autograd.grad(o, s, do)
    p, o, dp = p.detach(), o.detach(), do @ v.T
    try:
        ds = torch.as_tensor(softmax_backward(p, dp, o, do), dtype=torch.float64)
    except Exception as e:  # noqa: BLE001
        return f"softmax_backward raised {type(e).__name__}: {e}"
    if ds.shape != ds_true.shape:
        return f"dS has shape {tuple(ds.shape)}, expected {tuple(ds_true.shape)} (one entry per score)"
    if _close(ds, ds_true):
        return "Correct: dS = P * (dP - rowsum(dO * O)[:, None]) matches autograd"
    if _close(ds, p * dp):
        return "missing the - D_i term: the softmax couples a row, dS = P * (dP - D_i)"
    if _close(ds, p * (dp - (do * o).sum())):
        return "D was summed over the whole matrix: it is one number per query row, rowsum over the features"
    d_wrong_axis = (p * dp).sum(dim=0, keepdim=True)
    if _close(ds, p * (dp - d_wrong_axis)):
        return "D was summed over queries (dim 0): sum over keys within each row, one D_i per query"
    if _close(ds, -ds_true):
        return "the sign is flipped: dS = P * (dP - D), not P * (D - dP)"
    if _close(ds, p * (dp - (do * o).sum(dim=1))):
        return "D_i has shape (Lq,) and broadcasts along the wrong axis: use D[:, None]"
    return "dS does not match autograd: dS = P * (dP - D[:, None]) with D = (dO * O).sum(dim=1)"
