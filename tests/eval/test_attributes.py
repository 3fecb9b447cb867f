"""Caption accuracy: each error kind from hand-made codes, the plumbing with a stand-in judge, the
shipped judge on real renders, and clear errors for bad images and attributes."""
import pytest
import torch

from course_lib.data import shapes
from course_lib.data.shapes import Obj, Scene
from course_lib.eval import attributes
from course_lib.training.checkpoints import CHECKPOINT_DIR
from course_lib.nn.attributes import AttributeClassifier, attribute_loss, predict_codes, split_logits

RED_CIRCLE_ABOVE_BLUE_SQUARE = Scene((Obj("circle", "red", "small"), Obj("square", "blue", "large")), relation="above")
ONE = Scene((Obj("triangle", "green", "large"),), position="left")


def code(scene):
    return torch.tensor(scene.code())


def kind(want, got):
    return attributes.error_kind(code(want), code(got))


def test_right_scene_is_right():
    assert kind(RED_CIRCLE_ABOVE_BLUE_SQUARE, RED_CIRCLE_ABOVE_BLUE_SQUARE) is None
    # the same scene captioned the other way round
    mirrored = Scene(RED_CIRCLE_ABOVE_BLUE_SQUARE.objects[::-1], relation="below")
    assert kind(mirrored, RED_CIRCLE_ABOVE_BLUE_SQUARE) is None
    assert kind(ONE, ONE) is None


def test_error_kinds():
    a, b = RED_CIRCLE_ABOVE_BLUE_SQUARE.objects
    assert kind(RED_CIRCLE_ABOVE_BLUE_SQUARE, Scene((a,), position="top")) == "missing object"
    assert kind(ONE, Scene((ONE.objects[0], a), relation="above")) == "extra object"
    assert kind(RED_CIRCLE_ABOVE_BLUE_SQUARE, Scene((a, b), relation="left of")) == "wrong relation"
    assert kind(RED_CIRCLE_ABOVE_BLUE_SQUARE, Scene((b, a), relation="above")) == "wrong relation"
    swapped = Scene((Obj("circle", "blue", "small"), Obj("square", "red", "large")), relation="above")
    assert kind(RED_CIRCLE_ABOVE_BLUE_SQUARE, swapped) == "colors swapped"
    assert kind(RED_CIRCLE_ABOVE_BLUE_SQUARE, Scene((Obj("cross", "red", "small"), b), relation="above")) == "wrong shape"
    assert kind(RED_CIRCLE_ABOVE_BLUE_SQUARE, Scene((Obj("circle", "green", "small"), b), relation="above")) == "wrong color"
    assert kind(RED_CIRCLE_ABOVE_BLUE_SQUARE, Scene((Obj("circle", "red", "large"), b), relation="above")) == "wrong size"
    assert kind(ONE, Scene(ONE.objects, position="right")) == "wrong position"


def test_unsaid_attributes_are_not_checked():
    said = shapes.parse_caption("a green triangle")
    assert kind(said, Scene((Obj("triangle", "green", "small"),), position="bottom")) is None
    assert kind(said, Scene((Obj("triangle", "blue", "small"),), position="bottom")) == "wrong color"


def test_score_codes_breakdown():
    want = torch.stack([code(ONE)] * 4)
    got = torch.stack([code(ONE), code(ONE), code(Scene(ONE.objects, position="top")),
                       code(Scene((Obj("circle", "green", "large"),), position="left"))])
    r = attributes.score_codes(want, got)
    assert r.accuracy == 0.5 and r.n == 4 and r.correct.tolist() == [True, True, False, False]
    assert r.errors["wrong position"] == 0.25 and r.errors["wrong shape"] == 0.25
    assert sum(r.errors.values()) == pytest.approx(1 - r.accuracy)
    assert "50.0%" in attributes.format_errors(r)


class StandIn(torch.nn.Module):
    """A judge that reports a fixed scene code for every image."""

    def __init__(self, scene):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        logits = torch.full((sum(shapes.FIELD_CLASSES.values()),), -10.0)
        i = 0
        for f, c in zip(shapes.LABEL_FIELDS, scene.code()):
            if c >= 0:
                logits[i + c] = 10.0
            i += shapes.FIELD_CLASSES[f]
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + self.w


