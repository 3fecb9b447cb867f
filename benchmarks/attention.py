"""Benchmark the course's Triton flash-attention kernel against torch SDPA at full-scale shapes.

    python benchmarks/attention.py                 # on a CUDA GPU: bf16 and fp16, every shape, BHSD layout
    python benchmarks/attention.py --dtypes bf16 --shapes sd1-self-4096 sd1-cross --layouts bhsd bshd unet
    python benchmarks/attention.py --smoke         # no GPU: miniature shapes in Triton's interpreter,
                                                   # checks this script and the errors; no timings

For each shape, dtype and memory layout, three passes: forward ("fwd"), backward alone ("bwd",
the gradients of one saved forward, so the backward target can be read off) and both ("fwd+bwd"):
- median time of our kernel and of torch.nn.functional.scaled_dot_product_attention, measured in
  the same process on the same inputs, interleaved (ours, SDPA, ours, SDPA, ... over --rounds
  rounds of triton.testing.do_bench) so that clocks and temperature drift hit both alike;
- for small problems, where launch cost dominates, also the time inside a CUDA graph
  (triton.testing.do_bench_cudagraph): the kernels alone, without Python and launch overhead;
- TFLOP/s counting 4 * B * H * Lq * Lk * D per forward (two matmuls of 2 flops per multiply-add),
  halved for causal, 2.5 times that for the backward (five matmuls instead of two);
- "vs SDPA": SDPA's time divided by ours (above 1: our kernel is faster);
- which SDPA backend ran (flash, efficient, cudnn or math), asked per pass with requires_grad
  set as in that pass (cuDNN has no backward at D = 160, so FlashAttention-2 runs there);
- the max absolute error of both against the float64 reference, on the last batch element
  and its last two heads (the largest memory offsets), for the output and for dQ, dK, dV.
Layouts: "bhsd" contiguous (B, H, L, D); "bshd" a transposed (B, L, H, D), as after a linear
projection; "unet" positions contiguous and features strided, as the UNet's attention block gives.
The table is printed and written to benchmarks/results/attention_<device>.txt.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
from pathlib import Path

import torch

SHAPES = {  # name: (B, H, Lq, Lk, D, causal)
    "sd1-self-4096": (2, 8, 4096, 4096, 40, False),
    "sd1-self-1024": (2, 8, 1024, 1024, 80, False),
    "sd1-self-256": (2, 8, 256, 256, 160, False),
    "sd1-cross": (2, 8, 4096, 77, 40, False),
    "sd2-self": (2, 5, 4096, 4096, 64, False),
    "glide": (2, 6, 1024, 1152, 64, False),
    "unclip-prior": (2, 32, 81, 81, 64, True),
    "fa2-d64": (4, 32, 4096, 4096, 64, False),
    "fa2-d128": (4, 16, 4096, 4096, 128, False),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def flops(B, H, Lq, Lk, D, causal, pass_):
    f = 4 * B * H * Lq * Lk * D * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_]


def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sdpa_backend(q, k, v, causal, requires_grad):
    """Which kernel SDPA dispatches to for these inputs and this pass (flash, efficient, cudnn or math).

    torch._fused_sdp_choice is the function SDPA itself calls to choose, and the choice depends on
    requires_grad (some backends have no backward for some shapes); it is private, hence the guard.
    """
    try:
        from torch.nn.attention import SDPBackend
        q, k, v = (x.detach().requires_grad_(requires_grad) for x in (q, k, v))
        return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=causal)).name.lower().replace("_attention", "")
    except Exception as e:  # noqa: BLE001 - a newer torch may rename it; the table says so
        return f"? ({type(e).__name__})"


def max_errors(fn, q, k, v, do, causal, reference):
    """Max |error| against float64 on the last batch element's last two heads: (output, gradients)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, causal)
    grads = torch.autograd.grad(o, (q, k, v), do)
    part = (slice(-1, None), slice(-2, None))
    q64, k64, v64 = (x[part].detach().double().requires_grad_() for x in (q, k, v))
    o64 = reference(q64, k64, v64, causal=causal)
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), do[part].double())
    err_o = (o[part].double() - o64).abs().max().item()
    err_g = max((g[part].double() - g64).abs().max().item() for g, g64 in zip(grads, grads64))
    return err_o, err_g


def step(fn, q, k, v, do, causal, pass_):
    """A function running one pass: the forward, the backward of one saved forward, or both."""
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, causal)
        return run
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    if pass_ == "bwd":
        o = fn(q, k, v, causal)
        return lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    return lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)


