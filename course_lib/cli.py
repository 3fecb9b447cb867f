"""The `course` command.

  course list                         the recipes and shipped checkpoints, with their cards' headline metrics
  course sample CHECKPOINT [--class C | --prompt TEXT] [--n N] [--steps S] [--sampler ddpm|ddim|dpm]
                [--guidance S] [--seed K] [--out grid.png] [--out-dir DIR]
                                      a labelled grid of samples from any diffusion checkpoint
  course run [LESSON ...] [--quick]   execute lessons in order, then build site/ (what `make course` does)
  course bench [NAME [-- ARGS]]       run benchmarks/NAME.py and show its results file; alone, list them
  course data [--no-fetch]            where each dataset was found; fetch or install what is missing
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
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

from course_lib import runtime
from course_lib.training import checkpoints, distributed

REPO = Path(__file__).resolve().parents[1]
DEVICE_HELP = "cpu, cuda or cuda:N (default: COURSE_DEVICE if set, else CUDA when present, else the CPU)"


def hardware(device=None) -> str:
    """The hardware a card names: the GPU for a CUDA device, else the CPU and its threads."""
    return runtime.hardware(device)


_COUNTS = re.compile(r"(samples|images|items|scenes)$")


def _leaves(metrics: dict, prefix: str = ""):
    """(dotted key, number) of every numeric leaf of a card's metrics, in order."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + key, value


def headline(metrics: dict, limit: int = 4) -> str:
    """A card's headline metrics on one line: its top-level numbers first (counts left out), then
    numbers of nested tables (e.g. accuracy by t), at most `limit`."""
    top = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    nested = sorted(_leaves({k: v for k, v in metrics.items() if isinstance(v, dict)}),
                    key=lambda kv: kv[0].count("."))      # shallow tables first: summaries before details
    picked = [(k, v) for k, v in top + nested if not _COUNTS.search(k)][:limit]
    return "  ".join(f"{k}={v:.4g}" for k, v in picked)


def _card_summary(name: str) -> str:
    try:
        card = checkpoints.read_card(name)
    except checkpoints.CheckpointError:
        return "(no card)"
    return headline(card.get("metrics") or {}) or "(no metrics on the card)"


def _list(args) -> int:
    from course_lib.training import recipes
    folder = checkpoints.CHECKPOINT_DIR
    shipped = {p.name.split(".")[0] for p in folder.glob("*.safetensors")} if folder.is_dir() else set()
    for name, r in sorted(recipes.RECIPES.items()):
        where = "shipped " if name in shipped else "recipe  "
        what = _card_summary(name) if name in shipped else textwrap.shorten(r.description, 72, placeholder=" ...")
        print(f"{name:24s} {where} {r.task:14s} {r.steps:6d} steps  {what}")
    for name in sorted(shipped - set(recipes.RECIPES)):
        print(f"{name:24s} shipped  (no recipe)                    {_card_summary(name)}")
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


# ---------------------------------------------------------------------------- course sample

SAMPLERS = {"ddpm": "ddpm", "ddim": "ddim", "dpm": "dpm_solver_pp_2m"}   # --sampler -> SamplerConfig.method
SAMPLE_TASKS = ("diffusion", "glide")


def _sampling_recipes() -> list:
    from course_lib.training import recipes
    return sorted(n for n, r in recipes.RECIPES.items() if r.task in SAMPLE_TASKS)


def load_for_sampling(spec: str, device):
    """(recipe, model, card) of a checkpoint given by name (data/checkpoints/NAME, or
    COURSE_CHECKPOINT_DIR) or by the path of a NAME.safetensors file that `course train --out` wrote."""
    from course_lib.training import recipes
    if spec.endswith(".safetensors") or os.sep in spec:
        path = Path(spec)
        card = checkpoints.matching_card(path)
        recipe = recipes.get(card.get("name") or path.name.split(".")[0])
    else:
        recipe, path = recipes.get(spec), checkpoints.CHECKPOINT_DIR / f"{spec}.safetensors"
    if recipe.task not in SAMPLE_TASKS:
        raise ValueError(f"{recipe.name} is a {recipe.task} model, not a diffusion model; `course sample` "
                         f"draws from: {', '.join(_sampling_recipes())}")
    if recipe.task == "glide" and getattr(recipe.model_config, "kind", "base") != "base":
        raise ValueError(f"{recipe.name} needs an image as well as a caption; sample it in lesson 07")
    hint = f"Rebuild it with `course train {recipe.name}`."
    if not path.exists() and not checkpoints.card_path(path).exists():
        raise checkpoints.CheckpointError(f"the checkpoint {recipe.name!r} has not been built ({path} is missing). {hint}")
    model, card = checkpoints.load_verified(recipe.build_model(), path, hint=hint)
    return recipe, model.to(device).eval().requires_grad_(False), card


