"""The device and the threads: runtime.device() honours an explicit device and COURSE_DEVICE, a CUDA
request without CUDA is a clear error everywhere it can be made (runtime, trainer, load_pretrained, the
`course` command), thread counts come from COURSE_THREADS / OMP_NUM_THREADS / the affinity mask, and
a CUDA run (marked `cuda`, skipped without a GPU) draws the same numbers as a CPU run."""
import dataclasses

import pytest
import torch

from course_lib import cli, runtime
from course_lib.diffusion import formulas, schedules
from course_lib.samplers import loop
from course_lib.samplers.ddim import ddim_step
from course_lib.samplers.ddpm import ddpm_step
from course_lib.samplers.dpm_solver import DPMSolverPP2M
from course_lib.training import checkpoints, recipes, trainer

cuda_present = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_default_explicit_and_environment(no_cuda, monkeypatch):
    assert runtime.device() == torch.device("cpu") and runtime.device("cpu") == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert runtime.device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.device() == torch.device("cpu")            # COURSE_DEVICE wins over CUDA being present
    assert runtime.device("cuda:1") == torch.device("cuda", 1)  # and an explicit device over COURSE_DEVICE
    monkeypatch.delenv("COURSE_DEVICE")
    assert runtime.device() == torch.device("cuda") == runtime.default_device()
    with pytest.raises(runtime.DeviceError, match="2 CUDA device"):
        runtime.device("cuda:2")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(no_cuda, monkeypatch, name):
    with pytest.raises(runtime.DeviceError, match=f"{name!r} asked for.*CUDA is not available.*--device cpu"):
        runtime.device(name)
    monkeypatch.setenv("COURSE_DEVICE", name)
    with pytest.raises(runtime.DeviceError, match="COURSE_DEVICE"):
        runtime.device()


@pytest.mark.parametrize("name", ["tpu", "gpu", "mps", "cuda:x"])
def test_unknown_devices(name):
    with pytest.raises(runtime.DeviceError, match="cpu, cuda or cuda:N"):
        runtime.device(name)


