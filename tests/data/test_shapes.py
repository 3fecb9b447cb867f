"""The shapes generator: determinism, splits, captions that parse back to their scenes, codes,
rendering (anti-aliased, in range, the shape where the scene says), and clear errors."""
import numpy as np
import pytest
import torch

from course_lib.data import shapes
from course_lib.data.shapes import Obj, Scene, ShapesDataset


@pytest.fixture(scope="module")
def train():
    return ShapesDataset("train", 32, 600, seed=0)


def test_deterministic_and_prefix_stable(train):
    again = ShapesDataset("train", 32, 600, seed=0)
    assert torch.equal(train.images, again.images) and train.captions == again.captions
    longer = ShapesDataset("train", 32, 1100, seed=0)   # crosses a 1024-item block
    assert torch.equal(longer.images[:600], train.images) and longer.captions[:600] == train.captions
    other = ShapesDataset("train", 32, 600, seed=1)
    assert not torch.equal(other.images, train.images)


def test_splits_share_no_scene(train):
    test = ShapesDataset("test", 32, 600, seed=0)
    flat_train = {tuple(x.flatten().tolist()[::7]) for x in train.images}
    assert not any(tuple(x.flatten().tolist()[::7]) in flat_train for x in test.images)


def test_images_shape_range_and_antialiasing(train):
    x = train.images
    assert x.shape == (600, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # supersampling leaves edge pixels between the background and the shape's color
    levels = torch.unique((x[0] * 1000).round())
    assert levels.numel() > 10
    big = ShapesDataset("train", 64, 4, seed=0)
    assert big.images.shape == (4, 3, 64, 64)
    assert big.captions == train.captions[:4]   # the same scenes at another size


def test_vocabulary_of_the_world():
    assert len(shapes.SHAPES) >= 4 and len(shapes.COLORS) == 6 and len(shapes.SIZES) == 2
    assert set(shapes.POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert set(shapes.RELATIONS) == {"left of", "right of", "above", "below"}


def test_every_caption_parses_back_to_its_scene(train):
    for s in train.scenes[:300]:
        for v in range(shapes.N_VARIANTS):
            assert shapes.parse_caption(shapes.caption(s, v)).canonical() == s.canonical(), shapes.caption(s, v)


def test_paraphrases_of_one_scene():
    s = Scene((Obj("circle", "red", "small"), Obj("square", "blue", "large")), relation="above")
    caps = {shapes.caption(s, v) for v in range(shapes.N_VARIANTS)}
    assert "a small red circle above a large blue square" in caps
    assert "a large blue square below a small red circle" in caps
    assert "small red circle, large blue square underneath" in caps
    assert len(caps) == 5   # two phrasings of the relation each way, one trailing form


def test_scene_code_round_trip_and_canonical_order():
    s = Scene((Obj("cross", "green", "large"), Obj("triangle", "purple", "small")), relation="right of")
    c = s.canonical()
    assert c.relation == "left of" and c.objects[0].shape == "triangle"
    assert Scene.from_code(s.code()) == c
    one = Scene((Obj("circle", "yellow", "small"),), position="top")
    assert Scene.from_code(one.code()) == one
    assert one.code()[4:7] == [-1, -1, -1] and one.code()[8] == -1


def test_labels_are_the_scenes_codes(train):
    assert train.labels.shape == (600, len(shapes.LABEL_FIELDS))
    for i in range(50):
        assert train.labels[i].tolist() == train.scenes[i].code()
    two = train.labels[:, 0] == 1
    assert 0.4 < two.float().mean() < 0.8
    assert (train.labels[two, 2] != train.labels[two, 5]).all()   # two objects never share a color


def _color_at(img, x, y):
    return img[:, y, x]


def test_render_puts_the_shape_where_the_scene_says():
    for pos, (cx, cy) in shapes.POSITION_XY.items():
        scene = Scene((Obj("square", "red", "large"),), position=pos)
        draw = shapes._Draw([scene], np.zeros((1, 2, 4)), np.zeros((1, 2, 3)), np.array([0.45]), np.zeros(1, int))
        img = shapes.render(draw, 32)[0] * 0.5 + 0.5
        px, py = int(cx * 32), int(cy * 32)
        torch.testing.assert_close(_color_at(img, px, py), torch.tensor(shapes.COLORS["red"]), atol=0.02, rtol=0)
        corner = img[:, 0, 0] if pos != "top" else img[:, 31, 31]
        torch.testing.assert_close(corner, torch.full((3,), 0.45), atol=0.02, rtol=0)


def test_shapes_differ_in_area():
    areas = {}
    for kind in shapes.SHAPES:
        scene = Scene((Obj(kind, "blue", "large"),), position="center")
        draw = shapes._Draw([scene], np.zeros((1, 2, 4)), np.zeros((1, 2, 3)), np.array([0.45]), np.zeros(1, int))
        img = shapes.render(draw, 64)[0] * 0.5 + 0.5
        areas[kind] = float((img[2] - 0.45).clamp(min=0).sum())
    assert len({round(a) for a in areas.values()}) == len(shapes.SHAPES)
    small = Scene((Obj("circle", "blue", "small"),), position="center")
    draw = shapes._Draw([small], np.zeros((1, 2, 4)), np.zeros((1, 2, 3)), np.array([0.45]), np.zeros(1, int))
    small_area = float(((shapes.render(draw, 64)[0] * 0.5 + 0.5)[2] - 0.45).clamp(min=0).sum())
    assert 0.25 < small_area / areas["circle"] < 0.5   # radius 0.13 vs 0.21: (0.13 / 0.21)^2 = 0.38


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("   ", "empty"), ("a red dragon", "outside the shapes vocabulary"),
    ("a circle", "no color"), ("a red circle above", "only one shape"),
    ("a red circle a blue square", "no relation"),
    ("a red circle left of a blue square above a green cross", "names 3 shapes"),
    ("on the left", "no shape"),
])
def test_parse_caption_errors(text, message):
    with pytest.raises(ValueError, match=message):
        shapes.parse_caption(text)


