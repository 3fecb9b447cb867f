"""Checkers for the exercises of lesson 10 (attention kernels).

Each `check_*` takes the learner's function, tries it on random inputs against the answer and
returns a `Verdict`, as the checkers of lessons 01-05 do: ok, and a message saying what looks
wrong (a shape, a missing rescale, a NaN from a fully masked row, a factor off, a sum over the
wrong axis), found by comparing with the usual mistakes.
"""
from __future__ import annotations

import math

import torch

from course_lib.exercises import Verdict

__all__ = ["TextVerdict", "check_merge", "check_fused_intensity", "check_softmax_backward"]


class TextVerdict(Verdict):
    """A `Verdict` that also answers like the string these checkers returned before they returned
    Verdicts: the lesson's cells ran `message = check_merge(merge); print(message);
    assert message.startswith("Correct")`, and str(verdict) starts with "Correct!" exactly when ok."""
    __slots__ = ()

    def startswith(self, prefix) -> bool:
        return str(self).startswith(prefix)

    def __contains__(self, text) -> bool:  # "rescal" in verdict: a substring of the text
        return isinstance(text, str) and text in str(self)


def _yes(message: str) -> TextVerdict:
    return TextVerdict(True, message)


def _no(message: str) -> TextVerdict:
    return TextVerdict(False, message)


def _close(a, b, tol=1e-9):
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)


# ---- exercise 1: merging two online-softmax states ---------------------------------------------

def _merge_answer(m1, l1, acc1, m2, l2, acc2):
    m = torch.maximum(m1, m2)
    m_safe = torch.where(m == -math.inf, 0.0, m)  # no key in either state: avoid -inf - (-inf)
    a1, a2 = torch.exp(m1 - m_safe), torch.exp(m2 - m_safe)
    return m, l1 * a1 + l2 * a2, acc1 * a1[:, None] + acc2 * a2[:, None]


def _chunk_state(s, v):
    """(m, l, acc) of one chunk of scores s (R, n) and values v (n, D); a row whose scores are all
    -inf (every key masked) gets the state the kernel starts from: m = -inf, l = 0, acc = 0."""
    m = s.max(dim=1).values
    p = torch.exp(s - torch.where(m == -math.inf, 0.0, m)[:, None])
    return m, p.sum(dim=1), p @ v


def _call_merge(merge, one, two, what):
    """(m, l, acc) as float64 tensors of the expected shapes, or a TextVerdict saying why not."""
    try:
        got = merge(*one, *two)
    except Exception as e:  # noqa: BLE001 - report any failure to the learner
        return _no(f"merge raised {type(e).__name__}{what}: {e}")
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        return _no("merge should return three things: (m, l, acc)")
    got = tuple(torch.as_tensor(x, dtype=torch.float64) for x in got)
    for name, x, w in zip(("m", "l", "acc"), got, one):
        if x.shape != w.shape:
            return _no(f"{name} has shape {tuple(x.shape)}, expected {tuple(w.shape)}")
    return got


def _check_unmasked(merge, s, v):
    one, two = _chunk_state(s[:, :7], v[:7]), _chunk_state(s[:, 7:], v[7:])
    got = _call_merge(merge, one, two, "")
    if isinstance(got, Verdict):
        return got
    m, l, acc = got
    want_m, want_l, want_acc = _merge_answer(*one, *two)
    if not _close(m, want_m):
        if _close(m, one[0] + two[0]) or _close(m, torch.minimum(one[0], two[0])):
            return _no("m should be the larger of the two maxima, max(m1, m2)")
        return _no("m is wrong: the merged running max is max(m1, m2)")
    if _close(l, one[1] + two[1]):
        return _no("l adds l1 + l2 without rescaling: each sum was taken relative to its own max; "
                   "multiply by exp(m_k - m)")
    if _close(l, one[1] * torch.exp(m - one[0]) + two[1] * torch.exp(m - two[0])):
        return _no("the rescale factor is upside down: use exp(m_k - m) (at most 1), not exp(m - m_k)")
    if not _close(l, want_l):
        return _no("l is wrong: l = l1 * exp(m1 - m) + l2 * exp(m2 - m)")
    if _close(acc, want_acc / want_l[:, None]):
        return _no("acc is already divided by l: keep it unnormalised, divide once at the very end")
    if _close(acc, one[2] + two[2]):
        return _no("acc adds acc1 + acc2 without rescaling: multiply each by its exp(m_k - m)")
    if not _close(acc, want_acc):
        return _no("acc is wrong: acc = acc1 * exp(m1 - m)[:, None] + acc2 * exp(m2 - m)[:, None]")
    return None


