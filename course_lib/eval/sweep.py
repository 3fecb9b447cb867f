"""FID of several samplers on one model, every row from the same noise (lesson 03's steps-vs-FID
table, the DDIM paper's Table 1 in miniature), and of several guided noise predictors under one
sampler (`guided_sweep`: lessons 04-05's guidance-scale sweeps, with class accuracy and the
Inception-Score analogue beside FID).

All rows start from the same x_T (one generator seeded by `seed` draws all n of them up front),
and stochastic samplers get their step noise from a generator re-seeded alike for every row, so
two rows differ only in the sampler. FID depends on the sample count, so every row uses the same
n; report the evaluator's real_fid(n) beside the table.

`device=` runs the sampling there (the noise is still drawn on the CPU, so every device starts from
the same x_T); the rows' samples come back on the CPU.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, NamedTuple, Sequence

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
              log: Callable[[str], None] | None = print, device=None) -> list:
    """For each config: n samples from the shared x_T, their FID (evaluator.fid), the sampling time.

    evaluator: anything with .fid(images) (a FashionEvaluator). log(line) is called after each row
    (None: silent). Returns one SweepRow per config, in order.
    """
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got n={n}")
    x_T = noise_for(n, shape, seed).to(device or "cpu")
    rows = []
    for config in configs:
        generator = torch.Generator().manual_seed(seed + 1)      # the same step noise for every row
        t0 = time.time()
        samples = torch.cat([sampler_config.run(config, eps_fn, schedule, x_T[i:i + batch_size], generator=generator)
                             for i in range(0, n, batch_size)]).cpu()
        seconds = time.time() - t0
        rows.append(SweepRow(config, evaluator.fid(samples), seconds, samples[:keep].clone()))
        if log is not None:
            log(f"{config.label:45s} FID {rows[-1].fid:8.2f}   "
                f"({seconds:.0f} s, {seconds / n * 1000:.0f} ms per sample)")
    return rows


class GuidedRow(NamedTuple):
    label: str               # the key of eps_fns this row measured
    fid: float
    accuracy: float          # share of samples the eval classifier assigns to the class they were asked for
    inception_score: float   # exp E[KL(p(y|x) || p(y))] under the eval classifier (evaluator.inception_score)
    seconds: float           # wall time of the sampling (not of the metrics)
    samples: torch.Tensor    # all n samples, (n, C, H, W)
    labels: torch.Tensor     # the class each sample was asked for, (n,)


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: n labels covering every class equally (up to n mod K)."""
    return torch.arange(n) % num_classes


def guided_sweep(evaluator, eps_fns: Mapping[str, Callable], schedule, n: int, *,
                 config: sampler_config.SamplerConfig = sampler_config.SamplerConfig("ddim", 25),
                 num_classes: int = 10, shape: Sequence[int] = (1, 28, 28), seed: int = 0, batch_size: int = 100,
                 log: Callable[[str], None] | None = print, device=None) -> list:
    """For each labelled noise predictor eps_fns[label](x_t, t, cond=y): n samples asked for the balanced
    classes balanced_labels(n), drawn with `config` from the same x_T (and the same step noise), then
    their FID, class accuracy and Inception-Score analogue by `evaluator` (a FashionEvaluator).

    Rows differ only in the noise predictor, so a guidance sweep (eps_fns = {f"s={s}": guided(s) ...})
    measures guidance alone. Returns one GuidedRow per entry, in order; log(line) after each (None: silent).
    """
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got n={n}")
    if not eps_fns:
        raise ValueError("eps_fns is empty: pass {label: noise predictor}")
    x_T, y = noise_for(n, shape, seed).to(device or "cpu"), balanced_labels(n, num_classes)
    y_dev = y.to(x_T.device)
    rows = []
    for label, eps_fn in eps_fns.items():
        generator = torch.Generator().manual_seed(seed + 1)
        t0 = time.time()
        samples = torch.cat([sampler_config.run(config, eps_fn, schedule, x_T[i:i + batch_size],
                                                cond=y_dev[i:i + batch_size], generator=generator)
                             for i in range(0, n, batch_size)]).cpu()
        seconds = time.time() - t0
        accuracy = float((evaluator.predict(samples) == y).double().mean())
        rows.append(GuidedRow(label, evaluator.fid(samples), accuracy, evaluator.inception_score(samples),
                              seconds, samples, y))
        if log is not None:
            r = rows[-1]
            log(f"{label:28s} FID {r.fid:7.2f}   accuracy {100 * r.accuracy:5.1f}%   IS {r.inception_score:5.2f}   "
                f"({seconds:.0f} s, {seconds / n * 1000:.0f} ms per sample)")
    return rows


