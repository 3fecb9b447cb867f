"""Caption-accuracy sweeps for the text lessons (06-09): several guided noise predictors (a guidance
form at several scales) sampled for the same prompts from the same noise, each row measured by
caption accuracy (with its error kinds and a 95% interval), a scene FID against real renders, and
the seconds per sample.

Every row starts from the same x_T, and stochastic samplers get their step noise from a generator
re-seeded alike, so two rows differ only in the guidance: their accuracies are paired, and
`paired_difference` gives an interval for a difference that is tighter than the two intervals
side by side. Word each comparison by it: "outside the noise" when the interval excludes 0.
"""
from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from course_lib.eval import attributes
from course_lib.nn.attributes import predict_codes
from course_lib.samplers import config as sampler_config
from course_lib.eval.sweep import noise_for


class CaptionRow(NamedTuple):
    label: str
    scale: float
    accuracy: float
    interval: tuple          # 95% Wilson interval of the accuracy
    errors: dict             # error kind -> share of images
    scene_fid: float         # against real renders, in the judge's features
    seconds_per_sample: float
    correct: torch.Tensor    # (n,) bool, paired across rows
    samples: torch.Tensor    # (n, 3, H, W) in [-1, 1], prompt-major (n_per_prompt per prompt)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def paired_difference(a: torch.Tensor, b: torch.Tensor, *, samples: int = 2000, seed: int = 0) -> tuple:
    """Mean of b - a over paired bool outcomes and its 95% bootstrap interval (resampling pairs)."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"paired outcomes must be two (n,) tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    d = b.double() - a.double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (samples, d.numel()), generator=g)
    boots = d[idx].mean(1).sort().values
    return float(d.mean()), (float(boots[int(0.025 * samples)]), float(boots[int(0.975 * samples) - 1]))


def noise_word(interval: tuple) -> str:
    """'outside the noise' when a difference's interval excludes 0, else 'within the noise'."""
    lo, hi = interval
    return "outside the noise" if lo > 0 or hi < 0 else "within the noise"


def caption_sweep(rows: Sequence[tuple], prompts: Sequence[str], n_per_prompt: int, sampler: sampler_config.SamplerConfig,
                  schedule, reference: torch.Tensor, *, image_shape=(3, 32, 32), seed: int = 0, batch_size: int = 128,
                  progress: bool = True, log: Callable[[str], None] | None = print, device=None) -> list:
    """Sample every prompt n_per_prompt times for each row and measure it.

    rows: (label, scale, eps_fn) triples, eps_fn a (guided) noise predictor taking cond = a list of
    captions; prompts: caption strings (the attributes they ask for are read by shapes.parse_caption);
    reference: real renders for the scene FID (as many as samples, or more).
    device: where the samples are drawn (the models' device; default the CPU). x_T and the step noise
    come from CPU generators on every device, so a row draws the same noise anywhere; the samples
    and `correct` come back on the CPU.
    """
    if not prompts or n_per_prompt < 1:
        raise ValueError("caption_sweep needs at least one prompt and n_per_prompt >= 1")
    captions = [p for p in prompts for _ in range(n_per_prompt)]
    want = attributes.as_codes(captions, len(captions))
    n = len(captions)
    x_T = noise_for(n, image_shape, seed).to(device or "cpu")
    out = []
    for label, scale, eps_fn in tqdm(list(rows), desc="rows", disable=not progress):
        t0 = time.time()
        chunks = []
        for lo in range(0, n, batch_size):
            g = torch.Generator().manual_seed(seed * 1_000_003 + lo)
            chunks.append(sampler_config.run(sampler, eps_fn, schedule, x_T[lo:lo + batch_size],
                                             cond=captions[lo:lo + batch_size], generator=g).clamp(-1, 1))
        x = torch.cat(chunks).cpu()
        seconds = (time.time() - t0) / n
        judge = attributes.judge()
        got = predict_codes(judge, x.to(next(judge.parameters()).device)).cpu()
        r = attributes.score_codes(want, got)
        fid = attributes.scene_fid(x, reference) if n >= 2 else float("nan")
        row = CaptionRow(label, scale, r.accuracy, wilson_interval(int(r.correct.sum()), n), r.errors, fid,
                         seconds, r.correct, x)
        out.append(row)
        if log is not None:
            log(f"{label:28s} s={scale:<7g} accuracy {100 * r.accuracy:5.1f}% "
                f"[{100 * row.interval[0]:.0f}, {100 * row.interval[1]:.0f}]  scene FID {fid:7.2f}  "
                f"{seconds:.3f} s/sample")
    return out


def table(rows: Sequence[CaptionRow]) -> str:
    """A plain-text table of a sweep, error kinds as percentages."""
    kinds = [k for k in attributes.ERROR_KINDS if any(r.errors.get(k, 0) > 0 for r in rows)]
    head = f"{'row':28s} {'scale':>7s} {'accuracy':>9s} {'95% interval':>13s} {'scene FID':>9s} {'s/sample':>8s}  " + \
        "  ".join(f"{k:>14s}" for k in kinds)
    lines = [head]
    for r in rows:
        lines.append(f"{r.label:28s} {r.scale:7g} {100 * r.accuracy:8.1f}% {100 * r.interval[0]:6.1f}-{100 * r.interval[1]:4.1f}% "
                     f"{r.scene_fid:9.2f} {r.seconds_per_sample:8.3f}  " + "  ".join(f"{100 * r.errors.get(k, 0):13.1f}%" for k in kinds))
    return "\n".join(lines)
