"""One rank of the DDP tests (tests/training/test_ddp.py), started by torchrun:

  torchrun --standalone --nproc-per-node=2 tests/training/ddp_worker.py OUT_DIR

Trains the tests' toy recipe three ways on the CPU with gloo: 4 steps straight into OUT_DIR/straight,
then 2 steps into OUT_DIR/resumed and a second call that resumes there to 4. Rank 0 writes the state
files (the trainer's) and its logged losses; every rank writes its own raw weights, so the test can
check that the replicas agree.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

from course_lib.nn.unet import UNetConfig
from course_lib.training import checkpoints, distributed, recipes, trainer

STEPS, STOP = 4, 2


def recipe():
    """A class-conditional toy (8x8 images, ~20k parameters) with label dropout: every random draw
    of the diffusion loss (batch, t, noise, dropped labels) is exercised. fp32, global batch 8."""
    cfg = UNetConfig(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), head_channels=8, norm_groups=4, num_classes=3)
    return dataclasses.replace(recipes.get("tiny_ddpm"), name="ddp_toy", model_config=cfg, steps=STEPS,
                               batch_size=8, warmup=2, checkpoint_every=100, label_dropout=0.3,
                               bf16=False, ema_decay=0.9)


def data(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


def main(out: Path) -> None:
    r, d = recipe(), data()
    straight = trainer.train(r, out / "straight", data=d, progress=False, log_every=1, device="cpu")
    first = trainer.train(r, out / "resumed", steps=STOP, data=d, progress=False, log_every=1, device="cpu")
    resumed = trainer.train(r, out / "resumed", data=d, progress=False, log_every=1, device="cpu")
    rank = distributed.rank()
    checkpoints.save_checkpoint(out / f"raw.rank{rank}.safetensors", straight.raw_model)
    if rank == 0:
        assert straight.model is not None
        (out / "losses.json").write_text(json.dumps({"straight": straight.losses,
                                                     "resumed": first.losses + resumed.losses,
                                                     "world_size": distributed.world_size(),
                                                     "threads": torch.get_num_threads()}))
    else:
        assert straight.model is None   # the EMA is rank 0's


if __name__ == "__main__":
    main(Path(sys.argv[1]))
