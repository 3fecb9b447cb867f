"""`course sample`: a labelled grid (and single images) from tiny, randomly initialised checkpoints
saved with save_pair into a temporary checkpoint folder; conditions checked against the model;
every bad argument is exit status 2 with the reason on stderr. Few steps, a handful of samples."""
import dataclasses

import matplotlib.image
import pytest
import torch

from course_lib import cli
from course_lib.nn.unet import preset
from course_lib.samplers.config import SamplerConfig
from course_lib.training import checkpoints, recipes


def tiny_glide_recipe():
    glide = pytest.importorskip("course_lib.models.glide")
    config = glide.GlideConfig(unet=preset("tiny", context_dim=32, in_channels=3, image_size=16,
                                           attention_resolutions=(8,)), text_width=32, text_layers=1, text_heads=2)
    return dataclasses.replace(recipes.get("tiny_ddpm"), name="tiny_glide", task="glide", model_config=config,
                               data="shapes")


def randomized(model):
    """Every weight drawn at random (the UNet's zero-initialised output layer would make eps = 0 for
    every class, and guidance a no-op)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A checkpoint folder with tiny_ddpm (unconditional) and tiny_cond (10 classes, null class 10)."""
    cond = dataclasses.replace(recipes.get("tiny_ddpm"), name="tiny_cond",
                               model_config=preset("tiny", num_classes=10, learn_sigma=True))
    monkeypatch.setitem(recipes.RECIPES, "tiny_cond", cond)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_DIR", tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    torch.manual_seed(0)
    for name in ("tiny_ddpm", "tiny_cond"):
        r = recipes.get(name)
        checkpoints.save_pair(tmp_path / "ckpt" / f"{name}.safetensors", randomized(r.build_model()),
                              {"name": name, "metrics": {"fid": 123.4}})
    return tmp_path


def sample(folder, *argv):
    return cli.main(["sample", *argv, "--out", str(folder / "grid.png"), "--device", "cpu"])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_unconditional_grid_and_single_images(folder, sampler, capsys):
    assert sample(folder, "tiny_ddpm", "--n", "3", "--steps", "2", "--sampler", sampler,
                  "--out-dir", str(folder / "one")) == 0
    grid = matplotlib.image.imread(folder / "grid.png")
    assert grid.ndim == 3 and grid.shape[0] > 50 and grid.shape[1] > 100
    singles = sorted((folder / "one").iterdir())
    assert [p.name for p in singles] == ["000_0.png", "001_1.png", "002_2.png"]
    assert matplotlib.image.imread(singles[0]).shape[:2] == (28, 28)
    out = capsys.readouterr().out
    assert "wrote" in out and "2 steps" in out and "3 samples" in out


def test_class_conditional_with_guidance_labels_each_tile(folder, capsys):
    assert sample(folder, "tiny_cond", "--class", "7", "--class", "bag", "--guidance", "3", "--n", "4",
                  "--steps", "2", "--sampler", "ddpm", "--out-dir", str(folder / "one")) == 0
    names = sorted(p.name for p in (folder / "one").iterdir())
    assert names == ["000_sneaker.png", "001_bag.png", "002_sneaker.png", "003_bag.png"]
    assert "guidance s=3" in capsys.readouterr().out


def test_guidance_and_seed_change_the_samples_and_s1_is_the_conditional_model(folder):
    recipe, model, _ = cli.load_for_sampling("tiny_cond", "cpu")
    config = SamplerConfig("ddim", steps=2, clip_x0=False)   # clipped, 2 steps from pure noise give only signs
    y = torch.tensor([3, 5])

    def draw(scale, seed=0):
        return cli.draw_samples(recipe, model, cli.SamplePlan(y, ["a", "b"], 10, scale), config, n=2, seed=seed)
    plain = draw(1.0)
    torch.testing.assert_close(draw(1.0), plain)               # same seed, same samples
    assert not torch.allclose(draw(1.0, seed=1), plain)
    # the tiny model's class embedding is random, so guidance at s=3 moves away from s=1
    assert not torch.allclose(draw(3.0), plain)
    unguided = cli.draw_samples(recipe, model, cli.SamplePlan(y, ["a", "b"], None, 1.0), config, n=2, seed=0)
    torch.testing.assert_close(unguided, plain)                # s = 1: no CFG pass at all, same samples


