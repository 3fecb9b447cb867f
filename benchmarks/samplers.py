"""Seconds per sample of the course's samplers at several step counts, with one model, in one run.

Samplers (lesson 03): DDPM ancestral sampling on an ADM-respaced schedule (learned variance,
`respace.even_timesteps`), DDIM with eta = 0 and DPM-Solver++(2M) (trailing spacing). All use the
same UNet, `UNet(preset("fashion", learn_sigma=True))`, freshly initialised: the time of a
sampler does not depend on the weights, only on the number of network calls and the per-step
arithmetic around them. Batch --batch images of 1x28x28 (default 128, the batch lesson 03's FID
sweep samples in), fp32 (add --bf16 for bf16 autocast rows), on --device (default runtime.device():
CUDA when present) with runtime.threads() CPU threads. Each row also gives samples per second (wall).

For each row: the median over --repeats runs of the wall-clock time and of the process CPU time
(on a shared CPU the CPU time is the steadier; with one thread the two agree on an idle machine),
divided by the batch size. The baseline, DDPM with all 1000 steps, is extrapolated from the
per-step time of the longest DDPM run measured (the cost is linear in the steps); --ddpm-1000
measures it instead. The "vs DDPM-1000" column is that baseline's CPU time over the row's.
Configurations are run round-robin so that a busy machine slows them alike.

  python benchmarks/samplers.py                                    # writes benchmarks/results/samplers.txt
  OMP_NUM_THREADS=1 nice -n 19 python benchmarks/samplers.py --batch 4 --repeats 1   # a quick look, one thread
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from course_lib.diffusion.schedules import schedule as named_schedule
from course_lib.nn.unet import UNet, preset
from course_lib.samplers import ddim
from course_lib.samplers.ddim import ddim_step
from course_lib.samplers.ddpm import ddpm_step
from course_lib.samplers.dpm_solver import DPMSolverPP2M
from course_lib.samplers.loop import model_fn, sample
from course_lib.samplers.respace import even_timesteps, respace, respaced_model

T = 1000


def hardware(device: torch.device) -> str:
    from course_lib import runtime
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), host {runtime.cpu_name()}"
    return f"{runtime.cpu_name()} ({os.cpu_count()} logical CPUs visible)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configurations(ddpm_steps, ddim_steps, dpm_steps, include_ddpm_1000: bool):
    """(name, steps, run) for each row; run(eps_fn, schedule, shape, x_T) draws one batch."""
    def ddpm(n):
        def run(eps_fn, s, shape, x_T):
            r = respace(s, even_timesteps(T, n))
            return sample(respaced_model(eps_fn, r.timesteps), r.schedule, shape, x_T=x_T, progress=False,
                          step=ddpm_step, variance="learned", generator=torch.Generator().manual_seed(0))
        return run

    def ddim_like(n, step):
        def run(eps_fn, s, shape, x_T):
            chosen = step() if isinstance(step, type) else step
            return sample(eps_fn, s, shape, x_T=x_T, progress=False, step=chosen,
                          timesteps=ddim.timesteps(T, n, "trailing"))
        return run

    rows = [("DDPM (respaced)", n, ddpm(n)) for n in sorted(set(ddpm_steps) | ({T} if include_ddpm_1000 else set()))]
    rows += [("DDIM eta=0", n, ddim_like(n, ddim_step)) for n in ddim_steps]
    rows += [("DPM-Solver++(2M)", n, ddim_like(n, DPMSolverPP2M)) for n in dpm_steps]
    return rows


def measure(rows, eps_fn, s, shape, repeats: int, device):
    """Median wall and CPU seconds per batch of each row, rows run round-robin."""
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    times = {i: ([], []) for i in range(len(rows))}
    for _ in range(repeats):
        for i, (_, _, run) in enumerate(rows):
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            run(eps_fn, s, shape, x_T)
            sync(device)
            times[i][0].append(time.perf_counter() - wall)
            times[i][1].append(time.process_time() - cpu)
    return {i: (statistics.median(w), statistics.median(c)) for i, (w, c) in times.items()}


def table(rows, results, batch: int, precision: str) -> list[str]:
    ddpm = [(n, results[i]) for i, (name, n, _) in enumerate(rows) if name.startswith("DDPM")]
    n_ref, (w_ref, c_ref) = max(ddpm, key=lambda r: r[0])
    base_w, base_c = w_ref / n_ref * T / batch, c_ref / n_ref * T / batch
    how = "measured" if n_ref == T else f"extrapolated from DDPM-{n_ref}"
    lines = [f"{precision}, batch {batch}: baseline DDPM-1000 = {base_w:.2f} s/sample wall, "
             f"{base_c:.2f} s/sample CPU ({how})",
             f"{'sampler':<18} {'steps':>5} {'samples/s':>10} {'s/sample wall':>14} {'s/sample CPU':>13} "
             f"{'vs DDPM-1000 (CPU)':>19}"]
    for i, (name, n, _) in enumerate(rows):
        w, c = results[i][0] / batch, results[i][1] / batch
        lines.append(f"{name:<18} {n:>5} {1 / w:>10.2f} {w:>14.3f} {c:>13.3f} {base_c / c:>18.1f}x")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="images per batch (lesson 03's FID sweep: 128)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default runtime.device())")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ddpm-steps", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--dpm-steps", type=int, nargs="+", default=[10, 20])
    p.add_argument("--ddpm-1000", action="store_true", help="measure DDPM with all 1000 steps (slow on a CPU)")
    p.add_argument("--bf16", action="store_true", help="also time under bf16 autocast")
    p.add_argument("--note", default="", help="a line added to the header, e.g. about a shared machine")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "samplers.txt")
    args = p.parse_args(argv)

    from course_lib import runtime
    device = runtime.device(args.device)
    threads = runtime.set_threads()
    torch.manual_seed(0)
    model = UNet(preset("fashion", learn_sigma=True)).eval().to(device)
    params = sum(q.numel() for q in model.parameters())
    s, shape = named_schedule("linear", T), (args.batch, 1, 28, 28)
    rows = configurations(args.ddpm_steps, args.ddim_steps, args.dpm_steps, args.ddpm_1000)
    started = time.perf_counter()
    out = [f"# samplers: seconds per sample, {datetime.date.today()}",
           f"# hardware: {hardware(device)}, device {device}, torch {torch.__version__}, "
           f"{threads} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
           f"1-minute load average {os.getloadavg()[0]:.2f} at the start",
           f"# model: UNet(preset('fashion', learn_sigma=True)), {params:,} parameters, freshly initialised "
           "(timing does not depend on weights); linear schedule, T = 1000",
           f"# median of {args.repeats} runs per row, rows run round-robin; DDIM and DPM-Solver++ on trailing "
           "spacing, DDPM on ADM's even respacing with learned variance"]
    if args.note:
        out.append(f"# note: {args.note}")
    for precision in ["fp32"] + (["bf16 autocast"] if args.bf16 else []):
        eps_fn = model_fn(model, bf16=precision != "fp32")
        with torch.no_grad():
            eps_fn(torch.zeros(shape, device=device), torch.zeros(args.batch, dtype=torch.long, device=device))
        out += [""] + table(rows, measure(rows, eps_fn, s, shape, args.repeats, device), args.batch, precision)
    out.append(f"\n# whole run: {time.perf_counter() - started:.0f} s; 1-minute load average {os.getloadavg()[0]:.2f} at the end")
    text = "\n".join(out) + "\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
