"""What the flash-attention kernels compile to on a Hopper GPU, found without one.

Triton compiles a kernel to PTX on the CPU, and its bundled `ptxas` assembles the PTX for any
GPU architecture, also on the CPU. So the properties that decide speed can be read from the
compiled code before any GPU runs it: how many registers a thread needs and whether ptxas had
to spill some to local memory, how much shared memory the pipeline takes, whether the loads
of Q, K and V are 16-byte vectors or asynchronous copies (`cp.async`, or TMA's `cp.async.bulk`)
rather than 2-byte scalars, and whether the matrix products use Hopper's `wgmma`.

    python -m course_lib.kernels.ptx_report            # every configuration the autotuner may pick, as a table
    python -m course_lib.kernels.ptx_report --json     # the same, one JSON object per line

`compile_config` compiles one (kernel, head dim, block configuration) with the same arguments
and specialisation as a real launch (`flash_attention.fwd_args`, ...), for `GPUTarget("cuda", 90, 32)`.
tests/kernels/test_ptx_sm90.py asserts the properties; lesson 10 shows the table.
This module must run with TRITON_INTERPRET unset (the tests start it in a subprocess).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")
HEAD_DIMS = (40, 64, 80, 128, 160)
ARCH = 90

# PTX instruction patterns (each counted over the whole kernel)
PATTERNS = {
    "cp_async": r"\bcp\.async\.c[ag]\.shared\.global",       # Ampere-style asynchronous copy, 4/8/16 bytes
    "tma": r"\bcp\.async\.bulk\.tensor",                      # Hopper's tensor memory accelerator
    "ld_v4": r"\bld\.global(?:\.[\w:]+)*\.v4\.",             # 16-byte vector loads (or v4 of 32 bit)
    "ld_v2": r"\bld\.global(?:\.[\w:]+)*\.v2\.",
    "ld_scalar_16": r"\bld\.global(?:\.(?!v[248]\b)[\w:]+)*\.[bu]16\b",  # one bf16/fp16 element per instruction
    "wgmma": r"\bwgmma\.mma_async",
    "mma_sync": r"\bmma\.sync",
    "atom": r"\b(?:red|atom)\.global",
}


def sm90_unavailable_reason():
    """None if this Triton can compile for sm_90 here; otherwise why not, in words."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: Triton's interpreter compiles nothing (run this in a fresh process)"
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:  # noqa: BLE001 - any missing piece means the same: cannot check
        return f"this Triton build has no NVIDIA backend ({type(e).__name__}: {e})"
    try:
        path = get_ptxas(ARCH).path
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as e:  # noqa: BLE001
        return f"Triton's bundled ptxas cannot run here ({type(e).__name__}: {e})"
    return None


def _sample_inputs(d, dv, dtype, L=1024, B=2, H=8):
    """CPU tensors of a Stable-Diffusion-like problem: what a launch would see, never read."""
    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)
    q, k, v, o, do = t(B, H, L, d), t(B, H, L, d), t(B, H, L, dv), t(B, H, L, dv), t(B, H, L, dv)
    lse, delta = t(B, H, L, dt=torch.float32), t(B, H, L, dt=torch.float32)
    kpm = torch.ones(B, L, dtype=torch.int32)
    return q, k, v, o, do, lse, delta, kpm


def kernel_args(kernel, d, dv, dtype, causal=False, has_kpm=False, atomic_dq=False):
    """(positional args, constexprs) of a launch of `kernel`, from flash_attention's own builders."""
    from course_lib.kernels import flash_attention as fa
    q, k, v, o, do, lse, delta, kpm = _sample_inputs(d, dv, dtype)
    kpm = kpm if has_kpm else None
    scale = d ** -0.5
    if kernel == "_attn_fwd":
        return fa.fwd_args(q, k, v, o, lse, kpm, causal, scale, "ieee")
    if kernel == "_attn_bwd_dkdv":
        dq_acc = torch.empty(q.shape, dtype=torch.float32) if atomic_dq else torch.empty(1)
        return fa.bwd_dkdv_args(q, k, v, do, lse, delta, kpm, torch.empty_like(k), torch.empty_like(v), dq_acc,
                                causal, scale, "ieee")
    return fa.bwd_dq_args(q, k, v, do, lse, delta, kpm, torch.empty_like(q), causal, scale, "ieee")