def by_class(row: GuidedRow, per_class: int, num_classes: int = 10) -> torch.Tensor:
    """The first per_class samples of each class of a GuidedRow, class by class: (num_classes * per_class, C, H, W),
    ready for a grid with nrow=per_class."""
    picks = []
    for c in range(num_classes):
        idx = (row.labels == c).nonzero().flatten()[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"the row holds {len(idx)} samples of class {c}; asked for {per_class}")
        picks.append(row.samples[idx])
    return torch.cat(picks)


class FidRow(NamedTuple):
    """One row of an FID table with its noise: the FID and its interval (`fid.fid_interval`), and
    against the table's baseline row the paired difference (this row minus the baseline) with its
    interval (`fid.paired_fid_difference`) and its wording ("outside the noise" / "within the noise").
    The baseline row itself has difference 0.0, interval (0.0, 0.0) and word "baseline"."""
    label: str
    fid: float
    interval: tuple
    difference: float | None
    difference_interval: tuple | None
    word: str | None


def fid_table(evaluator, samples: Mapping[str, torch.Tensor], *, baseline: str | None = None, n_boot: int = 500,
              seed: int = 0, level: float = 0.95) -> list:
    """FID with a `level` interval for each labelled set of samples, and, when `baseline` names one of
    them, each row's paired FID difference from it. Rows must be paired for the difference: sample i
    of every set drawn from the same x_T (what `fid_sweep` and `guided_sweep` do), so a set with a
    different count than the baseline gets no difference (None).

    evaluator: a FashionEvaluator (or anything with .features(x) and .reference_features()).
    samples: {label: (N, C, H, W) images}, e.g. {r.label: r.samples for r in guided_rows}.
    Returns one FidRow per label, in order; `format_fid_table` prints them.
    """
    from course_lib.eval import fid as fid_lib
    if not samples:
        raise ValueError("samples is empty: pass {label: images}")
    if baseline is not None and baseline not in samples:
        raise KeyError(f"baseline {baseline!r} is not one of the rows {list(samples)}")
    reference = evaluator.reference_features()
    feats = {label: evaluator.features(x) for label, x in samples.items()}
    rows = []
    for label, f in feats.items():
        est = fid_lib.fid_interval(f, reference, n_boot=n_boot, seed=seed, level=level)
        diff = diff_iv = word = None
        if baseline is not None and label == baseline:
            diff, diff_iv, word = 0.0, (0.0, 0.0), "baseline"
        elif baseline is not None and f.shape[0] == feats[baseline].shape[0]:
            d = fid_lib.paired_fid_difference(feats[baseline], f, reference, n_boot=n_boot, seed=seed, level=level)
            diff, diff_iv, word = d.value, d.interval, fid_lib.noise_word(d.interval)
        rows.append(FidRow(label, est.value, est.interval, diff, diff_iv, word))
    return rows


def format_fid_table(rows: Sequence[FidRow], *, baseline_name: str | None = None) -> str:
    """The rows of `fid_table` as aligned text: label, FID [interval], and the difference from the
    baseline [interval] with its wording."""
    width = max(len(r.label) for r in rows)
    lines = []
    for r in rows:
        line = f"{r.label:{width}s}  FID {r.fid:7.2f} [{r.interval[0]:6.2f}, {r.interval[1]:6.2f}]"
        if r.word == "baseline":
            line += "   (baseline)" if baseline_name is None else f"   (baseline: {baseline_name})"
        elif r.difference is not None:
            lo, hi = r.difference_interval
            line += f"   {r.difference:+7.2f} [{lo:+7.2f}, {hi:+7.2f}]  {r.word}"
        lines.append(line)
    return "\n".join(lines)
