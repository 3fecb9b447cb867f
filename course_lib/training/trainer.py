"""The training loop every recipe uses: AdamW, linear warm-up, gradient clipping, EMA, a
progress bar with the loss, periodic atomic checkpoints and exact resume.

Exact resume: all randomness of step k (the batch, t, the noise, dropout, label dropout) comes
from generators seeded by (recipe seed, k), so a run stopped at step k and resumed from its
checkpoint takes the same steps, bit for bit, as one that never stopped (tested on the CPU).

Devices: the model and the training data are moved to `device` (runtime.device(): CUDA when
present) once; the per-step generators stay on the CPU and what they draw is moved, so a CPU and
a CUDA run draw the same numbers, and a state file saved on one device resumes on another.

DistributedDataParallel (training/distributed.py): under torchrun each rank trains on its shard of
the same global batch, and its t, noise and label dropout are its rows of what one process would
draw for the whole batch (batch_randn, batch_randint, batch_rand), so N ranks take the steps of
one process on that batch. EMA, checkpoints and the progress bar are rank 0's.
"""
from __future__ import annotations

import contextvars
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from course_lib import runtime
from course_lib.diffusion import formulas, losses
from course_lib.diffusion.schedules import schedule as make_schedule
from course_lib.training import checkpoints, distributed
from course_lib.training.ema import EMA


class TrainResult(NamedTuple):
    model: torch.nn.Module      # the EMA model, eval mode (None on DDP ranks other than 0)
    raw_model: torch.nn.Module  # the optimised weights
    losses: list                # (step, loss) pairs
    steps: int
    start_step: int             # where this call began (> 0 after a resume)
    seconds: float              # wall time of the whole run, earlier resumed calls included


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator that owns all randomness of one training step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Shard(NamedTuple):
    start: int          # this rank's first row of the global batch
    stop: int
    global_batch: int


# Set by train() under DDP for the duration of a step; None with one process.
_SHARD: contextvars.ContextVar = contextvars.ContextVar("course_shard", default=None)


def _rows(like: torch.Tensor, draw: Callable) -> torch.Tensor:
    """This rank's rows of draw(n), n the step's global batch (like's rows with one process), on like's device."""
    shard = _SHARD.get()
    if shard is None:
        return draw(like.shape[0]).to(like.device)
    return draw(shard.global_batch)[shard.start:shard.stop].to(like.device)


def batch_randn(g, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) noise shaped like `like` (B, ...), drawn from the CPU generator g, on like's device.
    Loss functions draw through these three helpers so that DDP ranks get their rows of one draw."""
    return _rows(like, lambda n: torch.randn((n, *like.shape[1:]), generator=g))


def batch_randint(g, high: int, like: torch.Tensor) -> torch.Tensor:
    """(B,) integers uniform in [0, high) from g, on like's device (B = like.shape[0])."""
    return _rows(like, lambda n: torch.randint(0, high, (n,), generator=g))


def batch_rand(g, like: torch.Tensor) -> torch.Tensor:
    """(B,) floats uniform in [0, 1) from g, on like's device."""
    return _rows(like, lambda n: torch.rand(n, generator=g))


def diffusion_loss(model, recipe, x0, y, g):
    """One Monte-Carlo sample of L_simple / L_hybrid: t ~ U{0..T-1}, eps ~ N(0, I)."""
    sched = recipe.noise_schedule()
    t = batch_randint(g, sched.T, x0)
    noise = batch_randn(g, x0)
    x_t = formulas.q_sample(sched, x0, t, noise)
    if getattr(model.config, "num_classes", None):
        drop = batch_rand(g, y) < recipe.label_dropout
        y = torch.where(drop, torch.full_like(y, model.config.num_classes), y)
    else:
        y = None
    with runtime.autocast(x0.device.type, recipe.bf16):
        out = model(x_t, t, y)
    return losses.diffusion_loss(sched, out.float(), x0, x_t, t, noise).loss.mean()


def classify_loss(model, recipe, x0, y, g):
    """Cross-entropy of a clean-image classifier, with random horizontal flips."""
    flip = batch_rand(g, x0) < 0.5
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    with runtime.autocast(x0.device.type, recipe.bf16):
        logits = model(x0)
    return F.cross_entropy(logits.float(), y)