def time_interleaved(fns, rounds, graph):
    """{name: median ms} over `rounds` rounds, each timing every function once, in turn."""
    import triton.testing
    bench = triton.testing.do_bench_cudagraph if graph else triton.testing.do_bench
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm up: autotuning and SDPA's workspace happen outside the timed (or captured) region
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench(fn, rep=max(20, 100 // rounds), return_mode="median"))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def miniature(shape):
    """The same kind of attention at interpreter scale: B=1, H=2, lengths over 96 divided by 32."""
    B, H, Lq, Lk, D, causal = shape
    small = lambda n: n if n <= 96 else max(16, n // 32)  # noqa: E731 (77 text tokens stay 77)
    return (1, 2, small(Lq), small(Lk), D, causal)


def make(B, H, L, D, dtype, device, layout, g):
    """A (B, H, L, D) tensor of N(0, 1) in the given memory layout."""
    if layout == "bshd":
        return torch.randn(B, L, H, D, generator=g, device=device, dtype=dtype).transpose(1, 2)
    if layout == "unet":
        return torch.randn(B, H, D, L, generator=g, device=device, dtype=dtype).transpose(2, 3)
    return torch.randn(B, H, L, D, generator=g, device=device, dtype=dtype)


SMALL_FLOPS = 2e10  # below this many forward FLOPs, launch cost matters: also time inside a CUDA graph


def run(names, dtypes, layouts, smoke, rounds=5):
    from course_lib.kernels.flash_attention import flash_attention
    from course_lib.kernels.reference import attention_reference
    ours = lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)  # noqa: E731
    device = "cpu" if smoke else "cuda"
    rows = []
    for name in names:
        shape = miniature(SHAPES[name]) if smoke else SHAPES[name]
        B, H, Lq, Lk, D, causal = shape
        for dname in dtypes:
            for layout in layouts:
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v, do = (make(B, H, L, D, DTYPES[dname], device, layout, g) for L in (Lq, Lk, Lk, Lq))
                do = do.contiguous()
                errs = {f: max_errors(f, q, k, v, do, causal, attention_reference) for f in (ours, sdpa)}
                for pass_ in ("fwd", "bwd", "fwd+bwd"):
                    row = dict(name=name, shape=shape, dtype=dname, layout=layout, pass_=pass_,
                               backend=sdpa_backend(q, k, v, causal, requires_grad=pass_ != "fwd"),
                               err_ours=errs[ours][pass_ != "fwd"], err_sdpa=errs[sdpa][pass_ != "fwd"])
                    if not smoke:
                        n = flops(*shape, pass_)
                        fns = dict(ours=step(ours, q, k, v, do, causal, pass_), sdpa=step(sdpa, q, k, v, do, causal, pass_))
                        ms = time_interleaved(fns, rounds, graph=False)
                        row.update(ms_ours=ms["ours"], ms_sdpa=ms["sdpa"],
                                   tflops_ours=n / ms["ours"] * 1e-9, tflops_sdpa=n / ms["sdpa"] * 1e-9)
                        if flops(*shape, "fwd") < SMALL_FLOPS:
                            try:
                                ms = time_interleaved(fns, rounds, graph=True)
                                row.update(graph_ours=ms["ours"], graph_sdpa=ms["sdpa"])
                            except Exception as e:  # noqa: BLE001 - a pass that cannot be captured: say so, go on
                                print(f"# {name} {dname} {layout} {pass_}: no CUDA-graph time ({type(e).__name__}: {e})")
                    rows.append(row)
                    print(format_row(row), flush=True)
                del q, k, v, do
                if not smoke:
                    torch.cuda.empty_cache()
    return rows


HEADER = (f"{'shape':14s} {'(B, H, Lq, Lk, D)':24s} {'causal':6s} {'dtype':5s} {'layout':6s} {'pass':7s} "
          f"{'ours ms':>8s} {'TFLOP/s':>7s} {'SDPA ms':>8s} {'TFLOP/s':>7s} {'vs SDPA':>7s} "
          f"{'graph ours':>10s} {'graph SDPA':>10s} {'SDPA backend':12s} {'err ours':>8s} {'err SDPA':>8s}")


def format_row(r):
    B, H, Lq, Lk, D, causal = r["shape"]
    timing = (f"{r['ms_ours']:8.3f} {r['tflops_ours']:7.1f} {r['ms_sdpa']:8.3f} {r['tflops_sdpa']:7.1f} "
              f"{r['ms_sdpa'] / r['ms_ours']:7.2f}" if "ms_ours" in r else f"{'-':>8s} {'-':>7s} {'-':>8s} {'-':>7s} {'-':>7s}")
    graph = (f"{r['graph_ours']:10.3f} {r['graph_sdpa']:10.3f}" if "graph_ours" in r else f"{'-':>10s} {'-':>10s}")
    return (f"{r['name']:14s} {str((B, H, Lq, Lk, D)):24s} {str(causal):6s} {r['dtype']:5s} {r['layout']:6s} "
            f"{r['pass_']:7s} {timing} {graph} {r['backend']:12s} {r['err_ours']:8.1e} {r['err_sdpa']:8.1e}")


def describe(smoke):
    import triton
    lines = [f"# benchmarks/attention.py, {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"# torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"]
    if smoke:
        lines.append("# SMOKE RUN in Triton's interpreter on the CPU, miniature shapes: errors only, NO timings")
    else:
        p = torch.cuda.get_device_properties(0)
        lines.append(f"# device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
                     f"CUDA {torch.version.cuda}, capability {p.major}.{p.minor}")
    lines += ["# time: median over interleaved rounds of triton.testing.do_bench (ours and SDPA in turn); graph: "
              "the same inside a CUDA graph (small shapes); TFLOP/s: 4*B*H*Lq*Lk*D per forward, /2 causal, "
              "x2.5 for bwd, x3.5 for fwd+bwd; SDPA backend: per pass, with requires_grad as in that pass",
              "# vs SDPA: SDPA time / our time (>1: ours faster); err: max |x - float64 reference| on the last "
              "batch element, last two heads (fwd: output; fwd+bwd: dQ, dK, dV)"]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--layouts", nargs="+", choices=["bhsd", "bshd", "unet"], default=["bhsd"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per pass")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU needed: miniature shapes in Triton's interpreter, errors only, nothing written")
    parser.add_argument("--out", type=Path, help="where to write the table (default benchmarks/results/attention_<device>.txt)")
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU (use --smoke to check the script on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32 in SDPA's math path, as in our kernel

    lines = describe(args.smoke)
    print("\n".join(lines))
    print(HEADER)
    rows = run(args.shapes, args.dtypes, args.layouts, args.smoke, args.rounds)
    table = lines + [HEADER] + [format_row(r) for r in rows]
    out = args.out
    if out is None and not args.smoke:
        device = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(0).lower()).strip("_")
        out = Path(__file__).parent / "results" / f"attention_{device}.txt"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(table) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
