"""Card metrics of the lesson-04 recipes: the noisy classifier's accuracy by t, and the conditional
diffusion model's FID and class accuracy, on a stub evaluator and a toy model."""
import dataclasses

import pytest
import torch
from torch import nn

from course_lib.eval import features, report
from course_lib.nn.unet import preset
from course_lib.training import recipes


class _Constant(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def forward(self, x, t):
        return nn.functional.one_hot(torch.full((x.shape[0],), self.cls), 10).float()


class _SignOfMean(nn.Module):
    """Class 1 if the image mean is positive else 0: right on clean data, a coin flip under heavy noise."""

    def forward(self, x, t):
        return torch.stack([-x.mean((1, 2, 3)), x.mean((1, 2, 3))], 1)


def test_noisy_accuracy_constant_model_is_the_class_share():
    r = recipes.get("fashion_noisy_classifier")
    labels = torch.tensor([0, 3, 3, 3, 1, 3, 2, 3])
    acc = report.noisy_accuracy(r, _Constant(3), torch.zeros(8, 1, 28, 28), labels, ts=(0, 500, 999))
    assert acc == {0: 0.625, 500: 0.625, 999: 0.625}


def test_noisy_accuracy_falls_with_t_and_is_reproducible():
    r = recipes.get("fashion_noisy_classifier")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=g)
    images = (labels.float() * 2 - 1)[:, None, None, None] * 0.05 * torch.ones(400, 1, 28, 28)
    acc = report.noisy_accuracy(r, _SignOfMean(), images, labels, ts=(0, 999), batch_size=128)
    assert acc[0] == 1.0 and 0.35 < acc[999] < 0.65
    assert acc == report.noisy_accuracy(r, _SignOfMean(), images, labels, ts=(0, 999))


def test_noisy_accuracy_rejects_t_out_of_range():
    r = recipes.get("fashion_noisy_classifier")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        report.noisy_accuracy(r, _Constant(0), torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), ts=(1000,))


def test_balanced_labels():
    assert report.balanced_labels(23).tolist() == list(range(10)) * 2 + [0, 1, 2]
    assert torch.bincount(report.balanced_labels(1000)).tolist() == [100] * 10


class _Stub(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(16, 10)

    def features(self, x):
        return x.flatten(1)[:, ::49]

    def forward(self, x):
        return self.head(self.features(x))


def test_measure_of_a_conditional_diffusion_model(monkeypatch):
    images = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setattr(features, "_test_images", lambda: images)
    from course_lib.data import fashion_mnist
    monkeypatch.setattr(fashion_mnist, "load", lambda split, **kw: fashion_mnist.FashionMNIST(
        images, torch.zeros(40, dtype=torch.long), fashion_mnist.CLASS_NAMES))
    monkeypatch.setattr(report, "FashionEvaluator", lambda: features.FashionEvaluator(_Stub()))
    r = dataclasses.replace(recipes.get("tiny_ddpm"), model_config=preset("tiny", num_classes=10),
                            eval_samples=20, eval_steps=2)
    torch.manual_seed(0)
    m = report.measure(r, r.build_model().eval())
    assert m["fid_samples"] == 20 and 0 <= m["accuracy_conditional"] <= 1
    assert sum(m["class_histogram_conditional"]) == 20 and sum(m["class_histogram_unconditional"]) == 20
    assert m["fid_conditional"] >= 0 and m["fid_unconditional"] >= 0 and m["real_vs_real_fid"] >= -1e-6
    assert "balanced labels" in m["sampler"]


def test_measure_of_a_noisy_classifier(monkeypatch):
    r = recipes.get("fashion_noisy_classifier")
    monkeypatch.setattr(recipes.Recipe, "load_data", lambda self, split="train": (
        torch.zeros(6, 1, 28, 28), torch.tensor([4, 4, 4, 1, 2, 4])))
    m = report.measure(r, _Constant(4))
    assert m["test_images"] == 6
    assert m["test_accuracy_by_t"] == {str(t): round(4 / 6, 4) for t in report.NOISY_ACCURACY_TS}
