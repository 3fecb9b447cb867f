"""fid_sweep: every row from the same x_T and step noise, the same n, rows in order."""
import pytest
import torch

from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas
from course_lib.eval import fid as fid_lib
from course_lib.eval import sweep
from course_lib.samplers import config as sc

SCHEDULE = NoiseSchedule.from_betas(cosine_betas(100))


def eps_fn(x, t, cond=None):
    return 0.3 * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype) / 100


class PixelEvaluator:
    """FID on the first 8 pixels: enough to tell two sample sets apart."""

    def __init__(self):
        self.calls = []

    def fid(self, x):
        self.calls.append(x.shape[0])
        ref = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)) * 0.5
        return fid_lib.fid_from_features(x.flatten(1)[:, :8], ref)


def test_rows_share_x_T_and_step_noise_and_n():
    configs = [sc.SamplerConfig(steps=5), sc.SamplerConfig(steps=5, eta=1.0), sc.SamplerConfig(steps=5, eta=1.0),
               sc.SamplerConfig(steps=5)]
    ev = PixelEvaluator()
    rows = sweep.fid_sweep(ev, configs, eps_fn, SCHEDULE, 37, shape=(1, 4, 4), batch_size=16, keep=5, log=None)
    assert [r.config for r in rows] == configs and ev.calls == [37] * 4
    assert torch.equal(rows[0].samples, rows[3].samples) and rows[0].fid == rows[3].fid
    assert torch.equal(rows[1].samples, rows[2].samples)          # the step noise is re-seeded per row
    assert not torch.equal(rows[0].samples, rows[1].samples)
    assert rows[0].samples.shape == (5, 1, 4, 4) and all(r.seconds >= 0 for r in rows)


def test_samples_are_the_configs_run_from_noise_for_seed():
    cfg = sc.SamplerConfig(steps=4)
    rows = sweep.fid_sweep(PixelEvaluator(), [cfg], eps_fn, SCHEDULE, 6, shape=(1, 4, 4), seed=3, batch_size=4,
                           log=None)
    x_T = sweep.noise_for(6, (1, 4, 4), seed=3)
    torch.testing.assert_close(rows[0].samples, sc.run(cfg, eps_fn, SCHEDULE, x_T))


def test_log_gets_one_line_per_row_and_n_below_2_is_an_error():
    lines = []
    sweep.fid_sweep(PixelEvaluator(), [sc.SamplerConfig(steps=3)], eps_fn, SCHEDULE, 4, shape=(1, 4, 4),
                    log=lines.append)
    assert len(lines) == 1 and "DDIM eta=0, 3 steps" in lines[0] and "FID" in lines[0]
    with pytest.raises(ValueError, match="at least 2"):
        sweep.fid_sweep(PixelEvaluator(), [sc.SamplerConfig(steps=3)], eps_fn, SCHEDULE, 1, log=None)


class LabelEvaluator(PixelEvaluator):
    """predict: class 1 when the mean pixel is positive, else 0; a fixed IS."""

    def predict(self, x):
        return (x.mean((1, 2, 3)) > 0).long()

    def inception_score(self, x):
        return 1.5


def test_guided_sweep_rows_share_noise_and_ask_for_balanced_classes():
    seen = []

    def pushes(sign):
        def fn(x, t, cond=None):
            seen.append(cond.clone())
            return eps_fn(x, t) - sign * (2 * cond.view(-1, 1, 1, 1).to(x.dtype) - 1)   # eps down: x up for class 1
        return fn

    ev = LabelEvaluator()
    fns = {"toward": pushes(1.0), "away": pushes(-1.0), "toward again": pushes(1.0)}
    rows = sweep.guided_sweep(ev, fns, SCHEDULE, 12, config=sc.SamplerConfig(steps=4), num_classes=2,
                              shape=(1, 4, 4), batch_size=5, log=None)
    assert [r.label for r in rows] == list(fns) and ev.calls == [12] * 3
    assert rows[0].labels.tolist() == [0, 1] * 6 and seen[0].tolist() == [0, 1, 0, 1, 0]  # batch 1 of 5
    assert torch.equal(rows[0].samples, rows[2].samples) and rows[0].samples.shape == (12, 1, 4, 4)
    assert rows[0].accuracy == 1.0 and rows[1].accuracy == 0.0 and rows[0].inception_score == 1.5


def test_by_class_groups_samples_and_guided_sweep_errors():
    row = sweep.GuidedRow("x", 0.0, 1.0, 1.0, 0.0, torch.arange(6.0).view(6, 1, 1, 1), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert sweep.by_class(row, 2, num_classes=2).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="class 0"):
        sweep.by_class(row, 4, num_classes=2)
    with pytest.raises(ValueError, match="empty"):
        sweep.guided_sweep(LabelEvaluator(), {}, SCHEDULE, 4)
    with pytest.raises(ValueError, match="at least 2"):
        sweep.guided_sweep(LabelEvaluator(), {"a": eps_fn}, SCHEDULE, 1)


class FeatureEvaluator:
    """features = the first 6 pixels; the reference = 400 Gaussian draws of them."""

    def features(self, x):
        return x.flatten(1)[:, :6].double()

    def reference_features(self):
        return torch.randn(400, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _images(n, scale, seed):
    return (torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * scale)


def test_fid_table_values_intervals_and_paired_differences():
    ev = FeatureEvaluator()
    base = _images(200, 1.0, 0)
    same = base.clone()
    far = base * 3.0                                  # paired with base, far from the reference
    rows = sweep.fid_table(ev, {"base": base, "same": same, "far": far, "short": base[:100]},
                           baseline="base", n_boot=200)
    by = {r.label: r for r in rows}
    assert [r.label for r in rows] == ["base", "same", "far", "short"]
    ref = ev.reference_features()
    for label, x in [("base", base), ("far", far)]:
        assert by[label].fid == pytest.approx(fid_lib.fid_from_features(ev.features(x), ref))
        lo, hi = by[label].interval
        assert lo <= by[label].fid <= hi
    assert (by["base"].difference, by["base"].difference_interval, by["base"].word) == (0.0, (0.0, 0.0), "baseline")
    assert by["same"].difference == 0.0 and by["same"].difference_interval == (0.0, 0.0)
    assert by["same"].word == "within the noise"
    assert by["far"].difference > 0 and by["far"].difference_interval[0] > 0
    assert by["far"].word == "outside the noise"
    assert by["short"].difference is None and by["short"].word is None      # not paired with the baseline
    text = sweep.format_fid_table(rows, baseline_name="base")
    assert "outside the noise" in text and "(baseline: base)" in text and len(text.splitlines()) == 4


def test_fid_table_without_baseline_and_bad_input():
    ev = FeatureEvaluator()
    rows = sweep.fid_table(ev, {"a": _images(50, 1.0, 1)}, n_boot=50)
    assert rows[0].difference is None and rows[0].word is None
    with pytest.raises(ValueError, match="empty"):
        sweep.fid_table(ev, {})
    with pytest.raises(KeyError, match="baseline 'zz'"):
        sweep.fid_table(ev, {"a": _images(50, 1.0, 1)}, baseline="zz")
