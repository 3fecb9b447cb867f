"""COURSE_DEVICE=sim (course_lib.simdevice): the CPU stand-in for a GPU fails where CUDA fails
(tensors on two devices in one op, device memory read as numpy, a CPU generator drawing on the
device), lets through what CUDA lets through (0-dim host scalars, host index tensors, copy_),
and leaves every number as the CPU computes it, through sampling, guidance gradients and training."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from course_lib import runtime, simdevice
from course_lib.simdevice import SIM, SimDeviceError, SimTensor


def test_device_sim_is_cpu0_and_named(sim):
    assert sim == torch.device("cpu", 0) and simdevice.is_sim(sim)
    assert "simulated GPU" in runtime.describe(sim, bf16=False)
    assert not simdevice.is_sim(torch.device("cpu"))


def test_disable_restores_plain_cpu():
    runtime.device("sim")
    simdevice.disable()
    assert not simdevice.enabled()
    x = torch.zeros(2, device=torch.device("cpu", 0))
    assert type(x) is torch.Tensor and x.device == torch.device("cpu")
    assert not torch.__future__.get_overwrite_module_params_on_conversion()


def test_placement_propagates_as_on_cuda(sim):
    x = torch.randn(3, 4).to(sim)
    assert isinstance(x, SimTensor) and x.device == sim
    assert (x * 2 + 1).device == sim and torch.cat([x, x]).device == sim and x.max(0).values.device == sim
    assert torch.zeros(3, device=x.device).device == sim and x.new_ones(2).device == sim
    assert torch.zeros_like(x).device == sim
    host = x.cpu()
    assert type(host) is torch.Tensor and host.device == torch.device("cpu")
    assert x.to("cpu").device == torch.device("cpu") and x.to(torch.float64).device == sim
    assert x.to(torch.randn(1)).device == torch.device("cpu") and torch.randn(2).to(x).device == sim


def test_mixing_host_and_device_tensors_is_the_cuda_error(sim):
    x, host = torch.randn(3, 4).to(sim), torch.randn(3, 4)
    for op in (lambda: x + host, lambda: torch.cat([x, host]), lambda: torch.where(host > 0, x, x),
               lambda: host @ x.T, lambda: torch.nn.functional.linear(host, x)):
        with pytest.raises(SimDeviceError, match="two devices"):
            op()
    assert (x + torch.tensor(2.0)).device == sim   # a 0-dim host tensor is a scalar, as on CUDA
    assert torch.equal((x + 2).cpu(), x.cpu() + 2)


def test_indexing_rules(sim):
    x = torch.arange(6.0).to(sim)
    assert torch.equal(x[torch.tensor([0, 2])].cpu(), torch.tensor([0.0, 2.0]))   # host indices are fine
    x[torch.tensor([True, False] * 3)] = 0.0
    with pytest.raises(SimDeviceError):
        x[torch.tensor([0, 1])] = torch.tensor([5.0, 6.0])       # a host value of 1+ dims
    with pytest.raises(SimDeviceError):
        torch.arange(6.0)[torch.tensor([0, 1]).to(sim)]           # a device index into a host tensor
    host = torch.zeros(6)
    host.copy_(x)                                                 # copy_ crosses devices
    assert torch.equal(host, x.cpu())


def test_numpy_needs_cpu_first(sim):
    x = torch.randn(2, 2).to(sim)
    with pytest.raises(SimDeviceError, match="numpy"):
        x.numpy()
    with pytest.raises(SimDeviceError, match="numpy"):
        np.asarray(x)
    assert np.asarray(x.cpu()).shape == (2, 2)
    assert isinstance(x.sum().item(), float) and len(x.tolist()) == 2
    assert f"{x.sum():.3f}" == f"{x.cpu().sum():.3f}" and f"{x}".startswith("tensor(")   # as on CUDA


def test_cpu_generator_cannot_draw_on_the_device(sim):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(SimDeviceError, match="generator"):
        torch.randn(3, generator=g, device=sim)
    a = torch.randn(3, generator=torch.Generator().manual_seed(0)).to(sim)
    assert torch.equal(a.cpu(), torch.randn(3, generator=torch.Generator().manual_seed(0)))


def test_modules_move_and_refuse_host_inputs(sim):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    m = copy.deepcopy(ref).to(sim)
    assert all(isinstance(p, SimTensor) and isinstance(p, torch.nn.Parameter) for p in m.parameters())
    x = torch.randn(5, 4)
    with pytest.raises(SimDeviceError):
        m(x)
    assert torch.equal(m(x.to(sim)).cpu(), ref(x))              # the CPU's numbers, bit for bit
    twin = copy.deepcopy(m)
    assert all(isinstance(p, SimTensor) and isinstance(p, torch.nn.Parameter) for p in twin.parameters())
    m.load_state_dict(ref.state_dict())                          # host weights load into a device model
    x_d = x.to(sim).requires_grad_()
    (g,) = torch.autograd.grad(m(x_d).sum(), x_d)
    assert g.device == sim
    m(x.to(sim)).square().mean().backward()
    assert all(p.grad.device == sim for p in m.parameters())
    torch.optim.Adam(m.parameters(), lr=1e-3).step()


def test_the_library_samples_and_trains_on_it_with_the_cpus_numbers(sim, tmp_path):
    """The DDPM loop with a CPU generator (noise drawn on the host, moved), a tiny GLIDE model's
    caption sampling and a few training steps give on SIM exactly what they give on the CPU."""
    from course_lib.models import glide
    from course_lib.samplers import loop
    from course_lib.training import recipes, trainer
    from tests.models.test_glide import SCHED, tiny
    net = tiny()
    on_sim = copy.deepcopy(net).to(sim)
    caps = ["a red circle", "a blue square"]
    a = glide.sample(net, caps, steps=3, scale=2.0, progress=False, seed=0)
    b = glide.sample(on_sim, caps, steps=3, scale=2.0, progress=False, seed=0)
    assert b.device == sim and torch.equal(a, b.cpu())
    eps_fn = lambda x, t, c: torch.zeros_like(x) + 0.1 * x      # noqa: E731
    xs = [loop.sample(eps_fn, SCHED, (2, 3, 8, 8), timesteps=None, generator=torch.Generator().manual_seed(1),
                      device=d, progress=False) for d in ("cpu", sim)]
    assert xs[1].device == sim and torch.equal(xs[0], xs[1].cpu())
    recipe = dataclasses.replace(recipes.get("tiny_ddpm"), steps=2, batch_size=4, checkpoint_every=2, warmup=1)
    data = (torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.zeros(16, dtype=torch.long))
    r_cpu = trainer.train(recipe, tmp_path / "cpu", data=data, progress=False, log_every=1, device="cpu")
    r_sim = trainer.train(recipe, tmp_path / "sim", data=data, progress=False, log_every=1, device=sim)
    assert r_cpu.losses == r_sim.losses
    assert all(torch.equal(p.cpu(), q) for p, q in zip(r_sim.model.parameters(), r_cpu.model.parameters()))


def test_the_steps_draw_with_a_cpu_generator_for_device_samples(sim):
    """q_sample, ddpm_step and ddim_step(eta=1) given a CPU generator and device tensors draw on the
    generator's device and move the noise (CUDA refuses the draw itself): the CPU's numbers."""
    from course_lib.diffusion import formulas
    from course_lib.diffusion.schedules import NoiseSchedule, cosine_betas
    from course_lib.samplers.ddim import ddim_step
    from course_lib.samplers.ddpm import ddpm_step
    sched = NoiseSchedule.from_betas(cosine_betas(1000))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t, t_prev = torch.tensor([500, 500]), torch.tensor([499, 499])
    t_skip = torch.tensor([400, 400])
    runs = {}
    for d in ("cpu", sim):
        g = lambda: torch.Generator().manual_seed(7)      # noqa: E731
        xd, ed, td, tpd, tsd = (v.to(d) for v in (x, eps, t, t_prev, t_skip))
        runs[str(d)] = (formulas.q_sample(sched, xd, td, generator=g()),
                        ddpm_step(sched, xd, td, tpd, ed, generator=g()).x_prev,
                        ddim_step(sched, xd, td, tsd, ed, eta=1.0, generator=g()).x_prev)
    for a, b in zip(runs["cpu"], runs[str(sim)]):
        assert b.device == sim and torch.equal(a, b.cpu())
