"""The training loop every recipe uses: AdamW, linear warm-up, gradient clipping, EMA, a
progress bar with the loss, periodic atomic checkpoints and exact resume.

Exact resume: all randomness of step k (the batch, t, the noise, dropout, label dropout) comes
from generators seeded by (recipe seed, k), so a run stopped at step k and resumed from its
checkpoint takes the same steps, bit for bit, as one that never stopped (tested on the CPU).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from course_lib import runtime
from course_lib.diffusion import formulas, losses
from course_lib.diffusion.schedules import schedule as make_schedule
from course_lib.training import checkpoints
from course_lib.training.ema import EMA


class TrainResult(NamedTuple):
    model: torch.nn.Module      # the EMA model, eval mode
    raw_model: torch.nn.Module  # the optimised weights
    losses: list                # (step, loss) pairs
    steps: int
    start_step: int             # where this call began (> 0 after a resume)
    seconds: float              # wall time of the whole run, earlier resumed calls included


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator that owns all randomness of one training step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def diffusion_loss(model, recipe, x0, y, g):
    """One Monte-Carlo sample of L_simple / L_hybrid: t ~ U{0..T-1}, eps ~ N(0, I)."""
    sched = recipe.noise_schedule()
    t = torch.randint(0, sched.T, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = formulas.q_sample(sched, x0, t, noise)
    if getattr(model.config, "num_classes", None):
        drop = torch.rand(y.shape, generator=g) < recipe.label_dropout
        y = torch.where(drop, torch.full_like(y, model.config.num_classes), y)
    else:
        y = None
    with runtime.autocast(x0.device.type, recipe.bf16):
        out = model(x_t, t, y)
    return losses.diffusion_loss(sched, out.float(), x0, x_t, t, noise).loss.mean()


def classify_loss(model, recipe, x0, y, g):
    """Cross-entropy of a clean-image classifier, with random horizontal flips."""
    flip = torch.rand(x0.shape[0], generator=g) < 0.5
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    with runtime.autocast(x0.device.type, recipe.bf16):
        logits = model(x0)
    return F.cross_entropy(logits.float(), y)


def noisy_classify_loss(model, recipe, x0, y, g):
    """Cross-entropy of a noise-aware classifier p(y | x_t, t) on x_t ~ q(x_t | x_0) (ADM sec. 4)."""
    sched = recipe.noise_schedule()
    t = torch.randint(0, sched.T, (x0.shape[0],), generator=g)
    x_t = formulas.q_sample(sched, x0, t, torch.randn(x0.shape, generator=g))
    with runtime.autocast(x0.device.type, recipe.bf16):
        logits = model(x_t, t)
    return F.cross_entropy(logits.float(), y)


TASKS: dict[str, Callable] = {"diffusion": diffusion_loss, "classify": classify_loss,
                              "noisy_classify": noisy_classify_loss}


def param_groups(model, recipe) -> list:
    """AdamW's parameter groups: the class embedding at recipe.class_embed_lr_mult times the learning
    rate (a warm start's only new weights, which start at zero), everything else at the rate itself."""
    embed = [p for n, p in model.named_parameters() if n.startswith("class_embed.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("class_embed.")]
    groups = [{"params": rest, "lr_mult": 1.0}]
    if embed:
        groups.append({"params": embed, "lr_mult": recipe.class_embed_lr_mult})
    return groups


def lr_at(recipe, step: int) -> float:
    return recipe.lr * min(1.0, (step + 1) / max(1, recipe.warmup))


def train(recipe, out_dir, *, steps: int | None = None, resume: bool = True, progress: bool = True,
          data=None, log_every: int = 10, callback=None) -> TrainResult:
    """Train `recipe` for `steps` (default: the recipe's), checkpointing into out_dir/NAME.state.safetensors.

    data: (images, labels) tensors; default: the recipe's dataset. With resume=True an existing
    state file is continued from its step. callback(step, loss) is called every log_every steps.
    """
    steps = recipe.steps if steps is None else steps
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    torch.manual_seed(recipe.seed)
    model = recipe.build_model().train()
    if recipe.init_from:
        checkpoints.warm_start(model, recipe.init_from)
    ema = EMA(model, recipe.ema_decay)
    opt = torch.optim.AdamW(param_groups(model, recipe), lr=recipe.lr, weight_decay=recipe.weight_decay)
    state_path = Path(out_dir) / f"{recipe.name}.state.safetensors"
    start, earlier = 0, 0.0
    if resume and state_path.exists():
        start = checkpoints.load_training_state(state_path, model=model, ema=ema, optimizer=opt)
        earlier = float(checkpoints.read_metadata(state_path).get("seconds", 0.0))
    images, labels = recipe.load_data() if data is None else data
    loss_fn = TASKS[recipe.task]
    history, t0 = [], time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=recipe.name, disable=not progress)
    for step in bar:
        g = step_generator(recipe.seed, step)
        torch.manual_seed(recipe.seed * 1_000_003 + step)  # dropout inside the model
        idx = torch.randint(0, images.shape[0], (recipe.batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step) * group["lr_mult"]
        loss = loss_fn(model, recipe, images[idx], labels[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        ema.update(model, step)
        if step % log_every == 0 or step == steps - 1:
            history.append((step, loss.item()))
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if callback is not None:
                callback(step, loss.item())
        if (step + 1) % recipe.checkpoint_every == 0 or step == steps - 1:
            checkpoints.save_training_state(state_path, model=model, ema=ema, optimizer=opt, step=step + 1,
                                            recipe=recipe.name, seconds=earlier + time.time() - t0)
    return TrainResult(ema.model.eval(), model, history, steps, start, earlier + time.time() - t0)
