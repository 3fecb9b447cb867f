"""Crash test of `course train`: kill it (SIGKILL, no cleanup) at chosen file operations, in the
middle of checkpoint and card writes, and at random moments; after every kill each checkpoint on
disk must load and match its card, and the training state must load; resuming after the last kill
must end bit-identical to a run that was never interrupted, with no temporary files left.

The process under test is tests/training/crash_driver.py (a shrunk tiny_ddpm recipe on synthetic
data with a stub evaluator), which kills itself at the file operation named by CRASH_AT.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course_lib.training import checkpoints, recipes
from course_lib.training.ema import EMA

DRIVER = Path(__file__).with_name("crash_driver.py")
NAME = "tiny_ddpm"
W, STATE, CARD = f"{NAME}.safetensors", f"{NAME}.state.safetensors", f"{NAME}.json"

# (steps asked, where to die): phase 1 trains to 4 steps, phase 2 continues to 6 over a shipped pair
PLAN = [
    (4, f"save_file:{STATE}"),            # halfway through the first state file
    (4, f"replace:{STATE}:2"),             # the second state file written, not yet renamed
    (4, f"save_file:{W}"),                 # halfway through the weights (after training and measuring)
    (4, f"write_text:{CARD}.pending"),     # halfway through the new card
    (4, None),                             # completes phase 1: a pair at 4 steps
    (6, f"replace:{CARD}.pending"),        # new weights and card written in full, neither renamed
    (6, f"replace:{W}"),                   # about to replace the weights of the pair at 4 steps
    (6, f"replace:{CARD}"),                # new weights in place, old card still there: the pending card matches
    (6, "random"),
    (6, "random"),
]


def _run(out: Path, steps: int, crash=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", CRASH_AT=crash or "")
    return subprocess.Popen([sys.executable, str(DRIVER), str(out), str(steps)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _check_disk(out: Path) -> None:
    """What a reader sees: a weights file only beside a card of those weights; a state file that loads."""
    weights, card = out / W, out / CARD
    assert weights.exists() or not card.exists(), "a card without its weights"
    if weights.exists():
        model, found = checkpoints.load_verified(recipes.get(NAME).build_model(), weights)
        assert found["sha256"] == checkpoints.sha256(weights)
    if (out / STATE).exists():
        model = recipes.get(NAME).build_model()
        step = checkpoints.load_training_state(out / STATE, model=model, ema=EMA(model),
                                               optimizer=torch.optim.AdamW(model.parameters()))
        assert step in (2, 4, 6)


def _same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_kills_during_training_and_writes_leave_matching_pairs_and_resume_exactly(tmp_path):
    reference = _run(tmp_path / "reference" / "ckpt", 6)        # runs alongside the chain below
    out = tmp_path / "crashed" / "ckpt"
    rng = random.Random(15)
    kills, started = 0, time.time()
    for steps, crash in PLAN:
        if crash == "random":
            proc = _run(out, steps)
            time.sleep(rng.uniform(0.2, 4.0))
            proc.send_signal(signal.SIGKILL)
        else:
            proc = _run(out, steps, crash)
        rc, stdout, stderr = _finish(proc)
        if crash is None or (crash == "random" and rc == 0):
            assert rc == 0, stderr
        else:
            assert rc == -signal.SIGKILL, f"{crash}: expected to be killed, exited {rc}\n{stderr[-2000:]}"
            kills += 1
        _check_disk(out)
    rc, _, stderr = _finish(_run(out, 6))                        # resume after the last kill, to the end
    assert rc == 0, stderr
    rc, _, stderr = _finish(reference)
    assert rc == 0, stderr
    ref = tmp_path / "reference" / "ckpt"
    assert _same_tensors(out / W, ref / W), "the resumed weights differ from an uninterrupted run's"
    assert _same_tensors(out / STATE, ref / STATE), "the resumed training state differs"
    card = json.loads((out / CARD).read_text())                  # the card itself, not a pending one
    assert card["steps"] == 6 and card["sha256"] == checkpoints.sha256(out / W)
    leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith((".tmp", ".pending")))
    assert leftovers == [], leftovers
    ops = (tmp_path / "crashed" / "ops.log").read_text().splitlines()
    chosen = sum(1 for _, c in PLAN if c not in (None, "random"))
    assert kills >= chosen
    print(f"\ncrash test: {kills} kills survived ({chosen} at chosen file operations, {kills - chosen} at random "
          f"moments), {len(ops)} file operations, {time.time() - started:.0f} s")
