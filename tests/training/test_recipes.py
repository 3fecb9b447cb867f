"""Every recipe builds its model; unknown names list the known ones."""
import dataclasses

import pytest
import torch

from course_lib.data.shapes import FIELD_CLASSES
from course_lib.models.clip import NoisyCLIP, ShapesCLIP
from course_lib.models.glide import Glide, Prompt
from course_lib.nn.attributes import AttributeClassifier
from course_lib.nn.classifier import FashionClassifier, NoisyClassifier
from course_lib.nn.unet import UNet
from course_lib.training import recipes


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_builds_and_runs_its_model(name):
    r = recipes.get(name)
    assert r.name == name and r.description
    model = r.build_model().eval()
    size = r.image_size if r.data == "shapes" else 28
    x = torch.zeros(1, 3, size, size) if r.data == "shapes" else torch.zeros(1, 1, 28, 28)
    t = torch.tensor([r.T - 1])
    with torch.no_grad():
        if r.task == "diffusion":
            assert isinstance(model, UNet)
            out = model(x, t)
            assert out.shape == (1, model.config.out_channels, *x.shape[-2:])
            sched = r.noise_schedule()
            assert sched.T == r.T and r.noise_schedule() is sched  # computed once
        elif r.task == "noisy_classify":
            assert isinstance(model, NoisyClassifier)
            assert model(x, t).shape == (1, 10)
        elif r.task == "attributes":
            assert isinstance(model, AttributeClassifier)
            assert model(x).shape == (1, sum(FIELD_CLASSES.values()))
        elif r.task == "clip":
            assert isinstance(model, ShapesCLIP)
            img, txt = model(x, model.tokens(["a red circle"]))
            assert img.shape == txt.shape == (1, 128)
        elif r.task.startswith("glide"):
            assert isinstance(model, Glide) and model.config.image_size == size
            cond = {"glide": Prompt(["a red circle"]),
                    "glide_inpaint": Prompt(["a red circle"], image=x, mask=torch.ones(1, 1, size, size)),
                    "glide_upsample": Prompt(["a red circle"], low_res=torch.zeros(1, 3, 32, 32),
                                             aug_level=torch.zeros(1, dtype=torch.long))}[r.task]
            assert model(x, t, cond).shape == x.shape
        elif r.task == "noisy_clip":
            assert isinstance(model, NoisyCLIP)
            assert model.encode_image(x, t).shape == (1, 128)
        else:
            assert isinstance(model, FashionClassifier)
            assert model(x).shape == (1, 10)
    assert r.task in ("diffusion", "classify", "noisy_classify", "attributes", "clip", "noisy_clip", "glide",
                      "glide_inpaint", "glide_upsample")
    assert 0 < r.batch_size and 0 < r.steps and 0 < r.lr and 0 <= r.ema_decay < 1


def test_shapes_recipes_share_the_schedule_and_the_clip_pair():
    ddpm, noisy = recipes.get("shapes_ddpm"), recipes.get("shapes_noisy_clip")
    assert (noisy.schedule, noisy.T) == (ddpm.schedule, ddpm.T)   # the noisy CLIP reads the model's x_t
    assert noisy.init_from == "shapes_clip" and noisy.model_config.init_from == "shapes_clip"
    images, labels = recipes.get("shapes_attributes").load_data("test")
    assert images.shape == (2000, 3, 32, 32) and labels.shape == (2000, 9)


def test_unknown_recipe_lists_known_names():
    with pytest.raises(KeyError) as info:
        recipes.get("nosuch")
    for name in recipes.RECIPES:
        assert name in str(info.value)


def test_recipe_errors():
    r = recipes.get("tiny_ddpm")
    with pytest.raises(TypeError, match="no model"):
        dataclasses.replace(r, model_config=object()).build_model()
    with pytest.raises(ValueError, match="unknown dataset"):
        dataclasses.replace(r, data="cifar").load_data()


def test_fashion_cond_is_the_fashion_ddpm_model_with_classes_and_label_dropout():
    cond, uncond = recipes.get("fashion_cond"), recipes.get("fashion_ddpm")
    assert cond.model_config == dataclasses.replace(uncond.model_config, num_classes=10)
    assert cond.label_dropout == 0.1 and uncond.label_dropout == 0.0
    assert (cond.batch_size, cond.schedule, cond.T) == (uncond.batch_size, uncond.schedule, uncond.T)
    assert cond.init_from == "fashion_ddpm" and uncond.init_from is None


def test_fashion_noisy_classifier_shares_the_diffusion_schedule():
    clf, ddpm = recipes.get("fashion_noisy_classifier"), recipes.get("fashion_ddpm")
    assert clf.task == "noisy_classify"
    assert (clf.schedule, clf.T) == (ddpm.schedule, ddpm.T)


def test_glide_recipes_chain_their_warm_starts():
    base, inpaint, up = recipes.get("shapes_glide"), recipes.get("shapes_glide_inpaint"), recipes.get("shapes_upsampler")
    assert base.init_from == "shapes_ddpm" and inpaint.init_from == "shapes_glide" and up.init_from is None
    assert base.model_config.unet == dataclasses.replace(recipes.get("shapes_ddpm").model_config, context_dim=128)
    assert inpaint.model_config.unet == dataclasses.replace(base.model_config.unet, cond_channels=4)
    assert 0.1 <= base.label_dropout <= 0.2 and base.schedule == recipes.get("shapes_ddpm").schedule
    assert up.image_size == 64 and up.model_config.low_res == 32