def _class_index(text: str, names, K: int) -> int:
    if re.fullmatch(r"\d+", text.strip()):
        c = int(text)
    else:
        lower = [n.lower() for n in names]
        if text.strip().lower() not in lower:
            raise ValueError(f"unknown class {text!r}; give an index 0..{K - 1} or a name: {', '.join(names)}")
        c = lower.index(text.strip().lower())
    if not 0 <= c < K:
        raise ValueError(f"--class {c}: the model knows classes 0..{K - 1} ({', '.join(names)})")
    return c


class SamplePlan(NamedTuple):
    cond: object          # class labels (N,), a list of N captions, or None
    labels: list          # one caption per grid tile
    null: object          # the null condition for classifier-free guidance (None: no guidance possible)
    scale: float          # guidance scale s


def plan_conditions(args, recipe, model) -> SamplePlan:
    """What to condition the N samples on, from --class / --prompt, checked against the model."""
    import torch
    name, n = recipe.name, args.n
    if recipe.task == "glide":
        if args.classes:
            raise ValueError(f"{name} is text-conditional: give --prompt TEXT, not --class")
        if not args.prompts:
            raise ValueError(f"{name} is text-conditional: give --prompt TEXT, e.g. --prompt 'a red circle above "
                             "a blue square'")
        captions = [args.prompts[i % len(args.prompts)] for i in range(n)]
        return SamplePlan(captions, captions, "", 1.0 if args.guidance is None else args.guidance)
    K = model.config.num_classes
    if args.prompts:
        raise ValueError(f"{name} takes no text prompt (it is {'class-conditional' if K else 'unconditional'}); "
                         f"text models: {', '.join(n for n in _sampling_recipes() if 'glide' in n) or 'none yet'}")
    if not K:
        if args.classes:
            raise ValueError(f"{name} is unconditional: it takes no --class (class-conditional: fashion_cond)")
        if args.guidance is not None:
            raise ValueError(f"{name} is unconditional: there is nothing to guide towards, so no --guidance "
                             "(classifier-free guidance needs a conditional model such as fashion_cond)")
        return SamplePlan(None, [f"#{i}" for i in range(n)], None, 1.0)
    names = _class_names(recipe, K)
    chosen = [_class_index(c, names, K) for c in args.classes] if args.classes else list(range(K))
    y = [chosen[i % len(chosen)] for i in range(n)]
    return SamplePlan(torch.tensor(y), [names[c] for c in y], K, 1.0 if args.guidance is None else args.guidance)


def _class_names(recipe, K: int):
    if recipe.data == "fashion_mnist" and K == 10:
        from course_lib.data.fashion_mnist import CLASS_NAMES
        return list(CLASS_NAMES)
    return [str(c) for c in range(K)]