def noisy_classify_loss(model, recipe, x0, y, g):
    """Cross-entropy of a noise-aware classifier p(y | x_t, t) on x_t ~ q(x_t | x_0) (ADM sec. 4)."""
    sched = recipe.noise_schedule()
    t = batch_randint(g, sched.T, x0)
    x_t = formulas.q_sample(sched, x0, t, batch_randn(g, x0))
    with runtime.autocast(x0.device.type, recipe.bf16):
        logits = model(x_t, t)
    return F.cross_entropy(logits.float(), y)


def clip_loss(model, recipe, x0, y, g):
    """CLIP's symmetric InfoNCE on renders and captions of their scenes (models.clip.clip_loss). Under
    DDP each rank contrasts its own shard (no all-gather), so it is not the single-process loss."""
    from course_lib.models.clip import clip_loss as loss
    return loss(model, recipe, x0, y, g)


def noisy_clip_loss(model, recipe, x0, y, g):
    """The noise-aware CLIP's InfoNCE on q_sample(x0, t) (models.clip.noisy_clip_loss); DDP as clip_loss."""
    from course_lib.models.clip import noisy_clip_loss as loss
    return loss(model, recipe, x0, y, g)


def attributes_loss(model, recipe, x0, y, g):
    """Cross-entropy per scene field (nn.attributes) on renders with a little Gaussian noise
    (sigma uniform in [0, 0.1]), so the judge reads samples that are not pixel-clean; no flips
    (left and right are labels)."""
    from course_lib.nn.attributes import attribute_loss
    sigma = 0.1 * batch_rand(g, x0)[:, None, None, None]
    x = x0 + sigma * batch_randn(g, x0)
    with runtime.autocast(x0.device.type, recipe.bf16):
        logits = model(x)
    return attribute_loss(logits.float(), y)


def glide_loss(model, recipe, x0, y, g):
    """GLIDE's L_simple on captions of the batch's scenes, empty label_dropout of the time (models.glide)."""
    from course_lib.models.glide import glide_loss as loss
    return loss(model, recipe, x0, y, g)


def glide_inpaint_loss(model, recipe, x0, y, g):
    """The inpainting model's L_simple with random masks (models.glide.inpaint_loss)."""
    from course_lib.models.glide import inpaint_loss as loss
    return loss(model, recipe, x0, y, g)


def glide_upsample_loss(model, recipe, x0, y, g):
    """The upsampler's L_simple given the noise-augmented low-resolution image (models.glide.upsample_loss)."""
    from course_lib.models.glide import upsample_loss as loss
    return loss(model, recipe, x0, y, g)


# task -> loss_fn(model, recipe, x0, y, g): x0, y this rank's rows of the step's batch, on the device;
# g the step's CPU generator. Draw randomness with batch_randn / batch_randint / batch_rand (DDP-exact)
# and call the model itself (DDP synchronises gradients through its forward).
TASKS: dict[str, Callable] = {"diffusion": diffusion_loss, "classify": classify_loss,
                              "noisy_classify": noisy_classify_loss, "attributes": attributes_loss,
                              "clip": clip_loss, "noisy_clip": noisy_clip_loss, "glide": glide_loss,
                              "glide_inpaint": glide_inpaint_loss, "glide_upsample": glide_upsample_loss}


def param_groups(model, recipe) -> list:
    """AdamW's parameter groups: the weights a warm start adds (the class embedding; a model may name
    its own with `is_new_parameter(name)`, as models.glide.Glide does for its text parts) at
    recipe.class_embed_lr_mult times the learning rate, everything else at the rate itself."""
    is_new = getattr(model, "is_new_parameter", None) or (lambda name: name.startswith("class_embed."))
    embed = [p for n, p in model.named_parameters() if is_new(n)]
    rest = [p for n, p in model.named_parameters() if not is_new(n)]
    groups = [{"params": rest, "lr_mult": 1.0}]
    if embed:
        groups.append({"params": embed, "lr_mult": recipe.class_embed_lr_mult})
    return groups


def lr_at(recipe, step: int) -> float:
    return recipe.lr * min(1.0, (step + 1) / max(1, recipe.warmup))


