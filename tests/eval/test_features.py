"""FashionEvaluator with classifiers passed in (no shipped checkpoint needed)."""
import pytest
import torch
from torch import nn

from course_lib.eval import features as features_lib
from course_lib.eval import fid
from course_lib.eval.features import FashionEvaluator
from course_lib.nn.classifier import ClassifierConfig, FashionClassifier


class StubClassifier(nn.Module):
    """Constant logits, or (one_hot=True) a confident one-hot prediction of the class written in
    the first pixel: pixel value -1 + 2k/9 means class k (it survives the evaluator's clamp to [-1, 1])."""

    def __init__(self, one_hot=False, num_classes=10):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # the evaluator reads the device from a parameter
        self.one_hot, self.num_classes = one_hot, num_classes

    def features(self, x):
        return x.flatten(1)[:, :16] * self.scale

    def forward(self, x):
        if not self.one_hot:
            return torch.zeros(x.shape[0], self.num_classes)
        k = ((x[:, 0, 0, 0] + 1) * (self.num_classes - 1) / 2).round().long()
        return nn.functional.one_hot(k, self.num_classes).float() * 1e4


def _with_classes(k, num_classes=10):
    x = torch.zeros(len(k), 1, 28, 28)
    x[:, 0, 0, 0] = -1 + 2 * k.float() / (num_classes - 1)
    return x


def _images(n, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def small_evaluator():
    torch.manual_seed(0)
    return FashionEvaluator(FashionClassifier(ClassifierConfig(width=4)), batch_size=3)


def test_features_logits_predict(small_evaluator):
    x = _images(7)
    feats = small_evaluator.features(x)
    assert feats.shape == (7, 128)
    logits = small_evaluator.logits(x)
    assert logits.shape == (7, 10)
    assert torch.equal(small_evaluator.predict(x), logits.argmax(1))
    hist = small_evaluator.class_histogram(x)
    assert len(hist) == 10 and sum(hist) == 7
    assert not small_evaluator.classifier.training  # eval mode: batch norm uses running statistics


def test_batching_does_not_change_features(small_evaluator):
    x = _images(7)
    whole = FashionEvaluator(small_evaluator.classifier, batch_size=100).features(x)
    torch.testing.assert_close(small_evaluator.features(x), whole, rtol=1e-5, atol=1e-6)


def test_images_are_clamped_to_the_data_range(small_evaluator):
    x = _images(2)
    torch.testing.assert_close(small_evaluator.features(3 * x), small_evaluator.features((3 * x).clamp(-1, 1)))


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32), (1, 28, 28)])
def test_bad_image_shapes(small_evaluator, shape):
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        small_evaluator.features(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        small_evaluator.predict(torch.zeros(shape))


def test_inception_score_constant_prediction_is_one():
    ev = FashionEvaluator(StubClassifier())
    assert ev.inception_score(_images(20)) == pytest.approx(1.0, abs=1e-9)


def test_inception_score_uniform_one_hot_is_num_classes():
    """Confident predictions spread evenly over the classes: IS = exp(log 10) = 10."""
    ev = FashionEvaluator(StubClassifier(one_hot=True), batch_size=7)
    x = _with_classes(torch.arange(40) % 10)
    assert torch.equal(ev.predict(x), torch.arange(40) % 10)
    assert ev.class_histogram(x) == [4] * 10
    assert ev.inception_score(x) == pytest.approx(10.0, rel=1e-6)
    # confident but all the same class: no diversity, IS = 1; two classes evenly: IS = 2
    assert ev.inception_score(_with_classes(torch.full((12,), 3))) == pytest.approx(1.0, rel=1e-6)
    assert ev.inception_score(_with_classes(torch.arange(12) % 2)) == pytest.approx(2.0, rel=1e-6)


def test_fid_against_a_reference(monkeypatch):
    ev = FashionEvaluator(StubClassifier())
    x = _images(50, seed=1)
    monkeypatch.setattr(features_lib, "_test_images", lambda: x)
    assert ev.fid(x) == pytest.approx(0.0, abs=1e-8)
    y = _images(50, seed=2)
    assert ev.fid(y) == pytest.approx(fid.fid_from_features(ev.features(y), ev.features(x)), rel=1e-9)
    assert ev.reference() is ev.reference()  # computed once
    assert torch.equal(ev.reference_features(), ev.features(x))   # the features the intervals halve
    assert ev.reference_features() is ev.reference_features()


def test_evaluator_refuses_nan_and_empty_and_warns_on_out_of_range():
    import warnings
    ev = FashionEvaluator(classifier=FashionClassifier(ClassifierConfig()))
    x = torch.zeros(3, 1, 28, 28)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 3 images contain NaN"):
        ev.class_histogram(x)
    with pytest.raises(ValueError, match="empty batch"):
        ev.inception_score(torch.zeros(0, 1, 28, 28))
    with pytest.warns(UserWarning, match="exceed"):
        ev.predict(torch.full((2, 1, 28, 28), 1.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev.predict(torch.full((2, 1, 28, 28), 1.005))   # rounding at the edge: no warning
