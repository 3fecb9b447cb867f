"""The reference attention is the specification: check it against the definition, term by term."""
import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.kernels.reference import attention_mask, attention_reference


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def loop_attention(q, k, v, keep, scale):
    """Eq. (1) one query at a time, with plain Python sums: out_i = sum_j p_ij v_j."""
    B, H, Lq, _ = q.shape
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                js = [j for j in range(k.shape[2]) if keep[b if keep.shape[0] > 1 else 0, 0, i, j]]
                if not js:
                    continue
                s = torch.stack([q[b, h, i] @ k[b, h, j] * scale for j in js])
                p = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                out[b, h, i] = sum(p_j * v[b, h, j] for p_j, j in zip(p, js))
    return out


@pytest.mark.parametrize("Lq, Lk, causal", [(5, 5, False), (5, 5, True), (3, 7, True), (7, 3, True), (4, 9, False)])
def test_matches_the_definition(Lq, Lk, causal):
    q, k, v = randn(2, 2, Lq, 8, seed=1), randn(2, 2, Lk, 8, seed=2), randn(2, 2, Lk, 6, seed=3)
    kpm = torch.rand(2, Lk, generator=torch.Generator().manual_seed(4)) > 0.3
    keep = attention_mask(Lq, Lk, causal=causal, key_padding_mask=kpm)
    got = attention_reference(q, k, v, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(got, loop_attention(q, k, v, keep, 1 / math.sqrt(8)))


def test_matches_torch_sdpa():
    q, k, v = randn(2, 3, 9, 16, seed=1), randn(2, 3, 11, 16, seed=2), randn(2, 3, 11, 16, seed=3)
    torch.testing.assert_close(attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q = randn(2, 3, 11, 16, seed=4)
    torch.testing.assert_close(attention_reference(q, k, v, causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_causal_is_aligned_at_the_end():
    """Query i sees keys j <= i + Lk - Lq: the last query sees every key, whatever Lq and Lk."""
    keep = attention_mask(3, 5, causal=True)[0, 0]
    assert keep.tolist() == [[True, True, True, False, False],
                             [True, True, True, True, False],
                             [True, True, True, True, True]]
    keep = attention_mask(5, 3, causal=True)[0, 0]
    assert keep.sum(dim=1).tolist() == [0, 0, 1, 2, 3]  # the first Lq - Lk queries see no key


def test_probabilities_with_identity_values():
    """With V = I the output rows are the attention probabilities: >= 0, summing to 1, 0 where masked."""
    q, k = randn(1, 2, 6, 4, seed=1), randn(1, 2, 8, 4, seed=2)
    kpm = torch.tensor([[True, True, False, True, True, True, False, True]])
    p = attention_reference(q, k, torch.eye(8, dtype=torch.float64)[None, None], causal=True, key_padding_mask=kpm)
    keep = attention_mask(6, 8, causal=True, key_padding_mask=kpm)
    assert torch.all(p >= 0) and torch.all(p[~keep.expand_as(p)] == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 6, dtype=torch.float64))


def test_scale():
    q, k, v = randn(1, 1, 4, 8, seed=1), randn(1, 1, 6, 8, seed=2), randn(1, 1, 6, 3, seed=3)
    torch.testing.assert_close(attention_reference(q, k, v, scale=0.5), attention_reference(q * 0.5 * math.sqrt(8), k, v))
    torch.testing.assert_close(attention_reference(q, k, v, scale=0.0), v.mean(2, keepdim=True).expand(1, 1, 4, 3))


def test_empty_rows_give_zeros_and_finite_gradients():
    q, k, v = (randn(2, 1, 4, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    kpm = torch.tensor([[False, True, True, True], [False, False, False, False]])
    out = attention_reference(q, k, v, causal=True, key_padding_mask=kpm)
    assert torch.all(out[1] == 0)        # batch 1 has no real key
    assert torch.all(out[0, 0, 0] == 0)  # causal query 0 sees only key 0, which is padding
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_keeps_dtype(dtype):
    q = randn(1, 2, 5, 8).to(dtype)
    out = attention_reference(q, q, q)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), attention_reference(*(q.double(),) * 3), atol=2e-2, rtol=2e-2)
