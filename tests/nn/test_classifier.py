"""The evaluation classifier: feature and logit shapes, and its input check."""
import pytest
import torch

from course_lib.nn.classifier import ClassifierConfig, FashionClassifier


def test_features_and_logits_shapes():
    model = FashionClassifier().eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        feats, logits = model.features(x), model(x)
        assert feats.shape == (3, 128) and logits.shape == (3, 10)
        assert bool((feats >= 0).all())  # after a ReLU
        torch.testing.assert_close(logits, model.head(feats))
        assert torch.equal(model(x, t=torch.tensor([5, 6, 7])), logits)  # t is ignored


def test_config_sizes():
    model = FashionClassifier(ClassifierConfig(width=4, feature_dim=8, num_classes=3)).eval()
    x = torch.zeros(2, 1, 28, 28)
    assert model.features(x).shape == (2, 8) and model(x).shape == (2, 3)


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32), (1, 28, 28), (2, 784)])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        FashionClassifier()(torch.zeros(shape))
