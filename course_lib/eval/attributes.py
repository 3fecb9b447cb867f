"""Caption accuracy: does an image show what its caption asks for? The metric of lessons 06-09.

The judge is the shipped attribute classifier `shapes_attributes` (nn.attributes), trained on
ground-truth renders and never used for guidance. It reads each image's scene code; an image is
right when every attribute its caption names matches (sizes and positions the caption leaves out
are not checked). Wrong images are sorted into one error kind each, checked in this order:

- "missing object": the caption names two shapes, the image shows one;
- "extra object":   the caption names one shape, the image shows two;
- "wrong relation": two objects, but side by side instead of stacked (or the reverse), or the two
                    objects in swapped places (a red circle left of a blue square drawn as the blue
                    square left of the red circle);
- "colors swapped": each shape in its place, but wearing the other object's color;
- "wrong shape", "wrong color", "wrong size", "wrong position": the first wrong attribute found.

`caption_accuracy(images, attributes)` takes attributes as Scenes (data.shapes.Scene, e.g. from
`parse_caption`), caption strings, or scene codes, one per image or one for all.
"""
from __future__ import annotations

import functools
import time
from typing import NamedTuple

import torch

from course_lib.data import shapes

ERROR_KINDS = ("missing object", "extra object", "wrong relation", "colors swapped", "wrong shape",
               "wrong color", "wrong size", "wrong position")
FIELD_INDEX = {f: i for i, f in enumerate(shapes.LABEL_FIELDS)}  # field name -> column of a scene code


class CaptionAccuracy(NamedTuple):
    accuracy: float        # share of images whose every captioned attribute is right
    correct: torch.Tensor  # (B,) bool
    errors: dict           # error kind -> share of all images with that error (ERROR_KINDS order)
    kinds: list            # per image: None (right) or its error kind
    n: int                 # number of images


@functools.lru_cache(maxsize=1)
def _judge():
    from course_lib.training.checkpoints import load_pretrained
    return load_pretrained("shapes_attributes")


def judge():
    """The shipped attribute classifier (eval mode), loaded once per process."""
    return _judge()


def as_codes(attributes, n: int) -> torch.Tensor:
    """Attributes as scene codes (n, 9): from Scenes, caption strings, or codes; one item repeats n times."""
    if isinstance(attributes, (str, shapes.Scene)):
        attributes = [attributes]
    if isinstance(attributes, torch.Tensor):
        codes = attributes.long().reshape(-1, len(shapes.LABEL_FIELDS))
    else:
        items = list(attributes)
        codes = torch.tensor([(shapes.parse_caption(a) if isinstance(a, str) else a).code() for a in items],
                             dtype=torch.long).reshape(-1, len(shapes.LABEL_FIELDS))
    if codes.shape[0] == 1 and n != 1:
        codes = codes.expand(n, -1)
    if codes.shape[0] != n:
        raise ValueError(f"caption_accuracy needs one set of attributes per image or one for all: "
                         f"{n} images, {codes.shape[0]} attributes")
    return codes


def _obj(code, k):
    return code[[FIELD_INDEX[f"shape{k}"], FIELD_INDEX[f"color{k}"], FIELD_INDEX[f"size{k}"]]]


def _obj_ok(want, got) -> bool:
    return all(w < 0 or w == g for w, g in zip(want.tolist(), got.tolist()))


def error_kind(want: torch.Tensor, got: torch.Tensor):
    """The error kind of one image (None when right): want is the caption's code, got the judge's."""
    n_want, n_got = int(want[0]), int(got[0])
    if n_want == 1 and n_got == 0:
        return "missing object"
    if n_want == 0 and n_got == 1:
        return "extra object"
    if n_want == 1:
        w0, w1, g0, g1 = _obj(want, 0), _obj(want, 1), _obj(got, 0), _obj(got, 1)
        if int(want[FIELD_INDEX["axis"]]) != int(got[FIELD_INDEX["axis"]]):
            return "wrong relation"
        if _obj_ok(w0, g0) and _obj_ok(w1, g1):
            return None
        if _obj_ok(w0, g1) and _obj_ok(w1, g0):
            return "wrong relation"
        shapes_ok = int(w0[0]) == int(g0[0]) and int(w1[0]) == int(g1[0])
        if shapes_ok and int(w0[1]) == int(g1[1]) and int(w1[1]) == int(g0[1]) and int(w0[1]) != int(w1[1]):
            return "colors swapped"
        pairs = [(w0, g0), (w1, g1)]
    else:
        pairs = [(_obj(want, 0), _obj(got, 0))]
    for j, kind in enumerate(("wrong shape", "wrong color", "wrong size")):
        if any(int(w[j]) >= 0 and int(w[j]) != int(g[j]) for w, g in pairs):
            return kind
    if n_want == 0 and int(want[FIELD_INDEX["position"]]) >= 0 and int(want[FIELD_INDEX["position"]]) != int(got[FIELD_INDEX["position"]]):
        return "wrong position"
    return None