def _signature(fn, args, const):
    """Triton's own specialisation of the arguments: types, 16-divisibility, ints equal to 1 as constants."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    bound = dict(zip([n for n in fn.arg_names if n not in const], args))
    signature, constexprs, attrs = {}, dict(const), {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            continue
        ty, spec = native_specialize_impl(BaseBackend, bound[name], False, True, True)
        if ty == "constexpr":  # an int equal to 1: compiled in as a constant, as at a real launch
            signature[name] = "constexpr"
            constexprs[name] = spec
        else:
            signature[name] = ty
            if isinstance(spec, str):
                attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def _ptxas_report(ptx):
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on this PTX for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(ARCH).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{ARCH}a", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stores, loads = (int(spill.group(1)), int(spill.group(2))) if spill else (0, 0)
    return regs, stores, loads


def compile_config(kernel, d, config, dtype=torch.bfloat16, dv=None, causal=False, has_kpm=False,
                   atomic_dq=False):
    """Compile one configuration for sm_90 and read its PTX and ptxas report: a dict of properties."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from course_lib.kernels import flash_attention as fa
    dv = d if dv is None else dv
    block_m, block_n, num_warps, num_stages = config
    fn = getattr(fa, kernel)
    args, const = kernel_args(kernel, d, dv, dtype, causal, has_kpm, atomic_dq)
    const = dict(const, BLOCK_M=block_m, BLOCK_N=block_n)
    signature, constexprs, attrs = _signature(fn, args, const)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", ARCH, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    regs, spill_stores, spill_loads = _ptxas_report(ptx)
    row = dict(kernel=kernel, d=d, dv=dv, dtype=str(dtype).replace("torch.", ""), causal=causal, kpm=has_kpm,
               atomic_dq=atomic_dq, block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
               align=const["ALIGN"], registers=regs, spill_stores=spill_stores, spill_loads=spill_loads,
               shared=compiled.metadata.shared, seconds=round(time.perf_counter() - start, 2))
    row.update({name: len(re.findall(p, ptx)) for name, p in PATTERNS.items()})
    return row


def configurations(head_dims=HEAD_DIMS, elem=2):
    """Every distinct (kernel, d, config, variant) to compile: the autotuner's candidates at each head dim,
    plus the causal + padding-mask variants and the atomic-dQ backward at one head dim."""
    from course_lib.kernels import flash_attention as fa
    jobs = []
    for kernel in KERNELS:
        for d in head_dims:
            for config in fa.candidate_configs(kernel, d, d, elem):
                jobs.append(dict(kernel=kernel, d=d, config=config))
    for kernel in KERNELS:  # the masked paths, at the SD2 / GLIDE head dim, with the first candidate
        config = fa.candidate_configs(kernel, 64, 64, elem)[0]
        jobs.append(dict(kernel=kernel, d=64, config=config, causal=True, has_kpm=True))
    for d in (64, 128):
        config = fa.candidate_configs("_attn_bwd_dkdv", d, d, elem)[0]
        jobs.append(dict(kernel="_attn_bwd_dkdv", d=d, config=config, atomic_dq=True))
    return jobs


def _run(job):
    try:
        return compile_config(**job)
    except Exception as e:  # noqa: BLE001 - reported, and the tests fail on it
        return dict(job, config=list(job["config"]), error=f"{type(e).__name__}: {e}"[:2000])


def report(jobs=None, workers=None):
    """Compile every job (in `workers` processes) and return the rows, in the order of the jobs."""
    jobs = configurations() if jobs is None else jobs
    workers = workers or min(4, os.cpu_count() or 1)
    if workers == 1:
        return [_run(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, jobs))


HEADER = (f"{'kernel':15s} {'D':>3s} {'variant':12s} {'BM':>4s} {'BN':>4s} {'warps':>5s} {'stages':>6s} "
          f"{'regs':>4s} {'spill':>5s} {'smem KB':>7s} {'cp.async':>8s} {'ld.v4':>5s} {'ld.b16':>6s} {'wgmma':>5s}")


def format_row(r):
    if "error" in r:
        return f"{r['kernel']:15s} {r['d']:3d} ERROR {r['error'][:200]}"
    variant = "+".join(n for n, on in (("causal", r["causal"]), ("kpm", r["kpm"]), ("atomic", r["atomic_dq"])) if on)
    return (f"{r['kernel']:15s} {r['d']:3d} {variant or 'plain':12s} {r['block_m']:4d} {r['block_n']:4d} "
            f"{r['num_warps']:5d} {r['num_stages']:6d} {r['registers']:4d} {r['spill_stores'] + r['spill_loads']:5d} "
            f"{r['shared'] / 1024:7.1f} {r['cp_async'] + r['tma']:8d} {r['ld_v4']:5d} {r['ld_scalar_16']:6d} "
            f"{r['wgmma']:5d}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    reason = sm90_unavailable_reason()
    if reason:
        print(json.dumps({"unavailable": reason}) if args.json else f"cannot compile for sm_90 here: {reason}")
        return 0
    import triton
    rows = report(configurations(tuple(args.head_dims)), args.workers)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    lines = [f"# course_lib.kernels.ptx_report: the flash-attention kernels compiled for sm_90a on the CPU "
             f"(triton {triton.__version__}, bundled ptxas), bf16, no GPU involved",
             "# regs: registers per thread (ptxas -v); spill: spill store + load bytes; smem: shared memory per block;",
             "# cp.async: asynchronous global->shared copies; ld.v4: 16-byte vector loads; ld.b16: scalar 2-byte loads",
             HEADER] + [format_row(r) for r in rows]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
