"""Caption sweeps: the Wilson interval against known values, the paired bootstrap, the wording,
and a two-row sweep of a toy noise predictor measured by the shipped judge."""
import pytest
import torch

from course_lib.data import shapes
from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas
from course_lib.eval import caption_sweep as cs
from course_lib.samplers.config import SamplerConfig
from course_lib.training.checkpoints import CHECKPOINT_DIR


def test_wilson_interval_known_values():
    lo, hi = cs.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = cs.wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)


def test_paired_difference_and_wording():
    a = torch.tensor([True, False] * 50)
    mean, (lo, hi) = cs.paired_difference(a, a)
    assert mean == 0 and lo == 0 and hi == 0 and cs.noise_word((lo, hi)) == "within the noise"
    b = torch.ones(100, dtype=torch.bool)
    mean, iv = cs.paired_difference(a, b)
    assert mean == pytest.approx(0.5) and iv[0] > 0.35 and cs.noise_word(iv) == "outside the noise"
    with pytest.raises(ValueError, match="paired"):
        cs.paired_difference(a, b[:10])


@pytest.mark.skipif(not (CHECKPOINT_DIR / "shapes_attributes.safetensors").exists(), reason="shapes_attributes not built")
def test_sweep_of_a_toy_predictor():
    sched = NoiseSchedule.from_betas(cosine_betas(1000))
    real = shapes.ShapesDataset("test", 32, 8, seed=0).images

    def zero(x, t, cond=None):
        assert isinstance(cond, list) and len(cond) == x.shape[0]
        return torch.zeros_like(x)
    rows = cs.caption_sweep([("toy", 0.0, zero), ("toy again", 1.0, zero)], ["a red circle", "a blue square above a red cross"],
                            2, SamplerConfig(method="ddim", steps=3), sched, real, batch_size=3, progress=False, log=None)
    assert [r.label for r in rows] == ["toy", "toy again"]
    assert rows[0].samples.shape == (4, 3, 32, 32) and torch.equal(rows[0].samples, rows[1].samples)
    assert 0 <= rows[0].accuracy <= 1 and rows[0].interval[0] <= rows[0].accuracy <= rows[0].interval[1]
    assert "toy again" in cs.table(rows)
    with pytest.raises(ValueError, match="at least one prompt"):
        cs.caption_sweep([("toy", 0.0, zero)], [], 2, SamplerConfig(method="ddim", steps=3), sched, real)


def _sweep_on(device):
    sched = NoiseSchedule.from_betas(cosine_betas(1000))
    real = shapes.ShapesDataset("test", 32, 8, seed=0).images
    seen = set()

    def shrink(x, t, cond=None):
        seen.add(x.device)
        return 0.1 * x
    rows = cs.caption_sweep([("toy", 1.0, shrink)], ["a red circle", "a blue square above a red cross"], 2,
                            SamplerConfig(method="ddpm", steps=3, variance="small"), sched, real, batch_size=3, progress=False, log=None,
                            device=device)
    return rows[0], seen


@pytest.mark.skipif(not (CHECKPOINT_DIR / "shapes_attributes.safetensors").exists(), reason="shapes_attributes not built")
def test_sweep_samples_on_the_device_and_returns_cpu_tensors():
    default, seen_default = _sweep_on(None)
    row, seen = _sweep_on("cpu")
    assert seen == seen_default == {torch.device("cpu")}
    assert row.samples.device.type == row.correct.device.type == "cpu"
    assert torch.equal(row.samples, default.samples) and row.accuracy == default.accuracy


@pytest.mark.skipif(not torch.cuda.is_available() or not (CHECKPOINT_DIR / "shapes_attributes.safetensors").exists(),
                    reason="needs a CUDA GPU and shapes_attributes")
def test_sweep_on_cuda_draws_the_cpu_noise():
    cpu, _ = _sweep_on("cpu")
    row, seen = _sweep_on("cuda")
    assert {d.type for d in seen} == {"cuda"}
    assert row.samples.device.type == row.correct.device.type == "cpu"
    torch.testing.assert_close(row.samples, cpu.samples, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not (CHECKPOINT_DIR / "shapes_attributes.safetensors").exists(), reason="shapes_attributes not built")
def test_sweep_on_the_simulated_gpu_gives_the_cpus_numbers(sim):
    cpu, _ = _sweep_on("cpu")
    row, seen = _sweep_on(sim)
    assert seen == {sim}
    assert row.samples.device == row.correct.device == torch.device("cpu")
    assert torch.equal(row.samples, cpu.samples) and row.accuracy == cpu.accuracy and row.scene_fid == cpu.scene_fid
