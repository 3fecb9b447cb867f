"""Sinusoidal timestep features and the embedding MLP."""
import math

import torch

from course_lib.nn.embeddings import TimestepEmbedding, timestep_embedding


def test_shape_and_values_at_zero():
    emb = timestep_embedding(torch.zeros(3, dtype=torch.long), 16)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    assert torch.equal(emb[:, :8], torch.ones(3, 8))   # cos(0) = 1
    assert torch.equal(emb[:, 8:], torch.zeros(3, 8))  # sin(0) = 0


def test_values_are_the_transformer_frequencies():
    t = torch.tensor([0, 1, 7, 999])
    dim, half = 10, 5
    emb = timestep_embedding(t, dim)
    for b, tb in enumerate(t.tolist()):
        for i in range(half):
            w = 10000.0 ** (-i / half)
            assert math.isclose(emb[b, i].item(), math.cos(tb * w), abs_tol=2e-4)
            assert math.isclose(emb[b, half + i].item(), math.sin(tb * w), abs_tol=2e-4)


def test_odd_dimension_is_zero_padded():
    emb = timestep_embedding(torch.tensor([3, 4]), 7)
    assert emb.shape == (2, 7) and torch.equal(emb[:, -1], torch.zeros(2))


def test_distinct_steps_get_distinct_features():
    emb = timestep_embedding(torch.arange(1000), 32)
    d = torch.cdist(emb, emb)
    assert d[~torch.eye(1000, dtype=torch.bool)].min() > 1e-3


def test_timestep_embedding_module():
    m = TimestepEmbedding(16, 64)
    out = m(torch.tensor([0, 5, 999]))
    assert out.shape == (3, 64)
    assert not torch.allclose(out[0], out[1])
