"""FID of several samplers on one model, every row from the same noise (lesson 03's steps-vs-FID
table, the DDIM paper's Table 1 in miniature).

All rows start from the same x_T (one generator seeded by `seed` draws all n of them up front),
and stochastic samplers get their step noise from a generator re-seeded alike for every row, so
two rows differ only in the sampler. FID depends on the sample count, so every row uses the same
n; report the evaluator's real_fid(n) beside the table.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import torch

from course_lib.samplers import config as sampler_config


class SweepRow(NamedTuple):
    config: sampler_config.SamplerConfig
    fid: float
    seconds: float          # wall time of the sampling (not of the FID)
    samples: torch.Tensor   # the first `keep` samples, (keep, C, H, W), for pictures


def noise_for(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The n starting points x_T ~ N(0, I) of shape (n, *shape) that every row of a sweep uses."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def fid_sweep(evaluator, configs: Sequence[sampler_config.SamplerConfig], eps_fn, schedule, n: int, *,
              shape: Sequence[int] = (1, 28, 28), seed: int = 0, batch_size: int = 128, keep: int = 16,
              log: Callable[[str], None] | None = print) -> list:
    """For each config: n samples from the shared x_T, their FID (evaluator.fid), the sampling time.

    evaluator: anything with .fid(images) (a FashionEvaluator). log(line) is called after each row
    (None: silent). Returns one SweepRow per config, in order.
    """
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got n={n}")
    x_T = noise_for(n, shape, seed)
    rows = []
    for config in configs:
        generator = torch.Generator().manual_seed(seed + 1)      # the same step noise for every row
        t0 = time.time()
        samples = torch.cat([sampler_config.run(config, eps_fn, schedule, x_T[i:i + batch_size], generator=generator)
                             for i in range(0, n, batch_size)])
        seconds = time.time() - t0
        rows.append(SweepRow(config, evaluator.fid(samples), seconds, samples[:keep].clone()))
        if log is not None:
            log(f"{config.label:45s} FID {rows[-1].fid:8.2f}   "
                f"({seconds:.0f} s, {seconds / n * 1000:.0f} ms per sample)")
    return rows