def _check_masked(merge, s, v):
    """Rows 0 and 1: one state fully masked (m = -inf, l = 0, acc = 0), the other real; row 2: both
    masked, a row that has seen no key yet (a padded query, or the first blocks under a mask)."""
    s = s.clone()
    s[0, :7] = s[1, 7:] = s[2, :] = -math.inf
    one, two = _chunk_state(s[:, :7], v[:7]), _chunk_state(s[:, 7:], v[7:])
    got = _call_merge(merge, one, two, " on fully masked states (m = -inf, l = 0, acc = 0)")
    if isinstance(got, Verdict):
        return got
    m, l, acc = got
    want_m, want_l, want_acc = _merge_answer(*one, *two)
    nan = torch.isnan(m) | torch.isnan(l) | torch.isnan(acc).any(1)
    if bool(nan[2]):
        return _no("two fully masked states merge to NaN: where m1 = m2 = -inf (no visible key yet, "
                   "l = 0), exp(m1 - m) is exp(-inf - (-inf)) = exp(nan). Subtract a safe maximum, "
                   "m_safe = torch.where(m == -inf, 0, m), as the kernel does: the factors become "
                   "exp(-inf) = 0 and the state stays m = -inf, l = 0, acc = 0")
    if bool(nan.any()):
        return _no("a fully masked state (m = -inf, l = 0, acc = 0) merged with a real one gives NaN: "
                   "its factor exp(m_k - m) should be exp(-inf) = 0, and 0 * l_k, 0 * acc_k stay 0")
    if not _close(m, want_m):
        if bool((m[2] == 0) & (want_m[2] == -math.inf)):
            return _no("m of a row with no key should stay -inf: return m = max(m1, m2), and use "
                       "m_safe only inside the exponentials")
        return _no("m is wrong where a state is fully masked: it is still max(m1, m2)")
    if not (_close(l, want_l) and _close(acc, want_acc)):
        return _no("wrong where a state is fully masked: a state with m = -inf holds no keys (l = 0, "
                   "acc = 0), so merging it leaves the other state as it is, and two of them stay "
                   "m = -inf, l = 0, acc = 0")
    return None


def check_merge(merge) -> TextVerdict:
    """merge(m1, l1, acc1, m2, l2, acc2) -> (m, l, acc): the state of two key chunks together.

    m (R,) running max, l (R,) sum of exp(s - m), acc (R, D) sum of exp(s - m) v, unnormalised.
    Tried on ordinary states, then on fully masked ones (m = -inf, l = 0, acc = 0: a row whose keys
    so far are all masked), where exp(-inf - (-inf)) would be NaN without the kernel's m_safe.
    """
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 12, generator=g, dtype=torch.float64) * 4
    s[:, 7:] += 3.0  # the second chunk holds the larger scores, so the rescale matters
    v = torch.randn(12, 3, generator=g, dtype=torch.float64)
    wrong = _check_unmasked(merge, s, v) or _check_masked(merge, s, v)
    if wrong is not None:
        return wrong
    m, l, acc = _call_merge(merge, _chunk_state(s[:, :7], v[:7]), _chunk_state(s[:, 7:], v[7:]), "")
    err = float((acc / l[:, None] - torch.softmax(s, dim=1) @ v).abs().max())
    return _yes(f"acc / l matches softmax(s) v to {err:.1e}, and fully masked states (m = -inf) merge "
                "without NaN, to l = 0 and acc = 0")


# ---- exercise 2: arithmetic intensity of a fused kernel ----------------------------------------

def _intensity_answer(Lq, Lk, D, bytes_per_element):
    return 4 * Lq * Lk * D / (bytes_per_element * (2 * Lq * D + 2 * Lk * D))


def check_fused_intensity(fused_intensity) -> TextVerdict:
    """fused_intensity(Lq, Lk, D, bytes_per_element) -> FLOP per byte of one (batch, head) when
    Q, K, V are read once and O written once, counting 2 FLOPs per multiply-add of Q K^T and P V."""
    cases = [(4096, 4096, 64, 2), (4096, 77, 40, 2), (81, 81, 64, 4), (1024, 1152, 64, 2)]
    for Lq, Lk, D, nbytes in cases:
        try:
            got = float(fused_intensity(Lq, Lk, D, nbytes))
        except Exception as e:  # noqa: BLE001
            return _no(f"fused_intensity({Lq}, {Lk}, {D}, {nbytes}) raised {type(e).__name__}: {e}")
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
                return _no(f"for (Lq, Lk, D) = {(Lq, Lk, D)} you gave {got:.4g}, expected {want:.4g}: {hint}")
        if math.isclose(got, 4 * Lq * Lk * D / (nbytes * 2 * (Lq + Lk)), rel_tol=1e-6):
            return _no("the bytes miss the head dimension: each of Q, K, V, O has L * D elements")
        return _no(f"for (Lq, Lk, D, bytes) = {(Lq, Lk, D, nbytes)} you gave {got:.4g}, expected {want:.4g}")
    return _yes("it simplifies to Lq * Lk / (Lq + Lk) FLOP per byte at 2 bytes per element, whatever D is")


# ---- exercise 3: the softmax backward of FlashAttention ----------------------------------------

def check_softmax_backward(softmax_backward) -> TextVerdict:
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
        return _no(f"softmax_backward raised {type(e).__name__}: {e}")
    if ds.shape != ds_true.shape:
        return _no(f"dS has shape {tuple(ds.shape)}, expected {tuple(ds_true.shape)} (one entry per score)")
    if _close(ds, ds_true):
        return _yes("dS = P * (dP - rowsum(dO * O)[:, None]) matches autograd")
    if _close(ds, p * dp):
        return _no("missing the - D_i term: the softmax couples a row, dS = P * (dP - D_i)")
    if _close(ds, p * (dp - (do * o).sum())):
        return _no("D was summed over the whole matrix: it is one number per query row, "
                   "rowsum over the features")
    d_wrong_axis = (p * dp).sum(dim=0, keepdim=True)
    if _close(ds, p * (dp - d_wrong_axis)):
        return _no("D was summed over queries (dim 0): sum over keys within each row, one D_i per query")
    if _close(ds, -ds_true):
        return _no("the sign is flipped: dS = P * (dP - D), not P * (D - dP)")
    if _close(ds, p * (dp - (do * o).sum(dim=1))):
        return _no("D_i has shape (Lq,) and broadcasts along the wrong axis: use D[:, None]")
    return _no("dS does not match autograd: dS = P * (dP - D[:, None]) with D = (dO * O).sum(dim=1)")
