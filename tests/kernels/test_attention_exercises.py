"""Lesson 10's checkers accept the answer, name the usual mistakes (a merge that turns fully masked
states into NaN among them) and return Verdicts like lessons 01-05, which still answer the
string calls of the lesson's first edition."""
import math

import torch

from course_lib.exercises import Verdict
from course_lib.kernels.exercises import check_fused_intensity, check_merge, check_softmax_backward


def merge(m1, l1, acc1, m2, l2, acc2):
    m = torch.maximum(m1, m2)
    m_safe = torch.where(m == -math.inf, 0.0, m)
    a1, a2 = torch.exp(m1 - m_safe), torch.exp(m2 - m_safe)
    return m, l1 * a1 + l2 * a2, acc1 * a1[:, None] + acc2 * a2[:, None]


def naive_merge(m1, l1, acc1, m2, l2, acc2):
    """Right for ordinary states, NaN where both are fully masked: exp(-inf - (-inf))."""
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, l1 * a1 + l2 * a2, acc1 * a1[:, None] + acc2 * a2[:, None]


def test_check_merge_accepts_the_answer():
    v = check_merge(merge)
    assert isinstance(v, Verdict) and v.ok
    assert "fully masked" in v.message and str(v).startswith("Correct!")
    # nan_to_num after the fact is another way to the same states
    assert check_merge(lambda *a: tuple(torch.nan_to_num(x, nan=0.0, neginf=-math.inf) for x in naive_merge(*a))).ok


def test_check_merge_names_the_nan_of_fully_masked_states():
    v = check_merge(naive_merge)
    assert not v.ok
    assert "NaN" in v.message and "m_safe" in v.message and "-inf - (-inf)" in v.message


def test_check_merge_names_masked_slips():
    def m_safe_returned(*args):  # returns the safe max instead of -inf
        m, l, acc = merge(*args)
        return torch.where(m == -math.inf, 0.0, m), l, acc
    v = check_merge(m_safe_returned)
    assert not v.ok and "stay -inf" in v.message

    def masked_to_one(*args):  # fills no-key rows with l = 1: not a state with no keys
        m, l, acc = merge(*args)
        return m, torch.where(m == -math.inf, 1.0, l), acc
    v = check_merge(masked_to_one)
    assert not v.ok and "holds no keys" in v.message

    def raises_on_inf(m1, l1, acc1, m2, l2, acc2):
        if torch.isinf(m1).any() or torch.isinf(m2).any():
            raise ValueError("inf")
        return merge(m1, l1, acc1, m2, l2, acc2)
    v = check_merge(raises_on_inf)
    assert not v.ok and "on fully masked states" in v.message and "ValueError" in v.message


def test_check_merge_names_ordinary_slips():
    assert "without rescaling" in check_merge(lambda m1, l1, a1, m2, l2, a2: (torch.maximum(m1, m2), l1 + l2, a1 + a2)).message

    def upside_down(m1, l1, a1, m2, l2, a2):
        m = torch.maximum(m1, m2)
        return m, l1 * torch.exp(m - m1) + l2 * torch.exp(m - m2), a1 + a2
    assert "upside down" in check_merge(upside_down).message

    def normalised(*args):
        m, l, acc = merge(*args)
        return m, l, acc / l[:, None]
    assert "unnormalised" in check_merge(normalised).message
    assert "three things" in check_merge(lambda *args: merge(*args)[:2]).message
    assert "raised ZeroDivisionError" in check_merge(lambda *args: 1 / 0).message
    assert "shape" in check_merge(lambda *args: (merge(*args)[0][:, None],) + merge(*args)[1:]).message


def test_check_fused_intensity():
    right = check_fused_intensity(lambda Lq, Lk, D, b: 4 * Lq * Lk * D / (b * 2 * D * (Lq + Lk)))
    assert isinstance(right, Verdict) and right.ok
    for wrong, hint in (
        (lambda Lq, Lk, D, b: 2 * Lq * Lk * D / (b * 2 * D * (Lq + Lk)), "both matmuls"),
        (lambda Lq, Lk, D, b: 4 * Lq * Lk * D / (2 * D * (Lq + Lk)), "bytes_per_element"),
        (lambda Lq, Lk, D, b: 4 * Lq * Lk * D / (b * D * (Lq + 2 * Lk)), "O is written"),
    ):
        v = check_fused_intensity(wrong)
        assert not v.ok and hint in v.message


def test_check_softmax_backward():
    for right in (lambda p, dp, o, do: p * (dp - (do * o).sum(1)[:, None]),
                  lambda p, dp, o, do: p * (dp - (p * dp).sum(1, keepdim=True))):
        v = check_softmax_backward(right)
        assert isinstance(v, Verdict) and v.ok
    for wrong, hint in ((lambda p, dp, o, do: p * dp, "- D_i"),
                        (lambda p, dp, o, do: p * ((do * o).sum(1)[:, None] - dp), "sign"),
                        (lambda p, dp, o, do: dp.T, "shape")):
        v = check_softmax_backward(wrong)
        assert not v.ok and hint in v.message


def test_the_lessons_first_edition_calls_still_work(capsys):
    """Lesson 10's committed cells: message = check_...(fn); print(message);
    assert message.startswith("Correct"); and a Verdict shows itself in a notebook."""
    for v in (check_merge(merge), check_fused_intensity(lambda Lq, Lk, D, b: 2 * Lq * Lk / (b * (Lq + Lk))),
              check_softmax_backward(lambda p, dp, o, do: p * (dp - (do * o).sum(1)[:, None]))):
        print(v)
        assert v.startswith("Correct") and "Correct" in v
        assert capsys.readouterr().out.startswith("Correct! ")
        assert "#1a7f37" in v._repr_html_() and "Correct!" in v._repr_html_()
    wrong = check_merge(naive_merge)
    assert not wrong.startswith("Correct") and str(wrong).startswith("Not yet: ") and "NaN" in wrong
    ok, message = wrong  # still a (ok, message) pair
    assert ok is False and message == wrong.message
