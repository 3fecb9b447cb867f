"""The `course` command: list, errors with exit status 2, and train -> checkpoint -> card, end to end
on a shrunken recipe with synthetic data and a stub evaluation classifier."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from course_lib import cli
from course_lib.data import fashion_mnist
from course_lib.eval import features, report
from course_lib.training import checkpoints, recipes


def test_list(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINT_DIR", tmp_path)
    (tmp_path / "tiny_ddpm.safetensors").write_bytes(b"")
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(recipes.RECIPES)
    for name in recipes.RECIPES:
        (line,) = [l for l in lines if l.startswith(name + " ")]
        assert ("shipped" in line) == (name == "tiny_ddpm")


def test_unknown_recipe_exits_2_naming_known(capsys):
    assert cli.main(["train", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("course: ") and "nosuch" in err
    for name in recipes.RECIPES:
        assert name in err


@pytest.mark.slow
def test_exit_status_of_the_command():
    proc = subprocess.run([sys.executable, "-m", "course_lib.cli", "train", "nosuch"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "known:" in proc.stderr


def test_evaluate_missing_checkpoint(capsys, tmp_path):
    assert cli.main(["evaluate", "tiny_ddpm", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "course train tiny_ddpm" in err


def test_usage_errors_exit_2():
    for argv in ([], ["frobnicate"], ["train"], ["train", "tiny_ddpm", "--steps", "many"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2


class _StubClassifier(nn.Module):
    """Stands in for the shipped eval classifier: features are a few pixels, logits a fixed map."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 10)

    def features(self, x):
        return x.flatten(1)[:, ::49]  # 16 pixels

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture
def shrunk(monkeypatch):
    """tiny_ddpm with 4 samples of 2 steps for its card, synthetic data, a stub evaluator."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (32,), generator=g)
    recipe = dataclasses.replace(recipes.get("tiny_ddpm"), batch_size=4, checkpoint_every=1,
                                 eval_samples=4, eval_steps=2)
    monkeypatch.setitem(recipes.RECIPES, "tiny_ddpm", recipe)
    monkeypatch.setattr(recipes, "_fashion", lambda split: (images, labels))
    monkeypatch.setattr(features, "_test_images", lambda: images)
    monkeypatch.setattr(fashion_mnist, "load", lambda split, **kw: fashion_mnist.FashionMNIST(
        images, labels, fashion_mnist.CLASS_NAMES))
    torch.manual_seed(0)
    stub = _StubClassifier()
    monkeypatch.setattr(report, "FashionEvaluator", lambda: features.FashionEvaluator(stub))
    return recipe


@pytest.mark.slow
def test_train_writes_checkpoint_and_card_then_resumes(shrunk, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli.main(["train", "tiny_ddpm", "--steps", "2", "--out", str(out)]) == 0
    path = out / "tiny_ddpm.safetensors"
    card = json.loads((out / "tiny_ddpm.json").read_text())
    assert card["name"] == "tiny_ddpm" and card["steps"] == 2 and card["file"] == path.name
    assert card["sha256"] == checkpoints.sha256(path) and card["bytes"] == path.stat().st_size
    assert card["recipe"]["eval_samples"] == 4 and "UNetConfig" in card["recipe"]["model_config"]
    m = card["metrics"]
    assert m["fid_samples"] == 4 and sum(m["class_histogram"]) == 4
    assert m["fid"] >= 0 and m["real_vs_real_fid"] >= -1e-6 and "2 respaced steps" in m["sampler"]
    assert card["parameters"] == sum(p.numel() for p in shrunk.build_model().parameters())
    assert card["hardware"] and card["final_loss"] > 0
    assert card["device"] == str(cli.runtime.device()) and card["processes"] == 1 and card["threads"] == torch.get_num_threads() >= 1
    assert card["precision"] in ("fp32", "bf16 autocast")
    # the saved weights are the EMA of training and load into the recipe's model
    model = checkpoints.load_weights(shrunk.build_model(), path)
    # the command resumes from the state file and the card counts all steps
    first_wall = card["wall_seconds"]
    assert cli.main(["train", "tiny_ddpm", "--steps", "3", "--out", str(out)]) == 0
    card = json.loads((out / "tiny_ddpm.json").read_text())
    assert card["steps"] == 3 and card["wall_seconds"] >= first_wall
    resumed = checkpoints.load_weights(shrunk.build_model(), path)
    assert not torch.equal(model.conv_in.weight, resumed.conv_in.weight)
    assert "saved" in capsys.readouterr().out
    # and `course evaluate` re-measures it
    assert cli.main(["evaluate", "tiny_ddpm", "--out", str(out)]) == 0
