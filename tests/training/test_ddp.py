"""DistributedDataParallel: 2 gloo processes on the CPU take the same steps as one process on the same
global batch, and a DDP run stopped and resumed ends where the uninterrupted one does."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib.training import distributed, trainer
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")
_spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _state(path, prefix):
    return {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The worker under torchrun with 2 ranks (gloo, one thread each), once for the module's tests."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "COURSE_DEVICE")}
    env |= {"OMP_NUM_THREADS": "1", "COURSE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(out)], capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_two_ranks_equal_one_process_on_the_same_global_batch(ddp_run, tmp_path):
    single = trainer.train(worker.recipe(), tmp_path, data=worker.data(), progress=False, log_every=1, device="cpu")
    state = ddp_run / "straight" / "ddp_toy.state.safetensors"
    for prefix, model in (("model.", single.raw_model), ("ema.", single.model)):
        ddp = _state(state, prefix)
        ours = model.state_dict()
        assert ddp.keys() == ours.keys()
        for k in ours:   # equal up to the order of fp32 sums (two shard means averaged vs one batch mean)
            torch.testing.assert_close(ddp[k], ours[k], rtol=1e-4, atol=1e-6, msg=f"{prefix}{k}")
    # and the weights really moved in those steps
    torch.manual_seed(0)
    init = worker.recipe().build_model().state_dict()
    assert not torch.allclose(init["conv_in.weight"], single.raw_model.state_dict()["conv_in.weight"])
    logged = json.loads((ddp_run / "losses.json").read_text())
    assert logged["world_size"] == 2 and logged["threads"] == 1
    steps, losses = zip(*logged["straight"])
    assert list(steps) == [s for s, _ in single.losses]
    assert losses == pytest.approx([l for _, l in single.losses], rel=1e-4)   # the global batch's loss


def test_ranks_hold_the_same_weights(ddp_run):
    a, b = load_file(str(ddp_run / "raw.rank0.safetensors")), load_file(str(ddp_run / "raw.rank1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_stopped_and_resumed_ends_where_the_uninterrupted_run_does(ddp_run):
    straight = load_file(str(ddp_run / "straight" / "ddp_toy.state.safetensors"))
    resumed = load_file(str(ddp_run / "resumed" / "ddp_toy.state.safetensors"))
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"differ after resume: {different[:5]}"
    logged = json.loads((ddp_run / "losses.json").read_text())
    assert logged["resumed"] == logged["straight"]


def test_shards_are_the_rows_of_one_global_draw():
    """A rank's t, noise and label dropout are its rows of what one process draws for the whole batch."""
    g = lambda: trainer.step_generator(0, 3)
    like = torch.zeros(4, 1, 2, 2)
    whole = (trainer.batch_randn(g(), like), trainer.batch_randint(g(), 10, like), trainer.batch_rand(g(), like))
    token = trainer._SHARD.set(trainer.Shard(4, 8, 8))
    try:
        mine = (trainer.batch_randn(g(), like), trainer.batch_randint(g(), 10, like), trainer.batch_rand(g(), like))
    finally:
        trainer._SHARD.reset(token)
    full = torch.zeros(8, 1, 2, 2)
    expect = (trainer.batch_randn(g(), full)[4:], trainer.batch_randint(g(), 10, full)[4:],
              trainer.batch_rand(g(), full)[4:])
    for a, b in zip(mine, expect):
        assert torch.equal(a, b)
    # with one process the helpers draw exactly what torch would have drawn directly
    assert torch.equal(whole[0], torch.randn(like.shape, generator=g()))
    assert torch.equal(whole[1], torch.randint(0, 10, (4,), generator=g()))
    assert torch.equal(whole[2], torch.rand(4, generator=g()))


def test_shard_rows_and_uneven_batches():
    ctx = lambda r: distributed.Context(r, 4, torch.device("cpu"))
    assert [distributed.shard(8, ctx(r)) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match="does not split evenly over 4 ranks"):
        distributed.shard(10, ctx(0))
    one = distributed.Context(0, 1, torch.device("cpu"))
    assert distributed.shard(10, one) == slice(0, 10) and distributed.wrap(torch.nn.Linear(1, 1), one).__class__ is torch.nn.Linear