def test_parse_caption_partial_attributes():
    s = shapes.parse_caption("a red circle")
    assert s.objects == (Obj("circle", "red", None),) and s.position is None
    assert shapes.parse_caption("A Large RED circle, at the top").position == "top"
    with pytest.raises(TypeError):
        shapes.parse_caption(3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="val"), "split"), (dict(size=48), "size"), (dict(n=-1), "n must"),
    (dict(n=2.5), "n must"), (dict(seed=-3), "seed"),
])
def test_dataset_errors(kwargs, message):
    args = dict(split="train", size=32, n=4, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        ShapesDataset(**args)


def test_scene_errors():
    with pytest.raises(ValueError, match="unknown shape"):
        Scene((Obj("hexagon", "red"),))
    with pytest.raises(ValueError, match="unknown color"):
        Scene((Obj("circle", "pink"),))
    with pytest.raises(ValueError, match="relation"):
        Scene((Obj("circle", "red"), Obj("square", "blue")))
    with pytest.raises(ValueError, match="one or two"):
        Scene(())


def test_empty_dataset():
    d = ShapesDataset("train", 32, 0, seed=0)
    assert len(d) == 0 and d.images.shape == (0, 3, 32, 32)


def test_render_scenes_draws_what_the_prompts_leave_open():
    scenes = [shapes.parse_caption("a red circle"), shapes.parse_caption("a large blue square below a small green cross")]
    x = shapes.render_scenes(scenes, 32, seed=0)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, shapes.render_scenes(scenes, 32, seed=0))
    assert not torch.equal(x, shapes.render_scenes(scenes, 32, seed=1))
    # "below": the square is the lower object, so the upper half holds green
    top, bottom = x[1, :, :16] * 0.5 + 0.5, x[1, :, 16:] * 0.5 + 0.5
    assert top[1].max() > 0.6 and bottom[2].max() > 0.9
    with pytest.raises(TypeError, match="Scenes"):
        shapes.render_scenes(["a red circle"])
