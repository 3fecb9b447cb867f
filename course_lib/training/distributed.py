"""DistributedDataParallel under torchrun: one process per GPU (NCCL) or per group of CPU cores (gloo).

  torchrun --standalone --nproc-per-node=N -m course_lib.cli train RECIPE

Each rank takes its shard (rows rank*B/N .. (rank+1)*B/N) of the same per-step global batch of B
that a single process would draw from the trainer's per-step generators, so N ranks take the same
optimizer steps as one process on that global batch: DDP averages the shards' gradients, and the
mean of N shard means of B/N rows is the batch mean. EMA, checkpoints and cards come from rank 0.

Outside torchrun (WORLD_SIZE unset or 1) nothing here does anything: `session` yields world size 1.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from typing import NamedTuple

import torch
import torch.distributed as dist


class Context(NamedTuple):
    rank: int              # this process, 0 .. world_size - 1; rank 0 writes checkpoints and cards
    world_size: int        # processes taking part in each step
    device: torch.device   # this rank's device (cuda:LOCAL_RANK on GPUs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """Processes in the torchrun job (1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    """This process's rank in the torchrun job (0 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


@contextlib.contextmanager
def session(device: torch.device):
    """The process group of a training run: joined from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) on first use and kept until the process exits, so a second run in the same
    process (a resume) reuses it (leaving and re-joining through torchrun's store is not reliable).
    A CUDA device without an index becomes cuda:LOCAL_RANK, one GPU per rank. Yields a Context."""
    device = torch.device(device)
    if world_size() == 1:
        yield Context(0, 1, device)
        return
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    elif (dist.get_backend() == "nccl") != (device.type == "cuda"):
        raise RuntimeError(f"this process already joined a {dist.get_backend()} group; device {device} needs "
                           f"{'nccl' if device.type == 'cuda' else 'gloo'}")
    yield Context(dist.get_rank(), dist.get_world_size(), device)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(batch_size: int, ctx: Context) -> slice:
    """The rows of the global batch this rank trains on."""
    if batch_size % ctx.world_size:
        raise ValueError(f"the global batch of {batch_size} does not split evenly over {ctx.world_size} "
                         f"ranks: choose a number of processes that divides it")
    per = batch_size // ctx.world_size
    return slice(ctx.rank * per, (ctx.rank + 1) * per)


class DDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that also answers for the wrapped model's plain attributes (model.config),
    so the trainer's loss functions take either. Loss functions must call the model (its forward), never
    another of its methods: DDP synchronises gradients through forward."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """The model DDP-wrapped for this rank (the model itself with one process)."""
    if ctx.world_size == 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of a tensor over the ranks (every rank must call it)."""
    if ctx.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def agree(value: int, ctx: Context, what: str) -> None:
    """Fail on every rank unless all ranks hold the same integer (e.g. the step they resume from)."""
    if ctx.world_size == 1:
        return
    t = torch.tensor([value, -value], dtype=torch.long, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"the ranks disagree on {what} (from {-int(t[1])} to {int(t[0])}): "
                           "the output folder must be one that every rank sees")


def barrier(ctx: Context) -> None:
    """Wait until every rank gets here (nothing with one process)."""
    if ctx.world_size > 1:
        dist.barrier()
