"""Time one training step of the course's UNet against diffusers' UNet2DModel, like with like.

One step = forward + L_simple (DDPM eq. 14) + backward + AdamW step, batch 64 of 1x28x28
random images, t uniform in [0, T). All models run in the same process, with the same
threads, batch and precision (fp32, then bf16 autocast), at a matched parameter count:

- "same layout": diffusers built as the course's `preset("fashion")` (same widths, ResBlocks
  per level, attention resolutions, GroupNorm groups, head width, scale-shift time
  embedding). The parameter counts agree to within 0.1%: this row measures implementation.
- "ADM depth": diffusers with its usual two ResBlocks per level (three up), widths chosen
  so the parameter count is within 5% of ours: this row measures the layout the course
  chose (the issue's target is "1.5x faster at equal or better quality", see --quality).

28 -> 14 -> 7 needs no padding. Steps alternate between the models so that a busy machine
slows all alike; the table gives medians of --steps timed steps after --warmup untimed ones,
both wall-clock and the process's CPU time (on a shared CPU the CPU time is the steadier of
the two; with one thread they agree on an idle machine).

  python benchmarks/unet_step.py                # timing, writes benchmarks/results/unet_step.txt
  python benchmarks/unet_step.py --quality      # also train each on Fashion-MNIST, compare L_simple
  python benchmarks/unet_step.py --profile      # torch.profiler tables of one step of each
  python benchmarks/unet_step.py --efficiency-only --threads 1 2   # only the efficiency table

Efficiency (always printed): the FLOP of one step by torch.utils.flop_counter (matmuls, convolutions
and attention, forward and backward; elementwise work is not counted), the achieved GFLOP/s
(FLOP / median wall time of a step), and its ratio to the sgemm peak measured in the same run at the
same thread count (a 2048x2048 fp32 matmul on a CPU, 8192x8192 on a GPU), at 1 thread and at
runtime.threads() (all the cores the affinity mask allows), with the speed-up of all threads over one.

On a shared machine: OMP_NUM_THREADS=1 nice -n 19 python benchmarks/unet_step.py
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import schedule as make_schedule
from course_lib.nn.unet import UNet, UNetConfig, count_parameters, preset

RESULT = Path(__file__).resolve().parent / "results" / "unet_step.txt"
OVER_PEAK = ("over 100% of the sgemm rate: the sgemm is not this CPU's ceiling here. The step's convolutions "
             "are direct (no Winograd: ONEDNN_VERBOSE=1 shows alg:convolution_direct, jit:avx512_core), so the "
             "counted FLOP are executed; torch's sgemm is MKL's (BLAS_INFO=mkl), probably not on its fastest path "
             "on this non-Intel CPU, while oneDNN's convolutions run its AVX-512 JIT kernels")
T = 1000
OURS = "course_lib UNet"
SAME = "diffusers, same layout"
DEEP = "diffusers, ADM depth"


def diffusers_unet(cfg: UNetConfig, widths=None, head_channels=None):
    """diffusers' UNet2DModel laid out as `cfg`: same widths (unless given), ResBlocks per
    level (one more on the way up in both), attention at the same resolutions and in the
    middle, GroupNorm groups, head width and scale-shift (AdaGN) time embedding."""
    from diffusers import UNet2DModel
    sizes = [cfg.image_size // 2 ** i for i in range(len(cfg.channel_mults))]
    attn = [s in cfg.attention_resolutions for s in sizes]
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(widths or (cfg.base_channels * m for m in cfg.channel_mults)),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=cfg.norm_groups, attention_head_dim=head_channels or cfg.head_channels,
        resnet_time_scale_shift="scale_shift", dropout=cfg.dropout)


def build_models(cfg: UNetConfig, seed: int, device) -> dict:
    """name -> (model, eps_fn(x_t, t)): ours and the two diffusers baselines, all seeded alike."""
    models = {}
    torch.manual_seed(seed)
    ours = UNet(cfg)
    models[OURS] = (ours, lambda x, t: ours(x, t))
    torch.manual_seed(seed)
    same = diffusers_unet(cfg)
    models[SAME] = (same, lambda x, t: same(x, t).sample)
    if cfg.num_res_blocks < 2:  # ADM's depth at ours' parameter count: 2 per level, narrower
        torch.manual_seed(seed)
        deep = diffusers_unet(replace(cfg, num_res_blocks=2), widths=(32, 40, 56), head_channels=28)
        models[f"{DEEP} (2/level, widths 32/40/56)"] = (deep, lambda x, t: deep(x, t).sample)
    for model, _ in models.values():
        model.to(device)
    return models


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA); host CPU {cpu_name()}"
    from course_lib import runtime
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in runtime._cpu_flags()]
    return (f"{cpu_name()} ({os.cpu_count()} logical CPUs visible, {runtime.threads()} in this process's share of "
            f"the affinity mask; {', '.join(isa) or 'no AVX2'})")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(eps_fn, opt, sched, x0, t, noise, bf16, device):
    """forward + L_simple + backward + AdamW step; returns the batch's mean L_simple."""
    x_t = formulas.q_sample(sched, x0, t, noise)
    with autocast(device, bf16):
        eps = eps_fn(x_t, t)
    loss = F.mse_loss(eps.float(), noise)  # L_simple, mean over the batch and pixels
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def random_batches(n, batch, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 28, 28, generator=g).to(device),
             torch.randint(0, T, (batch,), generator=g).to(device),
             torch.randn(batch, 1, 28, 28, generator=g).to(device)) for _ in range(n)]


