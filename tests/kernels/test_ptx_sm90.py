"""The flash-attention kernels compiled for Hopper (sm_90a) on the CPU: the performance properties a GPU
run would confirm, checked from the PTX and ptxas' report, so that regressions stay out of CI.

For every configuration the autotuner may pick (`flash_attention.candidate_configs`) at head dims
40, 64, 80, 128 and 160, forward and both backward kernels, in bf16, plus the causal + padding-mask
variants and the atomic-dQ backward: no register spills, Q, K and V never read as scalar 2-byte
loads (16-byte vectors, and cp.async or TMA for the tiles a loop streams), the products on wgmma,
and the shared memory within the 227 KB of a Hopper block.

The compiles run once per session, in one subprocess without TRITON_INTERPRET (this test session
interprets the kernels; see conftest.py), `course_lib.kernels.ptx_report --json`. Each distinct
configuration compiles once; Triton's on-disk cache makes a second session fast. Skipped, with the
reason, where this Triton build cannot compile for sm_90 offline.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from course_lib.kernels import flash_attention as fa  # noqa: E402
from course_lib.kernels import ptx_report  # noqa: E402

JOBS = ptx_report.configurations()
TIMEOUT_S = int(os.environ.get("PTX_REPORT_TIMEOUT", "1800"))


def _key(job):
    c = job["config"]
    variant = "+".join(n for n in ("causal", "has_kpm", "atomic_dq") if job.get(n)) or "plain"
    return f"{job['kernel']}-d{job['d']}-{c[0]}x{c[1]}-w{c[2]}-s{c[3]}-{variant}"


@pytest.fixture(scope="module")
def rows():
    """key -> the report row of every job, compiled in one subprocess for the whole module."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run([sys.executable, "-c", "from course_lib.kernels import ptx_report as p; "
                            "print(p.sm90_unavailable_reason() or '')"],
                           env=env, capture_output=True, text=True, timeout=300)
    reason = probe.stdout.strip() or (probe.stderr.strip()[-500:] if probe.returncode else "")
    if reason:
        pytest.skip(f"cannot compile for sm_90 offline here: {reason}")
    out = subprocess.run([sys.executable, "-m", "course_lib.kernels.ptx_report", "--json"],
                         env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    got = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if "unavailable" in row:
                pytest.skip(f"cannot compile for sm_90 offline here: {row['unavailable']}")
            row_job = dict(kernel=row["kernel"], d=row["d"], config=row.get("config") or
                           (row["block_m"], row["block_n"], row["num_warps"], row["num_stages"]),
                           causal=row.get("causal"), has_kpm=row.get("kpm", row.get("has_kpm")),
                           atomic_dq=row.get("atomic_dq"))
            got[_key(row_job)] = row
    assert got, f"ptx_report printed no rows (exit {out.returncode}):\n{out.stderr[-3000:]}"
    return got


@pytest.mark.parametrize("job", JOBS, ids=[_key(j) for j in JOBS])
def test_compiled_for_hopper(job, rows):
    row = rows.get(_key(job))
    assert row is not None, f"{_key(job)} was not compiled"
    assert "error" not in row, row.get("error")
    where = f"{_key(job)}: {ptx_report.format_row(row)}"
    assert row["spill_stores"] == 0 and row["spill_loads"] == 0, f"register spills ({row['registers']} registers) in {where}"
    assert row["shared"] <= fa.SHARED_MEMORY_BYTES, f"shared memory over a Hopper block's 227 KB in {where}"
    assert row["ld_scalar_16"] == 0, f"scalar 2-byte global loads (Q, K, V or dO element by element) in {where}"
    assert row["cp_async"] + row["tma"] > 0, f"no asynchronous copies for the streamed tiles in {where}"
    assert row["wgmma"] > 0, f"the products do not use Hopper's wgmma in {where}"
    if job.get("atomic_dq"):
        assert row["atom"] > 0, f"the atomic-dQ variant adds no dQ in {where}"


def test_every_candidate_is_checked():
    """The jobs cover what the autotuner may pick: every candidate of every kernel at every head dim."""
    keys = {_key(j) for j in JOBS}
    for kernel in ptx_report.KERNELS:
        for d in ptx_report.HEAD_DIMS:
            for c in fa.candidate_configs(kernel, d, d, 2):
                assert _key(dict(kernel=kernel, d=d, config=c)) in keys
