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
    assert "(no card)" in [l for l in lines if l.startswith("tiny_ddpm ")][0]


def test_list_shows_headline_metrics_and_checkpoints_without_a_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINT_DIR", tmp_path)
    model = recipes.get("tiny_ddpm").build_model()
    checkpoints.save_pair(tmp_path / "tiny_ddpm.safetensors", model, {"name": "tiny_ddpm", "metrics": {
        "fid": 21.2812, "fid_samples": 1000, "sampler": "DDPM", "accuracy_by_t": {"0": 0.9, "500": 0.5}}})
    checkpoints.save_pair(tmp_path / "old_model.safetensors", model, {"name": "old_model", "metrics": {}})
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (tiny,) = [l for l in lines if l.startswith("tiny_ddpm ")]
    assert "fid=21.28" in tiny and "accuracy_by_t.0=0.9" in tiny and "fid_samples" not in tiny
    (old,) = [l for l in lines if l.startswith("old_model ")]
    assert "no recipe" in old and "no metrics" in old
    assert cli.headline({"a": 1, "b": 2.5, "c": 3, "d": 4, "e": 5}) == "a=1  b=2.5  c=3  d=4"


@pytest.mark.parametrize("command", ["list", "train", "evaluate", "sample", "run", "bench", "data"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0 and f"usage: course {command}" in capsys.readouterr().out


# ---------------------------------------------------------------------------- course bench

@pytest.fixture
def bench_dir(tmp_path):
    folder = tmp_path / "benchmarks"
    (folder / "results").mkdir(parents=True)
    (folder / "fast.py").write_text('''"""Time nothing, quickly."""
import sys
from pathlib import Path
Path(__file__).parent.joinpath("results", "fast.txt").write_text("rows " + " ".join(sys.argv[1:]) + "\\nratio 1.0x\\n")
print("measuring")
''')
    (folder / "broken.py").write_text('"""Always fails."""\nraise SystemExit(3)\n')
    (folder / "_helpers.py").write_text("")
    return folder


def test_bench_lists_scripts_with_their_first_docstring_line(bench_dir, capsys):
    assert cli.main(["bench", "--dir", str(bench_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[0] for l in lines] == ["broken", "fast"]
    assert "Time nothing, quickly." in lines[1] and "no results yet" in lines[1]


def test_bench_runs_a_script_with_its_arguments_and_prints_its_results(bench_dir, capsys):
    assert cli.main(["bench", "fast", "--dir", str(bench_dir), "--", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "rows --batch 4" in out and "ratio 1.0x" in out and str(bench_dir / "results" / "fast.txt") in out
    assert cli.main(["bench", "broken", "--dir", str(bench_dir)]) == 3
    assert "exited with status 3" in capsys.readouterr().err


def test_bench_unknown_name_exits_2(bench_dir, tmp_path, capsys):
    assert cli.main(["bench", "nosuch", "--dir", str(bench_dir)]) == 2
    assert "unknown benchmark 'nosuch'; known: broken, fast" in capsys.readouterr().err
    assert cli.main(["bench", "--dir", str(tmp_path / "none")]) == 2


def test_bench_lists_the_real_benchmarks_without_running_them(capsys):
    assert cli.main(["bench"]) == 0
    names = [l.split()[0] for l in capsys.readouterr().out.splitlines()]
    assert "samplers" in names and "unet_step" in names


# ---------------------------------------------------------------------------- course data

def test_data_reports_the_folder_it_found(tmp_path, monkeypatch, capsys):
    for name in fashion_mnist.FILES["train"] + fashion_mnist.FILES["test"]:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "apt_install", lambda: pytest.fail("nothing to install"))
    assert cli.main(["data"]) == 0
    out = capsys.readouterr().out
    assert f"fashion_mnist  {tmp_path} (COURSE_DATA_DIR)" in out and "shapes" in out and "generated" in out


def test_data_missing_without_fetch_names_the_three_ways(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "torchvision_fetch", lambda: pytest.fail("--no-fetch fetches nothing"))
    assert cli.main(["data", "--no-fetch"]) == 1
    captured = capsys.readouterr()
    assert "fashion_mnist  NOT FOUND" in captured.out
    assert "COURSE_DATA_DIR" in captured.err and "apt-get install dataset-fashion-mnist" in captured.err
    assert "torchvision" in captured.err


def test_data_fetch_installs_as_root_then_falls_back_to_torchvision(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(cli.Path, "home", lambda: tmp_path / "home")
    monkeypatch.setattr(cli, "_can_apt", lambda: True)
    calls = []
    monkeypatch.setattr(cli, "apt_install", lambda: calls.append("apt") or False)     # the install fails
    monkeypatch.setattr(cli, "torchvision_fetch", lambda: calls.append("torchvision") or False)   # no internet
    assert cli.main(["data"]) == 1
    assert calls == ["apt", "torchvision"]

    def install():   # the package puts the files where load() looks
        (tmp_path / "debian").mkdir()
        for name in fashion_mnist.FILES["train"] + fashion_mnist.FILES["test"]:
            (tmp_path / "debian" / name).write_bytes(b"")
        return True
    monkeypatch.setattr(cli, "apt_install", install)
    capsys.readouterr()
    assert cli.main(["data"]) == 0
    assert f"fashion_mnist  {tmp_path / 'debian'}" in capsys.readouterr().out


def test_data_finds_torchvisions_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(cli.Path, "home", lambda: tmp_path)
    raw = tmp_path / ".cache" / "course_lib" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in fashion_mnist.FILES["train"] + fashion_mnist.FILES["test"]:
        (raw / name.removesuffix(".gz")).write_bytes(b"")
    assert cli.main(["data", "--no-fetch"]) == 0
    assert f"{raw} (torchvision's download)" in capsys.readouterr().out


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
