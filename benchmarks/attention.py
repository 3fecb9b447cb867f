"""Benchmark the course's Triton flash-attention kernel against torch SDPA at full-scale shapes.

    python benchmarks/attention.py                 # on a CUDA GPU: bf16 and fp16, every shape
    python benchmarks/attention.py --dtypes bf16 --shapes sd1-self-4096 sd1-cross
    python benchmarks/attention.py --smoke         # no GPU: miniature shapes in Triton's interpreter,
                                                   # checks this script and the errors; no timings

For each shape and dtype, forward ("fwd") and forward + backward ("fwd+bwd"):
- median time over repeated runs (triton.testing.do_bench) of our kernel and of
  torch.nn.functional.scaled_dot_product_attention, measured in the same process, same inputs;
- TFLOP/s counting 4 * B * H * Lq * Lk * D per forward (two matmuls of 2 flops per multiply-add),
  halved for causal, and 2.5 times that for the backward (five matmuls instead of two);
- "vs SDPA": SDPA's time divided by ours (above 1: our kernel is faster);
- which SDPA backend ran (flash, efficient, cudnn or math), as SDPA's own dispatcher chooses it;
- the max absolute error of both against the float64 reference, on the last batch element
  and its last two heads (the largest memory offsets), for the output and for dQ, dK, dV.
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


def flops(B, H, Lq, Lk, D, causal, backward):
    f = 4 * B * H * Lq * Lk * D * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f  # forward + backward = (1 + 2.5) forwards


def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sdpa_backend(q, k, v, causal):
    """Which kernel SDPA dispatches to for these inputs (flash, efficient, cudnn or math).

    torch._fused_sdp_choice is the function SDPA itself calls to choose; it is private, hence the guard.
    """
    try:
        from torch.nn.attention import SDPBackend
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


def time_ms(fn, q, k, v, do, causal, backward):
    import triton.testing
    if backward:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))

        def step():
            fn(q, k, v, causal).backward(do)
        return triton.testing.do_bench(step, grad_to_none=[q, k, v], return_mode="median")
    with torch.no_grad():
        return triton.testing.do_bench(lambda: fn(q, k, v, causal), return_mode="median")


def miniature(shape):
    """The same kind of attention at interpreter scale: B=1, H=2, lengths over 96 divided by 32."""
    B, H, Lq, Lk, D, causal = shape
    small = lambda n: n if n <= 96 else max(16, n // 32)  # noqa: E731 (77 text tokens stay 77)
    return (1, 2, small(Lq), small(Lk), D, causal)


def run(names, dtypes, smoke):
    from course_lib.kernels.flash_attention import flash_attention
    from course_lib.kernels.reference import attention_reference
    ours = lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)  # noqa: E731
    device = "cpu" if smoke else "cuda"
    rows = []
    for name in names:
        shape = miniature(SHAPES[name]) if smoke else SHAPES[name]
        B, H, Lq, Lk, D, causal = shape
        for dname in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v, do = (torch.randn(B, H, L, D, generator=g, device=device, dtype=DTYPES[dname])
                           for L in (Lq, Lk, Lk, Lq))
            errs = {f: max_errors(f, q, k, v, do, causal, attention_reference) for f in (ours, sdpa)}
            backend = sdpa_backend(q, k, v, causal)
            for backward in (False, True):
                row = dict(name=name, shape=shape, dtype=dname, pass_="fwd+bwd" if backward else "fwd",
                           backend=backend, err_ours=errs[ours][backward], err_sdpa=errs[sdpa][backward])
                if not smoke:
                    n = flops(*shape, backward)
                    row["ms_ours"] = time_ms(ours, q, k, v, do, causal, backward)
                    row["ms_sdpa"] = time_ms(sdpa, q, k, v, do, causal, backward)
                    row["tflops_ours"] = n / row["ms_ours"] * 1e-9
                    row["tflops_sdpa"] = n / row["ms_sdpa"] * 1e-9
                rows.append(row)
                print(format_row(row), flush=True)
            del q, k, v, do
            if not smoke:
                torch.cuda.empty_cache()
    return rows


HEADER = (f"{'shape':14s} {'(B, H, Lq, Lk, D)':24s} {'causal':6s} {'dtype':5s} {'pass':7s} "
          f"{'ours ms':>8s} {'TFLOP/s':>7s} {'SDPA ms':>8s} {'TFLOP/s':>7s} {'vs SDPA':>7s} {'SDPA backend':12s} "
          f"{'err ours':>8s} {'err SDPA':>8s}")


def format_row(r):
    B, H, Lq, Lk, D, causal = r["shape"]
    timing = (f"{r['ms_ours']:8.3f} {r['tflops_ours']:7.1f} {r['ms_sdpa']:8.3f} {r['tflops_sdpa']:7.1f} "
              f"{r['ms_sdpa'] / r['ms_ours']:7.2f}" if "ms_ours" in r else f"{'-':>8s} {'-':>7s} {'-':>8s} {'-':>7s} {'-':>7s}")
    return (f"{r['name']:14s} {str((B, H, Lq, Lk, D)):24s} {str(causal):6s} {r['dtype']:5s} {r['pass_']:7s} "
            f"{timing} {r['backend']:12s} {r['err_ours']:8.1e} {r['err_sdpa']:8.1e}")


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
    lines += ["# time: median of triton.testing.do_bench; TFLOP/s: 4*B*H*Lq*Lk*D per forward, /2 causal, "
              "x3.5 for fwd+bwd",
              "# vs SDPA: SDPA time / our time (>1: ours faster); err: max |x - float64 reference| on the last "
              "batch element, last two heads (fwd: output; fwd+bwd: dQ, dK, dV)"]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp16"])
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
    rows = run(args.shapes, args.dtypes, args.smoke)
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
