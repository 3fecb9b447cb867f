"""The course's evaluation network, as a feature extractor and a labeller.

`FashionEvaluator` wraps the shipped `fashion_classifier` checkpoint: `features(x)` for FID,
`predict(x)` for class accuracy and the Inception-Score analogue. Reference statistics of the
Fashion-MNIST test set are computed once and cached.
"""
from __future__ import annotations

import functools
import warnings

import torch

from course_lib.eval import fid as fid_lib


class FashionEvaluator:
    def __init__(self, classifier=None, batch_size: int = 500, device=None):
        """classifier: default the shipped `fashion_classifier`, on runtime.device(device) (CUDA when
        present); images are moved to the classifier's device batch by batch, features come back on the CPU."""
        if classifier is None:
            from course_lib import runtime
            from course_lib.training.checkpoints import load_pretrained
            classifier = load_pretrained("fashion_classifier", device=runtime.device(device))
        elif device is not None:
            classifier = classifier.to(device)
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self._reference = None
        self._reference_features = None

    @torch.no_grad()
    def _map(self, fn, x):
        if x.dim() != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"expects images shaped (N, 1, 28, 28) in [-1, 1], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("the evaluator got an empty batch of images")
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} of {x.shape[0]} images contain NaN or inf (first: index "
                             f"{int(bad.nonzero()[0])}); a sampler diverged")
        worst = float((x.abs() - 1).max())
        if worst > 0.01:
            warnings.warn(f"images exceed [-1, 1] by up to {worst:.3f}; they are clamped to [-1, 1] "
                          "before the classifier (clamp samples yourself to silence this)", stacklevel=3)
        dev = next(self.classifier.parameters()).device
        return torch.cat([fn(x[i:i + self.batch_size].to(dev).float().clamp(-1, 1)).cpu()
                          for i in range(0, x.shape[0], self.batch_size)])

    def features(self, x):
        return self._map(self.classifier.features, x)

    def logits(self, x):
        return self._map(self.classifier, x)

    def predict(self, x):
        return self.logits(x).argmax(1)

    def reference(self):
        """(mu, sigma) of the 10,000 Fashion-MNIST test images."""
        if self._reference is None:
            self._reference = fid_lib.statistics(self.reference_features())
        return self._reference

    def reference_features(self):
        """The (10,000, D) features of the Fashion-MNIST test images, computed once: what
        `fid.fid_interval` and `fid.paired_fid_difference` halve for their intervals."""
        if self._reference_features is None:
            self._reference_features = self.features(_test_images())
        return self._reference_features

    def fid(self, x) -> float:
        """FID of images x against the test set."""
        return fid_lib.frechet_distance(*fid_lib.statistics(self.features(x)), *self.reference())

    def real_fid(self, n: int, seed: int = 0) -> float:
        """FID of n random *training* images against the test set: the floor at this sample count."""
        from course_lib.data import fashion_mnist
        train = fashion_mnist.load("train").images
        idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        return self.fid(train[idx])

    def class_histogram(self, x) -> list:
        return torch.bincount(self.predict(x), minlength=10).tolist()

    def inception_score(self, x) -> float:
        """exp E_x[KL(p(y|x) || p(y))] with the eval classifier in place of Inception (Salimans et al. 2016)."""
        p = self.logits(x).double().softmax(1)
        p_y = p.mean(0, keepdim=True)
        kl = torch.special.xlogy(p, p) - torch.special.xlogy(p, p_y)  # 0 log 0 = 0: confident one-hot rows
        return float(torch.exp(kl.sum(1).mean()))


@functools.lru_cache(maxsize=1)
def _test_images():
    from course_lib.data import fashion_mnist
    return fashion_mnist.load("test").images