def test_a_checkpoint_given_by_path(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINT_DIR", tmp_path / "elsewhere")
    assert sample(folder, str(folder / "ckpt" / "tiny_ddpm.safetensors"), "--n", "2", "--steps", "1") == 0


@pytest.mark.parametrize("argv, message", [
    (["tiny_ddpm", "--class", "3"], "unconditional: it takes no --class"),
    (["tiny_ddpm", "--guidance", "2"], "no --guidance"),
    (["tiny_ddpm", "--prompt", "a red circle"], "takes no text prompt"),
    (["tiny_cond", "--prompt", "a red circle"], "takes no text prompt (it is class-conditional)"),
    (["tiny_cond", "--class", "Spaceship"], "unknown class 'Spaceship'"),
    (["tiny_cond", "--class", "12"], "classes 0..9"),
    (["tiny_cond", "--guidance", "-1"], "--guidance is a scale s >= 0"),
    (["tiny_ddpm", "--n", "0"], "--n must be between 1"),
    (["tiny_ddpm", "--steps", "0"], "--steps must be >= 1"),
    (["tiny_ddpm", "--steps", "5000"], "trained with T=1000"),
    (["fashion_classifier"], "not a diffusion model"),
    (["nosuch"], "unknown recipe or checkpoint 'nosuch'"),
])
def test_bad_arguments_exit_2_with_the_reason(folder, argv, message, capsys):
    assert sample(folder, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("course: ") and message in err, err


def test_missing_checkpoint_names_the_train_command(folder, capsys):
    assert sample(folder, "shapes_ddpm") == 2
    err = capsys.readouterr().err
    assert "has not been built" in err and "course train shapes_ddpm" in err


def test_out_must_be_a_png_in_an_existing_folder(folder, capsys):
    assert cli.main(["sample", "tiny_ddpm", "--out", str(folder / "grid.jpg")]) == 2
    assert cli.main(["sample", "tiny_ddpm", "--out", str(folder / "no" / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert "must name a .png" in err and "does not exist" in err


@pytest.mark.parametrize("argv", [["tiny_cond", "--class", "1", "--prompt", "x"], ["tiny_ddpm", "--sampler", "euler"],
                                  ["tiny_ddpm", "--n", "many"], []])
def test_usage_errors_exit_2(folder, argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", *argv])
    assert info.value.code == 2 and "usage: course sample" in capsys.readouterr().err


def test_text_conditional_model_takes_prompts(folder, monkeypatch, capsys):
    recipe = tiny_glide_recipe()
    monkeypatch.setitem(recipes.RECIPES, "tiny_glide", recipe)
    torch.manual_seed(0)
    checkpoints.save_pair(checkpoints.CHECKPOINT_DIR / "tiny_glide.safetensors", randomized(recipe.build_model()),
                          {"name": "tiny_glide", "metrics": {}})
    assert sample(folder, "tiny_glide", "--prompt", "a red circle", "--prompt", "a blue square on the left",
                  "--guidance", "3", "--n", "2", "--steps", "2", "--out-dir", str(folder / "one")) == 0
    assert sorted(p.name for p in (folder / "one").iterdir()) == ["000_a_red_circle.png",
                                                                  "001_a_blue_square_on_the_left.png"]
    assert matplotlib.image.imread(folder / "one" / "000_a_red_circle.png").shape[:2] == (16, 16)
    capsys.readouterr()
    assert sample(folder, "tiny_glide", "--class", "3") == 2
    assert sample(folder, "tiny_glide") == 2
    assert sample(folder, "tiny_glide", "--prompt", "a purple dragon", "--steps", "1", "--n", "1") == 2
    err = capsys.readouterr().err
    assert "give --prompt TEXT, not --class" in err and "give --prompt TEXT, e.g." in err
    assert "shapes vocabulary" in err


def test_shipped_glide_checkpoint_when_present(capsys, tmp_path):
    """The real shapes_glide, when it has been shipped: two prompts, one step."""
    if "shapes_glide" not in recipes.RECIPES or not (checkpoints.CHECKPOINT_DIR / "shapes_glide.safetensors").exists():
        pytest.skip("shapes_glide is not shipped yet (course train shapes_glide builds it)")
    assert cli.main(["sample", "shapes_glide", "--prompt", "a red circle", "--n", "2", "--steps", "1",
                     "--guidance", "3", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 0