def score_codes(want: torch.Tensor, got: torch.Tensor) -> CaptionAccuracy:
    """Caption accuracy from codes: want (B, 9) the captions', got (B, 9) what the images show."""
    kinds = [error_kind(w, g) for w, g in zip(want, got)]
    correct = torch.tensor([k is None for k in kinds], dtype=torch.bool)
    n = len(kinds)
    errors = {k: (sum(1 for x in kinds if x == k) / n if n else 0.0) for k in ERROR_KINDS}
    return CaptionAccuracy(float(correct.float().mean()) if n else float("nan"), correct, errors, kinds, n)


class RelationSplit(NamedTuple):
    n: int           # two-object images
    off_axis: int    # two objects, side by side where the caption stacks them (or the reverse)
    swapped: int     # the caption's axis and objects, in each other's places
    in_order: int    # right: the caption's objects in the caption's order
    other: int       # anything else (an object missing, a wrong shape, color or size)


def relation_split(want: torch.Tensor, got: torch.Tensor) -> RelationSplit:
    """Split two-object images by what they get wrong about the relation: the axis, the order, or
    neither (codes: want (B, 9) the captions', got (B, 9) what the images show). "wrong relation"
    of error_kind is off_axis + swapped."""
    if bool((want[:, 0] != 1).any()):
        raise ValueError("relation_split takes two-object captions only")
    axis = FIELD_INDEX["axis"]
    counts = {"off_axis": 0, "swapped": 0, "in_order": 0, "other": 0}
    for w, g in zip(want, got):
        kind = error_kind(w, g)
        if kind is None:
            counts["in_order"] += 1
        elif kind == "wrong relation":
            counts["off_axis" if int(w[axis]) != int(g[axis]) else "swapped"] += 1
        else:
            counts["other"] += 1
    return RelationSplit(len(want), **counts)


def relation_breakdown(images: torch.Tensor, captions, classifier=None) -> RelationSplit:
    """relation_split of images against their two-object captions, read by the judge."""
    return relation_split(*_judged_codes(images, captions, classifier))