def _check_sample_args(args) -> None:
    if args.n < 1 or args.n > 4096:
        raise ValueError(f"--n must be between 1 and 4096, got {args.n}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and (not math.isfinite(args.guidance) or args.guidance < 0):
        raise ValueError(f"--guidance is a scale s >= 0 (1: the conditional model, 0: unconditional), got {args.guidance}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out}")
    if not Path(args.out).resolve().parent.is_dir():
        raise ValueError(f"--out {args.out}: the folder {Path(args.out).resolve().parent} does not exist")
    if args.out_dir is not None:
        checkpoints.check_out_dir(args.out_dir)


def draw_samples(recipe, model, plan: SamplePlan, config, *, n: int, seed: int, batch_size: int = 64):
    """N samples in [-1, 1] from `model` with the sampler `config`, guided at plan.scale when the model
    is conditional (classifier-free guidance, one batched pass of 2B), from x_T drawn with `seed`."""
    import torch
    from course_lib.guidance.cfg import cfg_eps
    from course_lib.samplers import config as sampler_config, loop
    cfg = model.config
    device = next(model.parameters()).device
    eps_fn = loop.model_fn(model)
    if plan.null is not None and plan.scale != 1.0:
        eps_fn = cfg_eps(eps_fn, plan.scale, null_class=plan.null)
    g = torch.Generator().manual_seed(seed)
    x_T = loop.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), g, device)
    out = []
    for lo in range(0, n, batch_size):
        sl = slice(lo, min(n, lo + batch_size))
        cond = None if plan.cond is None else plan.cond[sl]
        cond = cond.to(device) if isinstance(cond, torch.Tensor) else cond
        out.append(sampler_config.run(config, eps_fn, recipe.noise_schedule(), x_T[sl], cond=cond, generator=g,
                                      progress=True).cpu())
    return torch.cat(out)


