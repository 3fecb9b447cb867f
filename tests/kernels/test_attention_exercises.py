"""Lesson 10's checkers accept the answer and name the usual mistakes."""
import torch

from course_lib.kernels.exercises import check_fused_intensity, check_merge, check_softmax_backward


def merge(m1, l1, acc1, m2, l2, acc2):
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, l1 * a1 + l2 * a2, acc1 * a1[:, None] + acc2 * a2[:, None]


def test_check_merge():
    assert check_merge(merge).startswith("Correct")
    assert "without rescaling" in check_merge(lambda m1, l1, a1, m2, l2, a2: (torch.maximum(m1, m2), l1 + l2, a1 + a2))

    def upside_down(m1, l1, a1, m2, l2, a2):
        m = torch.maximum(m1, m2)
        return m, l1 * torch.exp(m - m1) + l2 * torch.exp(m - m2), a1 + a2
    assert "upside down" in check_merge(upside_down)

    def normalised(*args):
        m, l, acc = merge(*args)
        return m, l, acc / l[:, None]
    assert "unnormalised" in check_merge(normalised)
    assert "three things" in check_merge(lambda *args: merge(*args)[:2])
    assert "raised" in check_merge(lambda *args: 1 / 0)


def test_check_fused_intensity():
    assert check_fused_intensity(lambda Lq, Lk, D, b: 4 * Lq * Lk * D / (b * 2 * D * (Lq + Lk))).startswith("Correct")
    assert "both matmuls" in check_fused_intensity(lambda Lq, Lk, D, b: 2 * Lq * Lk * D / (b * 2 * D * (Lq + Lk)))
    assert "bytes_per_element" in check_fused_intensity(lambda Lq, Lk, D, b: 4 * Lq * Lk * D / (2 * D * (Lq + Lk)))
    assert "O is written" in check_fused_intensity(lambda Lq, Lk, D, b: 4 * Lq * Lk * D / (b * D * (Lq + 2 * Lk)))


def test_check_softmax_backward():
    assert check_softmax_backward(lambda p, dp, o, do: p * (dp - (do * o).sum(1)[:, None])).startswith("Correct")
    assert check_softmax_backward(lambda p, dp, o, do: p * (dp - (p * dp).sum(1, keepdim=True))).startswith("Correct")
    assert "- D_i" in check_softmax_backward(lambda p, dp, o, do: p * dp)
    assert "sign" in check_softmax_backward(lambda p, dp, o, do: p * ((do * o).sum(1)[:, None] - dp))
    assert "shape" in check_softmax_backward(lambda p, dp, o, do: dp.T)