def check_images(images) -> None:
    """Images for the judge: a float tensor (B, 3, 32 or 64, same) with values in [-1, 1]."""
    if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
        raise TypeError(f"images must be a floating-point tensor, got {getattr(images, 'dtype', type(images).__name__)}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2] \
            or images.shape[-1] not in shapes.IMAGE_SIZES:
        raise ValueError(f"images must be (B, 3, 32, 32) or (B, 3, 64, 64), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"images must lie in [-1, 1] (clamp samples first), got values in [{lo:.3f}, {hi:.3f}]")


def caption_accuracy(images: torch.Tensor, attributes, classifier=None) -> CaptionAccuracy:
    """Share of images whose every captioned attribute is right, with the error breakdown.

    images (B, 3, 32 or 64, same) in [-1, 1]; attributes: Scenes, captions or codes (one per image,
    or one for all); classifier: the judge (default: the shipped `shapes_attributes`).
    """
    return score_codes(*_judged_codes(images, attributes, classifier))


def _judged_codes(images: torch.Tensor, attributes, classifier=None):
    """(want, got): the attributes' scene codes and the judge's reading of the images, both on the CPU."""
    from course_lib.nn.attributes import predict_codes
    check_images(images)
    want = as_codes(attributes, images.shape[0])
    model = classifier if classifier is not None else judge()
    got = predict_codes(model, images.to(next(model.parameters()).device)).cpu()
    return want, got


def format_errors(result: CaptionAccuracy) -> str:
    """One line: accuracy, then each error kind that occurred, as percentages."""
    parts = [f"{k} {100 * v:.1f}%" for k, v in result.errors.items() if v > 0]
    return f"caption accuracy {100 * result.accuracy:.1f}% of {result.n}" + (f" ({', '.join(parts)})" if parts else "")


@torch.no_grad()
def features(images: torch.Tensor, classifier=None, batch_size: int = 500) -> torch.Tensor:
    """The judge's shared features (B, hidden), for a Frechet distance to real scenes."""
    check_images(images)
    model = classifier if classifier is not None else judge()
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.embed(images[i:i + batch_size].to(device)).double().cpu()
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def field_accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> dict:
    """Per-field test accuracy of the judge {field: share right}, over the items the field applies to."""
    from course_lib.nn.attributes import split_logits
    model.eval()
    device = next(model.parameters()).device
    right = {f: 0 for f in shapes.LABEL_FIELDS}
    total = {f: int((labels[:, j] >= 0).sum()) for j, f in enumerate(shapes.LABEL_FIELDS)}
    for i in range(0, images.shape[0], batch_size):
        parts = split_logits(model(images[i:i + batch_size].to(device)).float().cpu())
        lab = labels[i:i + batch_size]
        for j, f in enumerate(shapes.LABEL_FIELDS):
            ok = lab[:, j] >= 0
            right[f] += int((parts[f].argmax(1)[ok] == lab[ok, j]).sum())
    return {f: right[f] / total[f] for f in shapes.LABEL_FIELDS if total[f]}


@torch.no_grad()
def diversity(images: torch.Tensor, group: int, classifier=None) -> float:
    """Mean pairwise distance, in the judge's shared features, between samples of the same prompt:
    images are consecutive groups of `group` samples (one prompt each). 0: every sample alike."""
    if group < 2 or images.shape[0] % group:
        raise ValueError(f"diversity needs groups of >= 2 samples dividing the batch, got group={group} "
                         f"for {images.shape[0]} images")
    f = features(images, classifier).float()
    f = f.reshape(-1, group, f.shape[-1])
    d = torch.cdist(f, f)                                       # (prompts, group, group)
    return float(d.sum() / (f.shape[0] * group * (group - 1)))


def judge_metrics(model, seed: int = 0, n: int = 2000) -> dict:
    """The attribute classifier's card: per-field accuracy on n test renders at 32 and at 64 px, and
    the caption accuracy of those renders against their own captions (the metric's ceiling)."""
    out = {}
    for size in shapes.IMAGE_SIZES:
        d = shapes.ShapesDataset("test", size, n, seed)
        acc = field_accuracy(model, d.images, d.labels)
        cap = caption_accuracy(d.images, d.captions, classifier=model)
        out[f"test_{size}px"] = {"field_accuracy": {f: round(a, 4) for f, a in acc.items()},
                                 "min_field_accuracy": round(min(acc.values()), 4),
                                 "caption_accuracy_of_real_renders": round(cap.accuracy, 4),
                                 "errors": {k: round(v, 4) for k, v in cap.errors.items() if v}}
    out["test_items"] = n
    return out


def scene_fid(samples: torch.Tensor, reference: torch.Tensor, classifier=None) -> float:
    """Frechet distance between samples and reference scenes in the judge's feature space."""
    from course_lib.eval.fid import fid_from_features
    return fid_from_features(features(samples, classifier), features(reference, classifier))


@torch.no_grad()
def readable_share(images: torch.Tensor, classifier=None, threshold: float = 0.9) -> float:
    """Share of images the judge reads with confidence: every field that applies to its predicted
    count has a top probability above `threshold` (blurred, half-formed or chimeric shapes fail)."""
    from course_lib.nn.attributes import split_logits
    check_images(images)
    model = classifier if classifier is not None else judge()
    model.eval()
    device = next(model.parameters()).device
    ok = []
    for i in range(0, images.shape[0], 500):
        logits = split_logits(model(images[i:i + 500].to(device)).float())
        parts = {f: lg.softmax(1).max(1).values for f, lg in logits.items()}
        two = logits["count"].argmax(1) == 1
        common = torch.stack([parts[f] for f in ("count", "shape0", "color0", "size0")], 1).min(1).values
        pair = torch.stack([parts[f] for f in ("shape1", "color1", "size1", "axis")], 1).min(1).values
        ok.append(torch.where(two, torch.minimum(common, pair), torch.minimum(common, parts["position"])) > threshold)
    return float(torch.cat(ok).float().mean().cpu())


def diffusion_metrics(recipe, model) -> dict:
    """An unconditional shapes model's card: scene FID in the judge's features against the test
    renders (and the real-vs-real floor at the same count), the share of readable scenes, and the
    share of two-object scenes (the data has 60%)."""
    from course_lib.eval.report import sample_images
    n = recipe.eval_samples
    t0 = time.time()
    x = sample_images(recipe, model, n, recipe.eval_steps).clamp(-1, 1)
    seconds = time.time() - t0
    test = shapes.ShapesDataset("test", recipe.image_size, 2 * n, recipe.seed).images
    other = shapes.ShapesDataset("test", recipe.image_size, 3 * n, recipe.seed + 1).images[2 * n:]
    from course_lib.nn.attributes import predict_codes
    codes = predict_codes(judge(), x)
    variance = "learned" if model.config.learn_sigma else "small"
    return {"scene_fid": round(scene_fid(x, test[:n]), 3), "real_vs_real_scene_fid": round(scene_fid(other, test[n:]), 3),
            "fid_samples": n, "fid_features": "shapes_attributes' shared features (256-d), against test renders",
            "readable_share": round(readable_share(x), 4), "readable_share_of_real": round(readable_share(test[:n]), 4),
            "two_object_share": round(float((codes[:, 0] == 1).float().mean()), 4),
            "sampler": f"DDPM, {recipe.eval_steps} respaced steps, {variance} variance",
            "seconds_per_sample": round(seconds / n, 4)}
