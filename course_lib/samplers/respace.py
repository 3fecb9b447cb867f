"""Respacing (Improved DDPM sec. 4, ADM's `SpacedDiffusion`): sample a model trained with T
steps using only K of them. Keep the alpha_bar of the chosen steps and rebuild betas from them,
beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}; the model is still called with the
original t_i. Works for fixed and learned variances (the learned range is re-derived from the
new betas). Used by lessons 02-03.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from course_lib.diffusion._checks import check_index_tensor, check_int
from course_lib.diffusion.schedules import NoiseSchedule


class Respaced(NamedTuple):
    schedule: NoiseSchedule    # K steps, index i = 0..K-1
    timesteps: torch.Tensor    # (K,) the original t of each new index, increasing


def respace(schedule: NoiseSchedule, timesteps) -> Respaced:
    """The schedule that visits only `timesteps` (increasing original indices, any subset of 0..T-1)."""
    kept = check_index_tensor("timesteps", timesteps)   # 0.9 is an error, not step 0
    if kept.numel() == 0 or int(kept.min()) < 0 or int(kept.max()) >= schedule.T:
        raise ValueError(f"timesteps must be a non-empty subset of 0..{schedule.T - 1}")
    if not bool((kept[1:] > kept[:-1]).all()):
        raise ValueError("timesteps must be strictly increasing")
    return Respaced(NoiseSchedule.from_alpha_bar(schedule.alpha_bar[kept]), kept)


def even_timesteps(T: int, K: int) -> torch.Tensor:
    """K steps spread evenly over 0..T-1, always including 0 and T-1 (for respacing)."""
    T, K = check_int("T", T), check_int("K", K)
    if not 1 <= K <= T:
        raise ValueError(f"need 1 <= K <= T, got K={K}, T={T}")
    return torch.linspace(0, T - 1, K, dtype=torch.float64).round().long().unique()


def respaced_model(eps_fn, timesteps: torch.Tensor):
    """Wrap eps_fn(x_t, t, cond) so it can be called with respaced indices i: it sees t = timesteps[i]."""
    timesteps = check_index_tensor("timesteps", timesteps, low=0)

    def wrapped(x_t, i, cond=None):
        i = check_respaced_index(i, len(timesteps))
        return eps_fn(x_t, timesteps.to(i.device)[i], cond)
    return wrapped


def check_respaced_index(i, K: int) -> torch.Tensor:
    """Respaced indices i: an integer tensor (B,) with 0 <= i < K (a plain int or a float is an error)."""
    if not isinstance(i, torch.Tensor) or i.dtype.is_floating_point or i.dtype in (torch.bool, torch.complex64,
                                                                                   torch.complex128):
        raise TypeError(f"t must be an integer tensor of respaced indices, shape (B,), got "
                        f"{getattr(i, 'dtype', type(i).__name__)}")
    if i.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(i.shape)}")
    if i.numel() and (int(i.min()) < 0 or int(i.max()) >= K):
        raise ValueError(f"t must lie in [0, {K - 1}] (indices into the {K} respaced steps), "
                         f"got values from {int(i.min())} to {int(i.max())}")
    return i