def train(recipe, out_dir, *, steps: int | None = None, resume: bool = True, progress: bool = True,
          data=None, log_every: int = 10, callback=None, device=None) -> TrainResult:
    """Train `recipe` for `steps` (default: the recipe's), checkpointing into out_dir/NAME.state.safetensors.

    data: (images, labels) tensors; default: the recipe's dataset. With resume=True an existing
    state file is continued from its step. callback(step, loss) is called every log_every steps (on
    rank 0). device: runtime.device(device), CUDA when present; CPU threads from runtime.threads().
    Under torchrun (WORLD_SIZE > 1) this is one rank of a DistributedDataParallel run.
    """
    runtime.ensure_threads()
    with distributed.session(runtime.device(device)) as ctx:
        return _train(recipe, out_dir, ctx, steps=steps, resume=resume, progress=progress, data=data,
                      log_every=log_every, callback=callback)


def _train(recipe, out_dir, ctx: distributed.Context, *, steps, resume, progress, data, log_every,
           callback) -> TrainResult:
    steps = checkpoints.check_steps(recipe.steps if steps is None else steps)
    out_dir = checkpoints.check_out_dir(out_dir)   # an unusable folder fails now, not at the first save
    torch.manual_seed(recipe.seed)
    model = recipe.build_model().train()
    if recipe.init_from:
        checkpoints.warm_start(model, recipe.init_from)
    model.to(ctx.device)
    ema = EMA(model, recipe.ema_decay)
    opt = torch.optim.AdamW(param_groups(model, recipe), lr=recipe.lr, weight_decay=recipe.weight_decay)
    state_path = Path(out_dir) / f"{recipe.name}.state.safetensors"
    start, earlier = 0, 0.0
    if resume and state_path.exists():
        start = checkpoints.load_training_state(state_path, model=model, ema=ema, optimizer=opt)
        earlier = float(checkpoints.read_metadata(state_path).get("seconds", 0.0))
        checkpoints.check_resume(state_path, start, steps)
    distributed.agree(start, ctx, "the step to resume from")
    if not ctx.is_main:
        ema = None          # rank 0 keeps the EMA
    images, labels = recipe.load_data() if data is None else data
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"training data must be non-empty images and labels of one length, "
                         f"got {len(images)} images and {len(labels)} labels")
    images, labels = images.to(ctx.device), labels.to(ctx.device)   # moved once; batches drawn there
    loss_fn = TASKS[recipe.task]
    rows = distributed.shard(recipe.batch_size, ctx)
    shard = Shard(rows.start, rows.stop, recipe.batch_size) if ctx.world_size > 1 else None
    net = distributed.wrap(model, ctx)
    history, t0 = [], time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=recipe.name,
               disable=not (progress and ctx.is_main))
    for step in bar:
        g = step_generator(recipe.seed, step)
        torch.manual_seed(recipe.seed * 1_000_003 + step + (ctx.rank << 32))  # dropout inside the model
        idx = torch.randint(0, images.shape[0], (recipe.batch_size,), generator=g)[rows].to(ctx.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step) * group["lr_mult"]
        token = _SHARD.set(shard)
        try:
            loss = loss_fn(net, recipe, images[idx], labels[idx], g)
        finally:
            _SHARD.reset(token)
        reported = distributed.mean(loss.detach(), ctx)   # the global batch's loss (this rank's with one process)
        if not bool(torch.isfinite(reported)):   # stop before the update: the last state file stays good
            raise ValueError(f"the loss is {loss.item()} at step {step}: training stopped before updating the "
                             f"weights (check the data for NaN/inf, or lower the learning rate); the last "
                             f"state file saved, {state_path}, is kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model, step)
        if step % log_every == 0 or step == steps - 1:
            history.append((step, reported.item()))
            bar.set_postfix(loss=f"{reported.item():.4f}")
            if callback is not None and ctx.is_main:
                callback(step, reported.item())
        if ctx.is_main and ((step + 1) % recipe.checkpoint_every == 0 or step == steps - 1):
            checkpoints.save_training_state(state_path, model=model, ema=ema, optimizer=opt, step=step + 1,
                                            recipe=recipe.name, seconds=earlier + time.time() - t0)
    distributed.barrier(ctx)   # every rank returns after rank 0's last state file is written
    return TrainResult(ema.model.eval() if ema is not None else None, model, history, steps, start,
                       earlier + time.time() - t0)