def time_steps(models, batch, steps, warmup, bf16, device, seed):
    """name -> (median wall s, median CPU s) per training step, models interleaved step by step."""
    sched = make_schedule("linear", T)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in models.items()}
    for m, _ in models.values():
        m.train()
    data = random_batches(warmup + steps, batch, device, seed)
    wall, cpu = {name: [] for name in models}, {name: [] for name in models}
    for i, (x0, t, noise) in enumerate(data):
        for name, (_, fn) in models.items():
            sync(device)
            w, c = time.perf_counter(), time.process_time()
            train_step(fn, opts[name], sched, x0, t, noise, bf16, device)
            sync(device)
            if i >= warmup:
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in models}


def sgemm_gflops(device, n: int | None = None, repeats: int = 5) -> tuple[float, float]:
    """The machine's fp32 matmul rate at the current thread count, an n x n sgemm: (median GFLOP per
    wall second, median GFLOP per CPU second of this process; on a shared CPU the steadier one)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
    a @ b                                                   # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        a @ b
        sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 2 * n ** 3 / statistics.median(wall) / 1e9, 2 * n ** 3 / statistics.median(cpu) / 1e9


def step_flops(model, fn, batch, device, seed) -> float:
    """FLOP of one training step (forward + backward) by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    sched = make_schedule("linear", T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0, t, noise = random_batches(1, batch, device, seed)[0]
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(fn, opt, sched, x0, t, noise, False, device)
    return float(counter.get_total_flops())


def efficiency(cfg, batch, steps, warmup, device, seed, thread_counts) -> list[str]:
    """Rows of the efficiency table of the course's UNet, fp32, one per thread count."""
    flops = None
    rows, base = [], None
    for n in thread_counts:
        torch.set_num_threads(n)
        torch.manual_seed(seed)
        model = UNet(cfg).to(device)
        fn = lambda x, t, m=model: m(x, t)
        if flops is None:
            flops = step_flops(model, fn, batch, device, seed)
        peak, peak_cpu = sgemm_gflops(device)
        wall, cpu = time_steps({OURS: (model, fn)}, batch, steps, warmup, False, device, seed)[OURS]
        base = base or wall
        achieved, achieved_cpu = flops / wall / 1e9, flops / cpu / 1e9
        rows.append(f"{n if device.type == 'cpu' else '-':>7} {wall:>11.3f} {cpu:>10.3f} {flops / 1e9:>11.1f} "
                    f"{achieved:>9.1f} {peak:>11.1f} {100 * achieved / peak:>9.0f}% {base / wall:>9.2f}x"
                    + (f" {achieved_cpu:>10.1f} {peak_cpu:>11.1f} {100 * achieved_cpu / peak_cpu:>9.0f}%"
                       if device.type == "cpu" else ""))
        print(rows[-1], flush=True)
    return rows


def quality(cfg, steps, batch, lr, bf16, device, seed, eval_batches=8):
    """Train fresh copies of every model on Fashion-MNIST with the same data order, t, noise,
    lr and seed; name -> (mean L_simple on fixed held-out test batches, training seconds)."""
    from course_lib.data import fashion_mnist
    train = fashion_mnist.load("train").images
    test = fashion_mnist.load("test").images
    sched = make_schedule("cosine", T)
    models = build_models(cfg, seed, device)
    g = torch.Generator().manual_seed(seed)
    order = [(torch.randint(0, len(train), (batch,), generator=g), torch.randint(0, T, (batch,), generator=g),
              torch.randn(batch, 1, 28, 28, generator=g)) for _ in range(steps)]
    held = [(test[i * batch:(i + 1) * batch], torch.randint(0, T, (batch,), generator=g),
             torch.randn(batch, 1, 28, 28, generator=g)) for i in range(eval_batches)]
    out = {}
    for name, (model, fn) in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        start = time.perf_counter()
        for idx, t, noise in order:
            train_step(fn, opt, sched, train[idx].to(device), t.to(device), noise.to(device), bf16, device)
        sync(device)
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            losses = [F.mse_loss(fn(formulas.q_sample(sched, x0.to(device), t.to(device), n.to(device)),
                                    t.to(device)).float(), n.to(device)).item() for x0, t, n in held]
        out[name] = (sum(losses) / len(losses), seconds)
        print(f"  quality: {name}: held-out L_simple {out[name][0]:.4f} after {seconds:.0f} s", flush=True)
    return out


def profile(model, fn, batch, bf16, device, seed, rows=20):
    """torch.profiler table of one training step (after two warm-up steps), by self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    sched = make_schedule("linear", T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = random_batches(3, batch, device, seed)
    for x0, t, noise in data[:2]:
        train_step(fn, opt, sched, x0, t, noise, bf16, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        train_step(fn, opt, sched, *data[2], bf16, device)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and precision")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", action="store_true", help="time fp32 only")
    p.add_argument("--quality", action="store_true", help="also train each on Fashion-MNIST, compare L_simple")
    p.add_argument("--quality-steps", type=int, default=200)
    p.add_argument("--quality-lr", type=float, default=5e-4)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one fp32 step of each")
    p.add_argument("--out", default=str(RESULT))
    p.add_argument("--note", default="", help="a line about the conditions, written with the results")
    p.add_argument("--threads", default="1 all", help="thread counts of the efficiency table, e.g. '1 2' "
                   "('all' = runtime.threads(): the affinity mask, COURSE_THREADS or OMP_NUM_THREADS)")
    p.add_argument("--efficiency-only", action="store_true", help="skip the diffusers comparison")
    args = p.parse_args(argv)
    from course_lib import runtime
    device = torch.device(args.device)
    load_start = os.getloadavg()[0]
    cfg = preset("fashion")
    threads = runtime.set_threads()
    thread_counts = sorted({threads if n == "all" else int(n) for n in args.threads.split()})
    if device.type == "cuda":
        thread_counts = [threads]

    lines = [f"Efficiency: course_lib preset('fashion') training step, fp32, batch {args.batch}; medians of "
             f"{args.steps} steps after {args.warmup} warm-up; FLOP by torch.utils.flop_counter (matmul, conv, "
             "attention; forward + backward); peak = fp32 sgemm "
             f"{'8192' if device.type == 'cuda' else '2048'}^2 measured in this run at the same threads",
             "wall columns: GFLOP per wall second; CPU columns: GFLOP per CPU second of this process (summed "
             "over its threads), the steadier measure when other jobs share the CPU",
             f"{'threads':>7} {'wall s/step':>11} {'CPU s/step':>10} {'GFLOP/step':>11} {'GFLOP/s':>9} "
             f"{'sgemm GF/s':>11} {'of peak':>10} {'speed-up':>10}"
             + (f" {'GF/CPU-s':>10} {'sgemm/CPU-s':>11} {'of peak':>10}" if device.type == "cpu" else "")]
    print("\n".join(lines), flush=True)
    lines += efficiency(cfg, args.batch, args.steps, args.warmup, device, args.seed, thread_counts)
    if any(float(pct) > 100 for row in lines[-len(thread_counts):] for pct in re.findall(r"([\d.]+)%", row)):
        lines.append(OVER_PEAK)
        print(OVER_PEAK, flush=True)
    torch.set_num_threads(threads)
    lines.append("")
    if args.efficiency_only:
        return _write(args, lines, [], device, threads, load_start, len(lines))
    models = build_models(cfg, args.seed, device)
    n_ours = count_parameters(models[OURS][0])

    first = len(lines)
    lines += [f"UNet training step (forward + L_simple backward + AdamW), batch {args.batch}, 1x28x28, "
             f"t uniform in [0, {T}), random data; course_lib preset('fashion')",
             f"medians of {args.steps} steps after {args.warmup} warm-up, models interleaved, one process; "
             "no padding (28 -> 14 -> 7)", ""]
    for name, (model, _) in models.items():
        n = count_parameters(model)
        lines.append(f"  {name:<48}{n:>11,} parameters ({100 * (n - n_ours) / n_ours:+.1f}%)")
    lines += ["", f"{'precision':<14}{'model':<48}{'wall s/step':>12}{'CPU s/step':>12}"
                  f"{'x ours (wall)':>15}{'x ours (CPU)':>14}"]
    print("\n".join(lines[first:]), flush=True)
    ratios = []
    for bf16 in ([False] if args.no_bf16 else [False, True]):
        med = time_steps(models, args.batch, args.steps, args.warmup, bf16, device, args.seed)
        prec = "bf16 autocast" if bf16 else "fp32"
        w0, c0 = med[OURS]
        for name, (w, c) in med.items():
            row = f"{prec:<14}{name:<48}{w:>12.3f}{c:>12.3f}{w / w0:>14.2f}x{c / c0:>13.2f}x"
            lines.append(row)
            print(row, flush=True)
            if name != OURS:
                ratios.append(f"{c / c0 if device.type == 'cpu' else w / w0:.2f}x {name.split(' (')[0]}, {prec}")
    printed = len(lines)

    if args.quality:
        q = quality(cfg, args.quality_steps, args.batch, args.quality_lr, True, device, args.seed)
        lines += ["", f"quality: {args.quality_steps} bf16-autocast training steps of each on Fashion-MNIST "
                      f"(batch {args.batch}), same data order, t, noise, AdamW lr {args.quality_lr}, seed "
                      f"{args.seed}, cosine schedule; mean L_simple on 8 fixed held-out test batches (lower is better); "
                      "one seed and a short run: a first look at quality, not a FID"]
        for name, (loss, seconds) in q.items():
            lines.append(f"  {name:<48} held-out L_simple {loss:.4f}   ({seconds:.0f} s of training)")
    else:
        lines += ["", "quality: not measured in this run (--quality trains each on Fashion-MNIST)"]
    _write(args, lines, ratios, device, threads, load_start, printed)

    if args.profile:
        for name, (model, fn) in build_models(cfg, args.seed, device).items():
            print(f"\n== profile: one fp32 training step of {name} ==")
            print(profile(model, fn, args.batch, False, device, args.seed))
    return 0


def _write(args, lines, ratios, device, threads, load_start, printed) -> int:
    """The closing lines (ratios, hardware, versions, load), printed and written to --out."""
    if ratios:
        lines += ["", f"ratio (diffusers time / course_lib time, {'CPU' if device.type == 'cpu' else 'wall'} "
                      "time): " + "; ".join(ratios)]
    try:
        diffusers_version = __import__("diffusers").__version__
    except ImportError:
        diffusers_version = "not installed"
    lines += [f"hardware: {hardware(device)}; device {device.type}; torch.get_num_threads() = {threads}"
              f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
              f"{', single-threaded' if threads == 1 else ''})",
              f"torch {torch.__version__}, diffusers {diffusers_version}, "
              f"python {platform.python_version()}; 1-minute load average {load_start:.2f} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end"]
    if args.note:
        lines.append(f"note: {args.note}")
    print("\n".join(lines[printed:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