def test_relation_split_tells_the_axis_from_the_order():
    a, b = RED_CIRCLE_ABOVE_BLUE_SQUARE.objects
    got = [RED_CIRCLE_ABOVE_BLUE_SQUARE,                        # right
           Scene((b, a), relation="below"),                     # the same scene named the other way: right
           Scene((b, a), relation="above"),                     # swapped places
           Scene((a, b), relation="left of"),                   # side by side: off the axis
           Scene((b, a), relation="left of"),                   # off the axis (and swapped: the axis counts first)
           Scene((Obj("cross", "red", "small"), b), relation="above"),   # a wrong shape: other
           Scene((a,), position="top")]                         # an object missing: other
    want = torch.stack([code(RED_CIRCLE_ABOVE_BLUE_SQUARE)] * len(got))
    split = attributes.relation_split(want, torch.stack([code(g) for g in got]))
    assert split == attributes.RelationSplit(n=7, off_axis=2, swapped=1, in_order=2, other=2)
    kinds = attributes.score_codes(want, torch.stack([code(g) for g in got])).errors
    assert split.off_axis + split.swapped == round(kinds["wrong relation"] * 7)
    with pytest.raises(ValueError, match="two-object captions only"):
        attributes.relation_split(torch.stack([code(ONE)]), torch.stack([code(ONE)]))


def test_relation_breakdown_reads_real_renders_as_in_order():
    scenes = [RED_CIRCLE_ABOVE_BLUE_SQUARE, Scene((Obj("cross", "green", "large"), Obj("circle", "purple", "small")),
                                                  relation="left of")]
    images = shapes.render_scenes(scenes, 32, seed=1)
    split = attributes.relation_breakdown(images, [shapes.caption(s, 1) for s in scenes])
    assert split == attributes.RelationSplit(n=2, off_axis=0, swapped=0, in_order=2, other=0)


def test_caption_accuracy_with_a_stand_in_judge():
    judge = StandIn(ONE)
    x = torch.zeros(3, 3, 32, 32)
    r = attributes.caption_accuracy(x, ["a large green triangle on the left", "a green triangle", "a red triangle"],
                                    classifier=judge)
    assert r.correct.tolist() == [True, True, False] and r.kinds[2] == "wrong color"
    assert attributes.caption_accuracy(torch.zeros(2, 3, 64, 64), ONE, classifier=judge).accuracy == 1.0


@pytest.mark.parametrize("images, error, message", [
    (torch.zeros(2, 3, 28, 28), ValueError, "32, 32"), (torch.zeros(2, 1, 32, 32), ValueError, "32, 32"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.long), TypeError, "floating"), (torch.zeros(0, 3, 32, 32), ValueError, "empty"),
    (torch.full((2, 3, 32, 32), 2.0), ValueError, r"\[-1, 1\]"), (torch.full((2, 3, 32, 32), float("nan")), ValueError, "NaN"),
])
def test_bad_images(images, error, message):
    with pytest.raises(error, match=message):
        attributes.caption_accuracy(images, ONE, classifier=StandIn(ONE))


def test_bad_attributes():
    with pytest.raises(ValueError, match="one set of attributes per image"):
        attributes.caption_accuracy(torch.zeros(3, 3, 32, 32), [ONE, ONE], classifier=StandIn(ONE))
    with pytest.raises(ValueError, match="outside the shapes vocabulary"):
        attributes.caption_accuracy(torch.zeros(1, 3, 32, 32), "a red unicorn", classifier=StandIn(ONE))


def test_classifier_shapes_loss_and_predicted_codes():
    model = AttributeClassifier()
    d = shapes.ShapesDataset("train", 32, 8, seed=0)
    logits = model(d.images)
    assert logits.shape == (8, sum(shapes.FIELD_CLASSES.values()))
    assert set(split_logits(logits)) == set(shapes.LABEL_FIELDS)
    assert torch.isfinite(attribute_loss(logits, d.labels))
    codes = predict_codes(model, d.images)
    one = codes[:, 0] == 0
    assert (codes[one, 4:7] == -1).all() and (codes[~one, 7] == -1).all()
    with pytest.raises(ValueError, match="RGB"):
        model(torch.zeros(1, 3, 48, 48))


def test_loss_ignores_fields_that_do_not_apply():
    torch.manual_seed(0)
    logits = torch.randn(2, sum(shapes.FIELD_CLASSES.values()))
    labels = torch.tensor([ONE.code(), ONE.code()])
    changed = logits.clone()
    parts = split_logits(changed)
    parts["shape1"].add_(5.0)   # a field a one-object scene does not have
    torch.testing.assert_close(attribute_loss(logits, labels), attribute_loss(changed, labels))


@pytest.mark.skipif(not (CHECKPOINT_DIR / "shapes_attributes.safetensors").exists(), reason="shapes_attributes is not built (course train shapes_attributes)")
@pytest.mark.parametrize("size", [32, 64])
def test_shipped_judge_reads_real_renders(size):
    d = shapes.ShapesDataset("test", size, 300, seed=5)
    acc = attributes.field_accuracy(attributes.judge(), d.images, d.labels)
    assert min(acc.values()) >= 0.97, acc
    assert attributes.caption_accuracy(d.images, d.captions).accuracy >= 0.95