def test_threads_from_the_environment_and_the_affinity_mask(monkeypatch):
    for var in ("COURSE_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5, 8}, raising=False)
    assert runtime.threads() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                 # torchrun: 4 ranks share this node's CPUs
    assert runtime.threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.threads() == 3
    monkeypatch.setenv("COURSE_THREADS", "5")                   # COURSE_THREADS wins
    assert runtime.threads() == 5
    for bad in ("0", "two"):
        monkeypatch.setenv("COURSE_THREADS", bad)
        with pytest.raises(ValueError, match="COURSE_THREADS"):
            runtime.threads()


def test_set_threads_and_describe(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("COURSE_THREADS", "1")
        monkeypatch.setenv("COURSE_BF16", "0")
        assert runtime.set_threads() == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)                     # the caller's own choice, made after the course's
        assert runtime.ensure_threads() == 2 and torch.get_num_threads() == 2
        torch.set_num_threads(1)
        line = runtime.describe("cpu")
        assert line.startswith("device cpu (") and "fp32" in line and line.endswith("1 CPU thread")
        monkeypatch.setenv("COURSE_BF16", "1")
        assert "bf16 autocast" in runtime.describe("cpu") and "fp32" in runtime.describe("cpu", bf16=False)
        assert runtime.precision("cpu", False) == "fp32"
        assert runtime.cpu_name() in runtime.hardware("cpu")
    finally:
        torch.set_num_threads(before)


def _tiny(**changes):
    return dataclasses.replace(recipes.get("tiny_ddpm"), **({"steps": 2, "batch_size": 2, "bf16": False} | changes))


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def test_trainer_honours_the_device_and_refuses_missing_cuda(no_cuda, tmp_path):
    result = trainer.train(_tiny(), tmp_path / "cpu", data=_data(), progress=False, device="cpu")
    assert {p.device.type for p in result.raw_model.parameters()} == {"cpu"}
    with pytest.raises(runtime.DeviceError, match="CUDA is not available"):
        trainer.train(_tiny(), tmp_path / "cuda", data=_data(), progress=False, device="cuda")
    assert not (tmp_path / "cuda").exists() or not any((tmp_path / "cuda").iterdir())


def test_course_train_with_missing_cuda_exits_2(no_cuda, tmp_path, capsys):
    assert cli.main(["train", "tiny_ddpm", "--out", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("course: ") and "CUDA is not available" in err
    assert not (tmp_path / "tiny_ddpm.state.safetensors").exists()


def test_load_pretrained_honours_the_device(no_cuda, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINT_DIR", tmp_path)
    model = recipes.get("tiny_ddpm").build_model()
    checkpoints.save_pair(tmp_path / "tiny_ddpm.safetensors", model, {"name": "tiny_ddpm"})
    loaded = checkpoints.load_pretrained("tiny_ddpm", device="cpu")
    assert next(loaded.parameters()).device.type == "cpu"
    with pytest.raises(runtime.DeviceError, match="CUDA is not available"):
        checkpoints.load_pretrained("tiny_ddpm", device="cuda")


def _oracle(sched, x0):
    def eps_fn(x_t, t, cond=None):
        return formulas.eps_from_x0(sched, x_t, t, x0.expand_as(x_t).to(x_t.device, x_t.dtype))
    return eps_fn


@pytest.mark.parametrize("step,kw", [(ddpm_step, {"variance": "large"}), (ddim_step, {"eta": 0.5}),
                                     (ddim_step, {"eta": 0.0}), (DPMSolverPP2M(), {})])
def test_noise_drawn_where_the_generator_is_equals_the_steps_own_draws(monkeypatch, step, kw):
    """With a generator on another device (a CPU generator, CUDA samples) the loop draws each step's noise
    itself and passes it on: exactly the noise the step would have drawn, step for step."""
    sched = schedules.schedule("linear", 20)
    x0 = torch.full((1, 1, 2, 2), 0.3)
    kw = kw | {"timesteps": None if step is ddpm_step else [0, 6, 13, 19]}
    run = lambda: loop.sample(_oracle(sched, x0), sched, (3, 1, 2, 2), step=step, progress=False,
                              generator=torch.Generator().manual_seed(4), **kw)
    own = run()
    calls = []
    draws = loop._draws_noise
    monkeypatch.setattr(loop, "_draws_noise", lambda s, k: calls.append(draws(s, k)) or calls[-1])
    monkeypatch.setattr(loop, "_elsewhere", lambda generator, device: True)   # the CUDA path, on the CPU
    predrawn = run()
    assert torch.equal(own, predrawn) and calls


@pytest.mark.cuda
@cuda_present
def test_cuda_sampling_matches_the_cpu():
    sched = schedules.schedule("linear", 20)
    x0 = torch.full((1, 1, 2, 2), 0.3)
    kw = dict(step=ddpm_step, progress=False, variance="large")
    cpu = loop.sample(_oracle(sched, x0), sched, (3, 1, 2, 2), generator=torch.Generator().manual_seed(4), **kw)
    gpu = loop.sample(_oracle(sched, x0), sched, (3, 1, 2, 2), generator=torch.Generator().manual_seed(4),
                      device="cuda", **kw)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@cuda_present
def test_cuda_training_matches_the_cpu_and_resumes_across_devices(tmp_path, monkeypatch):
    """Same numbers drawn on both devices (CPU generators); a state file written on CUDA resumes on the CPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)    # fp32 convolutions, as on the CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    recipe = _tiny(steps=4, checkpoint_every=2)
    cpu = trainer.train(recipe, tmp_path / "cpu", data=_data(), progress=False, device="cpu", log_every=1)
    gpu = trainer.train(recipe, tmp_path / "gpu", steps=2, data=_data(), progress=False, device="cuda", log_every=1)
    assert next(gpu.raw_model.parameters()).device.type == "cuda"
    resumed = trainer.train(recipe, tmp_path / "gpu", data=_data(), progress=False, device="cpu", log_every=1)
    assert resumed.start_step == 2 and next(resumed.raw_model.parameters()).device.type == "cpu"
    for a, b in zip(cpu.raw_model.state_dict().values(), resumed.raw_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    assert [l for _, l in cpu.losses] == pytest.approx([l for _, l in gpu.losses + resumed.losses], rel=1e-3)


@pytest.mark.cuda
@cuda_present
def test_load_pretrained_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINT_DIR", tmp_path)
    checkpoints.save_pair(tmp_path / "tiny_ddpm.safetensors", recipes.get("tiny_ddpm").build_model(), {"name": "tiny_ddpm"})
    assert next(checkpoints.load_pretrained("tiny_ddpm", device="cuda").parameters()).device.type == "cuda"
