"""The `course` command.

  course list                         the recipes and shipped checkpoints
  course train RECIPE [--steps N] [--out DIR] [--no-resume] [--device cpu|cuda|cuda:N]
                                      train, save NAME.safetensors, evaluate, write the card NAME.json
  course evaluate NAME [--out DIR] [--device ...]
                                      re-measure a trained checkpoint and rewrite its card

The device defaults to runtime.device(): COURSE_DEVICE if set, else CUDA when present, else the CPU.
Under torchrun (`torchrun --standalone --nproc-per-node=N -m course_lib.cli train RECIPE`) every rank
trains its shard of each global batch (DistributedDataParallel); rank 0 alone writes and evaluates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from course_lib import runtime
from course_lib.training import checkpoints, distributed

DEVICE_HELP = "cpu, cuda or cuda:N (default: COURSE_DEVICE if set, else CUDA when present, else the CPU)"


def hardware(device=None) -> str:
    """The hardware a card names: the GPU for a CUDA device, else the CPU and its threads."""
    return runtime.hardware(device)


def _list(args) -> int:
    from course_lib.training import recipes
    for name, r in sorted(recipes.RECIPES.items()):
        shipped = (checkpoints.CHECKPOINT_DIR / f"{name}.safetensors").exists()
        print(f"{name:24s} {'shipped ' if shipped else 'recipe  '} {r.steps:6d} steps  {r.description}")
    return 0


def _train(args) -> int:
    import torch
    from course_lib.nn.unet import count_parameters
    from course_lib.training import recipes, trainer
    recipe = recipes.get(args.recipe)
    out = checkpoints.check_out_dir(checkpoints.CHECKPOINT_DIR if args.out is None else args.out)
    if args.out is None and not args.force:
        checkpoints.refuse_shipped(out, recipe.name)   # shipped checkpoints are replaced only when asked
    steps = recipe.steps if args.steps is None else args.steps
    device = runtime.device(args.device)
    result = trainer.train(recipe, out, steps=steps, resume=not args.no_resume, device=device)
    if distributed.rank() != 0:
        return 0                       # under torchrun rank 0 alone evaluates and writes the pair
    seconds, steps = result.seconds, result.steps      # the card records the steps actually trained
    path = out / f"{recipe.name}.safetensors"
    train_info = {"steps": steps, "wall_seconds": round(seconds, 1),
                  "seconds_per_step": round(seconds / max(1, steps), 4),
                  "hardware": hardware(device), "torch": torch.__version__, "device": str(device),
                  "precision": runtime.precision(device, recipe.bf16), "threads": torch.get_num_threads(),
                  "processes": distributed.world_size(),
                  "parameters": count_parameters(result.model),
                  "final_loss": round(result.losses[-1][1], 5) if result.losses else None}
    if recipe.init_from:
        train_info["init_from"] = {"name": recipe.init_from,
                                   "sha256": checkpoints.read_card(recipe.init_from)["sha256"]}
    from course_lib.eval import report
    metrics = report.measure(recipe, result.model, device=device)   # first: a kill here leaves the old pair
    checkpoints.save_pair(path, result.model, _card(recipe, train_info, metrics))   # weights + card, one unit
    print(f"saved {path} after {steps} steps in {seconds:.0f} s")
    print(json.dumps(metrics, indent=2))
    return 0


def _card(recipe, train_info: dict, metrics: dict) -> dict:
    """Every field of the card except the file's own (save_pair adds file, bytes and sha256)."""
    return {"name": recipe.name, "description": recipe.description,
            "recipe": {k: (repr(v) if k == "model_config" else v) for k, v in vars(recipe).items()},
            **train_info, "metrics": metrics, "measured": time.strftime("%Y-%m-%d")}


def _evaluate(args) -> int:
    from course_lib.eval import report
    from course_lib.training import recipes
    recipe = recipes.get(args.name)
    path = Path(args.out) / f"{recipe.name}.safetensors"
    checkpoints.recover_pair(path)                     # finish a commit a killed `course train` left
    model, old = checkpoints.load_verified(recipe.build_model(), path,   # refuses a sha256 the card lacks
                                           hint=f"Rebuild it with `course train {recipe.name}`.")
    device = runtime.device(args.device)
    runtime.set_threads()
    metrics = report.measure(recipe, model.eval(), device=device)
    fields = {k: old[k] for k in ("file", "bytes", "sha256") if k in old}   # the verified file's, unchanged
    card = {**old, **_card(recipe, {}, metrics), **fields}
    checkpoints.write_card(checkpoints.card_path(path), card)
    print(json.dumps(metrics, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="course", description="Guided Diffusion course tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="recipes and shipped checkpoints").set_defaults(func=_list)
    p = sub.add_parser("train", help="train a recipe and write its checkpoint and card")
    p.add_argument("recipe")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--out", default=None, help=f"output folder (default {checkpoints.CHECKPOINT_DIR}, where "
                   "a shipped checkpoint is replaced only when --out names it or with --force)")
    p.add_argument("--force", action="store_true", help="replace a shipped checkpoint in the default folder")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a state file exists")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.set_defaults(func=_train)
    p = sub.add_parser("evaluate", help="measure a trained checkpoint and rewrite its card")
    p.add_argument("name")
    p.add_argument("--out", default=str(checkpoints.CHECKPOINT_DIR), help="folder holding NAME.safetensors")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.set_defaults(func=_evaluate)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, checkpoints.CheckpointError, runtime.DeviceError) as e:
        print(f"course: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