def _save_grid(images, labels, title: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from course_lib.viz import plots
    ncol = min(len(labels), 8)
    fig = plots.captioned_grid(images, labels, ncol=ncol, width=1.5, wrap=18, suptitle=title)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _save_singles(images, labels, folder: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from course_lib.viz import plots
    paths = []
    for i, label in enumerate(labels):
        slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "sample"
        path = Path(folder) / f"{i:03d}_{slug[:40]}.png"
        tile = plots.grid_array(images[i:i + 1], nrow=1, padding=0)
        plt.imsave(path, tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=1)
        paths.append(path)
    return paths


def _sample(args) -> int:
    from course_lib.samplers.config import SamplerConfig
    _check_sample_args(args)
    device = runtime.device(args.device)
    runtime.set_threads()
    recipe, model, card = load_for_sampling(args.checkpoint, device)
    plan = plan_conditions(args, recipe, model)
    learned = getattr(model.config, "learn_sigma", False)
    config = SamplerConfig(SAMPLERS[args.sampler], steps=args.steps,
                           variance="learned" if learned else "small")
    if args.steps > recipe.T:
        raise ValueError(f"--steps {args.steps}: {recipe.name} was trained with T={recipe.T} steps")
    start = time.perf_counter()
    images = draw_samples(recipe, model, plan, config, n=args.n, seed=args.seed, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    guided = f", guidance s={plan.scale:g}" if plan.null is not None else ""
    title = f"{recipe.name}: {config.label}{guided}, seed {args.seed}"
    _save_grid(images, plan.labels, title, Path(args.out))
    print(f"wrote {args.out}: {args.n} samples ({title}) in {seconds:.1f} s on {runtime.hardware(device)}")
    if args.out_dir is not None:
        paths = _save_singles(images, plan.labels, Path(args.out_dir))
        print(f"wrote {len(paths)} images to {args.out_dir}/")
    return 0


# ---------------------------------------------------------------------------- course run

def resolve_lessons(names, folder: Path) -> list:
    """The lesson notebooks named by `names`, in lesson order (all of them when none is given). A name
    is a number ("3", "03"), a file name or path ("03_ddim.ipynb"), a stem ("03_ddim"), a topic
    ("ddim") or the unique start of one ("classifier_f")."""
    from course_lib import site
    lessons = site.find_lessons(folder)
    if not lessons:
        raise ValueError(f"no lesson notebooks NN_topic.ipynb in {folder}")
    if not names:
        return lessons
    known = ", ".join(p.stem for p in lessons)
    chosen = set()
    for name in names:
        key = Path(name).name.removesuffix(".ipynb")
        exact = [p for p in lessons if key in (p.stem, p.stem[3:]) or (key.isdigit() and int(key) == int(p.stem[:2]))]
        prefix = [p for p in lessons if p.stem[3:].startswith(key) or p.stem.startswith(key)]
        found = exact or prefix
        if len(found) != 1:
            which = "matches none" if not found else f"matches {len(found)} ({', '.join(p.stem for p in found)})"
            raise ValueError(f"lesson {name!r} {which}; lessons: {known}")
        chosen.add(found[0])
    return [p for p in lessons if p in chosen]


def execute_notebook(nb, cwd: Path, timeout: int, on_cell=None) -> None:
    """Run every cell of `nb` in a fresh kernel started in `cwd` (nbclient), in place; the kernel
    inherits this process's environment. A failing cell raises nbclient's CellExecutionError with
    the error kept in that cell's outputs."""
    from nbclient import NotebookClient
    hook = (lambda **kw: on_cell()) if on_cell is not None else None
    NotebookClient(nb, timeout=timeout, resources={"metadata": {"path": str(cwd)}},
                   on_cell_executed=hook).execute()


class _KernelEnvironment:
    """COURSE_QUICK set (--quick) or unset (full) for the kernels, this venv first on PATH."""

    def __init__(self, quick: bool):
        self.quick, self.saved = quick, None

    def __enter__(self):
        self.saved = dict(os.environ)
        os.environ.pop("COURSE_QUICK", None)
        if self.quick:
            os.environ["COURSE_QUICK"] = "1"
        os.environ["JUPYTER_PREFER_ENV_PATH"] = "1"
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

    def __exit__(self, *exc):
        os.environ.clear()
        os.environ.update(self.saved)


def run_lesson(path: Path, *, quick: bool, timeout: int):
    """(executed notebook, seconds, ok): one lesson executed with a progress bar over its cells."""
    import nbformat
    from tqdm.auto import tqdm
    nb = nbformat.read(path, as_version=4)
    cells = sum(c.cell_type == "code" for c in nb.cells)
    start, ok = time.perf_counter(), True
    with _KernelEnvironment(quick), tqdm(total=cells, desc=path.stem, unit="cell") as bar:
        try:
            execute_notebook(nb, path.parent, timeout, on_cell=bar.update)
        except Exception as e:   # a failing cell (CellExecutionError), a timeout, a dead kernel
            ok = False
            print(f"{path}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                  file=sys.stderr)
    seconds = round(time.perf_counter() - start, 1)
    nb.metadata["course"] = {"seconds": seconds, "status": "executed" if ok else "error", "quick": quick,
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "hardware": runtime.hardware()}
    return nb, seconds, ok


def _run(args) -> int:
    import nbformat
    from course_lib import site
    folder = Path(args.notebooks)
    if not folder.is_dir():
        raise ValueError(f"no folder {folder}")
    if args.timeout < 1:
        raise ValueError(f"--timeout must be >= 1 second, got {args.timeout}")
    chosen = resolve_lessons(args.lessons, folder)
    mode = "quick (COURSE_QUICK=1; notebooks/ left as it is)" if args.quick else "full (outputs kept in notebooks/)"
    print(f"running {len(chosen)} lesson(s), {mode}: {', '.join(p.stem for p in chosen)}")
    executed, failed = {}, []
    for path in chosen:
        nb, seconds, ok = run_lesson(path, quick=args.quick, timeout=args.timeout)
        executed[path] = nb
        print(f"{path}: {'ok' if ok else 'FAILED'} in {site.format_seconds(seconds)}")
        if ok and not args.quick:
            nbformat.write(nb, path)      # a failed run never replaces the last good outputs
        if not ok:
            failed.append(path)
            if not args.keep_going:
                break
    site.build(folder, Path(args.out), executed=executed)
    if failed:
        print(f"course run: {len(failed)} lesson(s) failed: {', '.join(p.stem for p in failed)}; "
              f"their pages in {args.out}/ show the error", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- course bench

def _docline(path: Path) -> str:
    import ast
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (SyntaxError, UnicodeDecodeError, OSError):
        doc = None
    return (doc or "").strip().split("\n")[0]


def benchmarks(folder: Path) -> list:
    return sorted(p for p in Path(folder).glob("*.py") if not p.name.startswith("_"))


def _bench(args) -> int:
    folder = Path(args.dir)
    scripts = benchmarks(folder) if folder.is_dir() else []
    if not scripts:
        raise ValueError(f"no benchmark scripts in {folder}")
    results = folder / "results"
    if args.name is None:
        for p in scripts:
            out = results / f"{p.stem}.txt"
            when = time.strftime("%Y-%m-%d", time.localtime(out.stat().st_mtime)) if out.exists() else "no results yet"
            print(f"{p.stem:16s} {when:14s} {_docline(p)}")
        return 0
    name = args.name.removesuffix(".py")
    script = folder / f"{name}.py"
    if script not in scripts:
        raise ValueError(f"unknown benchmark {args.name!r}; known: {', '.join(p.stem for p in scripts)}")
    extra = args.args
    out = results / f"{name}.txt"
    before = out.stat().st_mtime if out.exists() else None
    print(f"running {script} {' '.join(extra)}".rstrip(), flush=True)
    rc = subprocess.call([sys.executable, str(script), *extra], cwd=folder.parent)
    if rc != 0:
        print(f"course bench: {script} exited with status {rc}", file=sys.stderr)
        return rc
    if not out.exists():
        print(f"{script} wrote no {out}")
        return 0
    fresh = before is None or out.stat().st_mtime > before
    print(f"\n== {out}{'' if fresh else ' (not rewritten by this run: an earlier result)'}")
    print(out.read_text(encoding="utf-8"), end="")
    return 0


# ---------------------------------------------------------------------------- course data

def _torchvision_copy() -> Path | None:
    """Torchvision's downloaded copy of Fashion-MNIST (what load() falls back to), when present."""
    from course_lib.data import fashion_mnist
    raw = Path(os.environ.get("COURSE_DATA_DIR") or Path.home() / ".cache" / "course_lib") / "FashionMNIST" / "raw"
    names = [n for split in fashion_mnist.FILES.values() for n in split]
    if all((raw / n).exists() or (raw / n.removesuffix(".gz")).exists() for n in names):
        return raw
    return None


def fashion_source() -> str | None:
    """Where Fashion-MNIST would be read from (both splits), or None."""
    from course_lib.data import fashion_mnist
    train, test = fashion_mnist.source("train"), fashion_mnist.source("test")
    if train is not None and test is not None:
        origin = "COURSE_DATA_DIR" if os.environ.get("COURSE_DATA_DIR") else "Debian's dataset-fashion-mnist"
        return f"{train} ({origin})" if train == test else f"{train} and {test} ({origin})"
    copy = _torchvision_copy()
    return None if copy is None else f"{copy} (torchvision's download)"


def apt_install() -> bool:
    """apt-get install -y dataset-fashion-mnist (after apt-get update if the first try fails)."""
    cmd = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
    if subprocess.call(cmd) == 0:
        return True
    return subprocess.call(["apt-get", "update"]) == 0 and subprocess.call(cmd) == 0


def torchvision_fetch() -> bool:
    """Both splits through fashion_mnist.load's torchvision download (needs internet)."""
    from course_lib.data import fashion_mnist
    try:
        for split in ("train", "test"):
            fashion_mnist.load(split, download=True, limit=1)
    except fashion_mnist.DatasetNotFoundError as e:
        print(str(e).splitlines()[-1], file=sys.stderr)
        return False
    return True


def _can_apt() -> bool:
    return (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None
            and not os.environ.get("COURSE_DATA_DIR"))   # COURSE_DATA_DIR set: the data must come from there


def _data(args) -> int:
    found = fashion_source()
    if found is None and not args.no_fetch:
        if _can_apt():
            print("Fashion-MNIST not found: installing Debian's dataset-fashion-mnist (apt-get, as root)")
            apt_install()
            found = fashion_source()
        if found is None:
            print("Fashion-MNIST not found: trying torchvision's download (needs internet)")
            if torchvision_fetch():
                found = fashion_source()
    print(f"fashion_mnist  {found or 'NOT FOUND'}")
    from course_lib.data import shapes
    shapes.render_scenes([shapes.parse_caption("a red circle")], size=32)   # the generator works
    print("shapes         generated on the fly by course_lib.data.shapes (no files needed)")
    if found is None:
        from course_lib.data.fashion_mnist import DEBIAN_DIR, FILES
        files = ", ".join(FILES["train"] + FILES["test"])
        print("course data: Fashion-MNIST was not found. Get it one of three ways:\n"
              f"  1. set COURSE_DATA_DIR to a folder holding the four IDX .gz files ({files});\n"
              f"  2. on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist (installs them in {DEBIAN_DIR});\n"
              "  3. with internet: run `course data` again (torchvision downloads them)."
              + ("" if not args.no_fetch else "\n(--no-fetch: nothing was fetched)"), file=sys.stderr)
        return 1
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
    p = sub.add_parser("sample", help="a labelled grid of samples from a diffusion checkpoint",
                       description="Draw samples from a shipped diffusion checkpoint (or a NAME.safetensors "
                       "path) and save them as one labelled grid PNG.",
                       epilog="examples: course sample fashion_cond --class Sneaker --guidance 3 --out grid.png; "
                       "course sample fashion_ddpm --sampler dpm --steps 20; "
                       "course sample shapes_glide --prompt 'a red circle above a blue square' --guidance 3")
    p.add_argument("checkpoint", help=f"a checkpoint name ({', '.join(_sampling_recipes())}) or a .safetensors path")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--class", dest="classes", action="append", metavar="C",
                       help="class index or name (repeatable; default: every class in turn); class-conditional models")
    which.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                       help="caption (repeatable, rows cycle through them); text-conditional models")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps = network calls (default 50)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim",
                   help="ddpm (respaced ancestral), ddim (eta=0) or dpm (DPM-Solver++(2M)); default ddim")
    p.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale s = 1 + w (GLIDE's s, diffusers' guidance_scale): 1 the "
                   "conditional model (default), 0 the unconditional one, 3 a typical guided value")
    p.add_argument("--seed", type=int, default=0, help="seed of x_T and of the sampler's noise (default 0)")
    p.add_argument("--out", default="grid.png", help="the grid PNG to write (default grid.png)")
    p.add_argument("--out-dir", default=None, help="also write each sample as its own PNG into this folder")
    p.add_argument("--batch-size", type=int, default=64, help="samples per network batch (default 64)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.set_defaults(func=_sample)
    p = sub.add_parser("run", help="execute lessons in order, then build site/",
                       description="Execute lesson notebooks top to bottom in a fresh kernel each, in lesson order, "
                       "then build the site. Full settings keep the outputs in notebooks/ (a failed lesson keeps its "
                       "last good outputs); --quick runs COURSE_QUICK=1 and leaves notebooks/ as it is.")
    p.add_argument("lessons", nargs="*", metavar="LESSON",
                   help="lesson number, name or topic (03, 03_ddim, ddim); default: every lesson")
    p.add_argument("--quick", action="store_true", help="COURSE_QUICK=1: fewer samples and steps (as `make test`)")
    p.add_argument("--notebooks", default=str(REPO / "notebooks"), help="folder holding NN_topic.ipynb")
    p.add_argument("--out", default=str(REPO / "site"), help="site folder to build (default site/)")
    p.add_argument("--timeout", type=int, default=7200, help="seconds a cell may take (default 7200)")
    p.add_argument("--keep-going", action="store_true", help="run the remaining lessons after a failure")
    p.set_defaults(func=_run)
    p = sub.add_parser("bench", help="run a benchmark and show its results file (alone: list them)",
                       description="Run benchmarks/NAME.py (arguments after -- go to the script) and print "
                       "benchmarks/results/NAME.txt; without NAME, list the benchmarks and their last results.",
                       epilog="example: course bench samplers -- --batch 4 --repeats 1")
    p.add_argument("name", nargs="?", default=None, help="benchmark name (a script in benchmarks/)")
    p.add_argument("--dir", default=str(REPO / "benchmarks"), help=argparse.SUPPRESS)
    p.set_defaults(func=_bench)
    p = sub.add_parser("data", help="where each dataset was found; fetch or install what is missing",
                       description="Say where Fashion-MNIST is read from (COURSE_DATA_DIR, Debian's "
                       "dataset-fashion-mnist, torchvision's download) and that shapes is generated; when "
                       "Fashion-MNIST is missing, install the Debian package (as root) or download it with "
                       "torchvision (with internet). Exit status 1 when it is still missing.")
    p.add_argument("--no-fetch", action="store_true", help="only report; install or download nothing")
    p.set_defaults(func=_data)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if argv[:1] == ["bench"] and "--" in argv:          # what follows -- is the benchmark script's
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    args = parser.parse_args(argv)
    args.args = extra
    try:
        return args.func(args)
    except (KeyError, ValueError, checkpoints.CheckpointError, runtime.DeviceError, FileNotFoundError) as e:
        print(f"course: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
