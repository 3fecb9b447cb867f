"""Runs `course train tiny_ddpm --out OUT --steps N` on a shrunk recipe (synthetic data, a stub
evaluation classifier), for tests/training/test_crash.py. Not a test itself.

With CRASH_AT=KIND:NAME[:N] in the environment the process SIGKILLs itself at the N-th (default
first) file operation of that kind on that file: `save_file` or `write_text` of a temporary whose
name starts with NAME (killed halfway through its bytes), or `replace` onto the file NAME (killed
just before the rename). Every operation is also appended to OUT/../ops.log as `KIND NAME`.

    python crash_driver.py OUT STEPS
"""
import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from course_lib import cli
from course_lib.data import fashion_mnist
from course_lib.eval import features, report
from course_lib.training import checkpoints, recipes

CRASH_AT = os.environ.get("CRASH_AT", "")
LOG = None
_seen = {}


def _matches(kind, name) -> bool:
    if not CRASH_AT:
        return False
    want_kind, want_name, *n = CRASH_AT.split(":")
    hit = kind == want_kind and (name == want_name if kind == "replace" else name.startswith(want_name + "."))
    if hit:
        _seen[CRASH_AT] = _seen.get(CRASH_AT, 0) + 1
    return hit and _seen[CRASH_AT] == int(n[0] if n else 1)


def _tick(kind, target, half_write=None):
    name = Path(target).name
    with open(LOG, "a") as f:
        f.write(f"{kind} {name}\n")
    if _matches(kind, name):
        if half_write is not None:
            half_write()
        os.kill(os.getpid(), signal.SIGKILL)


def _instrument():
    real_save_file, real_replace, real_write_text = checkpoints.save_file, os.replace, Path.write_text

    def save_file(tensors, filename, metadata=None):
        def half():
            real_save_file(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[:len(data) // 2])
        _tick("save_file", filename, half)
        return real_save_file(tensors, filename, metadata=metadata)

    def replace(src, dst, **kw):
        _tick("replace", dst)
        return real_replace(src, dst, **kw)

    def write_text(self, data, *args, **kw):
        _tick("write_text", self, lambda: real_write_text(self, data[:len(data) // 2], *args, **kw))
        return real_write_text(self, data, *args, **kw)

    checkpoints.save_file = save_file
    os.replace = replace
    Path.write_text = write_text


class StubClassifier(nn.Module):
    """Stands in for the shipped eval classifier: features are a few pixels, logits a fixed map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(16, 10)

    def features(self, x):
        return x.flatten(1)[:, ::49]

    def forward(self, x, t=None):
        return self.head(self.features(x))


def _shrink():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (32,), generator=g)
    recipes.RECIPES["tiny_ddpm"] = dataclasses.replace(recipes.get("tiny_ddpm"), batch_size=4, checkpoint_every=2,
                                                       warmup=2, eval_samples=4, eval_steps=2)
    recipes._fashion = lambda split: (images, labels)
    features._test_images = lambda: images
    fashion_mnist.load = lambda split, **kw: fashion_mnist.FashionMNIST(images, labels, fashion_mnist.CLASS_NAMES)
    stub = StubClassifier()
    report.FashionEvaluator = lambda: features.FashionEvaluator(stub)


def main(out: str, steps: str) -> int:
    global LOG
    LOG = Path(out).parent / "ops.log"
    _shrink()
    _instrument()
    return cli.main(["train", "tiny_ddpm", "--out", out, "--steps", steps])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
