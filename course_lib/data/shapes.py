"""shapes: a deterministic generator of captioned scenes for the text lessons (06-09).

A scene is one or two flat shapes on a plain grey background, rendered anti-aliased (4x4
supersampling) at 32x32 or 64x64 RGB in [-1, 1]:

- kinds   circle, square, triangle, cross        (SHAPES)
- colors  red, orange, yellow, green, blue, purple (COLORS)
- sizes   small, large                           (SIZES)
- one shape: an absolute position: center, left, right, top, bottom (POSITIONS)
- two shapes (of different colors): a relation, "A left of B", "A above B" and their
  mirror phrasings "B right of A", "B below A" (RELATIONS)

Positions, sizes, rotations, colors and the background shade carry small random jitter, so
no two renders are pixel-identical and a model cannot match pixels exactly.

Every item carries its ground truth as data: a `Scene` (objects, position or relation) and its
integer code (`Scene.code()`, LABEL_FIELDS, -1 where a field does not apply), which the attribute
classifier of `eval.attributes` learns and against which caption accuracy is measured.
Two-object scenes are stored canonically: objects[0] is the left (relation "left of") or the
upper (relation "above") shape; a caption may name them in either order.

Randomness comes in blocks of 1024 items, each from its own numpy generator seeded by
(seed, split, block), so item i is the same whatever n is asked for, on every platform. The
train and test splits draw from disjoint seed streams, so they never share a scene.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {  # RGB in [0, 1]
    "red": (0.90, 0.12, 0.12), "orange": (1.00, 0.55, 0.05), "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.70, 0.20), "blue": (0.15, 0.35, 0.95), "purple": (0.62, 0.22, 0.85),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "test")
IMAGE_SIZES = (32, 64)

RADIUS = {"small": 0.13, "large": 0.21}  # shape radius as a share of the image width
POSITION_XY = {"center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5),
               "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BLOCK = 1024
SUPERSAMPLE = 4
TWO_OBJECT_SHARE = 0.6

# the integer code of a scene: one column per field, -1 where the field does not apply
LABEL_FIELDS = ("count", "shape0", "color0", "size0", "shape1", "color1", "size1", "position", "axis")
FIELD_CLASSES = {"count": 2, "shape0": len(SHAPES), "color0": len(COLORS), "size0": len(SIZES),
                 "shape1": len(SHAPES), "color1": len(COLORS), "size1": len(SIZES),
                 "position": len(POSITIONS), "axis": 2}
AXES = ("left of", "above")  # axis 0: side by side, objects[0] on the left; 1: stacked, objects[0] on top


@dataclass(frozen=True)
class Obj:
    """One shape. size=None in a caption's attributes means the caption does not say."""
    shape: str
    color: str
    size: str | None = None

    def words(self, with_size: bool = True) -> str:
        return " ".join(w for w in ((self.size if with_size else None), self.color, self.shape) if w)


@dataclass(frozen=True)
class Scene:
    """A scene's (or a caption's) attributes: one object with an optional position, or two objects
    in a relation (objects[0] RELATION objects[1])."""
    objects: tuple
    position: str | None = None
    relation: str | None = None

    def __post_init__(self):
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")
        for o in self.objects:
            if o.shape not in SHAPES:
                raise ValueError(f"unknown shape {o.shape!r}; shapes are {SHAPES}")
            if o.color not in COLORS:
                raise ValueError(f"unknown color {o.color!r}; colors are {COLOR_NAMES}")
            if o.size is not None and o.size not in SIZES:
                raise ValueError(f"unknown size {o.size!r}; sizes are {SIZES}")
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError("a one-object scene has a position, not a relation")
        if len(self.objects) == 2:
            if self.position is not None:
                raise ValueError("a two-object scene has a relation, not a position")
            if self.relation not in RELATIONS:
                raise ValueError(f"a two-object scene needs a relation in {RELATIONS}, got {self.relation!r}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; positions are {POSITIONS}")

    def canonical(self) -> "Scene":
        """The same scene with relation 'left of' or 'above' (objects swapped for 'right of', 'below')."""
        if self.relation in ("right of", "below"):
            return replace(self, objects=self.objects[::-1], relation=INVERSE[self.relation])
        return self

    def code(self) -> list:
        """The scene as integers, one per LABEL_FIELDS entry, -1 where unknown or not applicable."""
        s = self.canonical()
        idx = lambda seq, v: -1 if v is None else seq.index(v)  # noqa: E731
        o0 = s.objects[0]
        o1 = s.objects[1] if len(s.objects) == 2 else None
        return [len(s.objects) - 1, SHAPES.index(o0.shape), COLOR_NAMES.index(o0.color), idx(SIZES, o0.size),
                -1 if o1 is None else SHAPES.index(o1.shape), -1 if o1 is None else COLOR_NAMES.index(o1.color),
                -1 if o1 is None else idx(SIZES, o1.size), idx(POSITIONS, s.position),
                -1 if o1 is None else AXES.index(s.relation)]

    @staticmethod
    def from_code(code) -> "Scene":
        c = [int(v) for v in code]
        get = lambda seq, i: None if i < 0 else seq[i]  # noqa: E731
        objs = [Obj(SHAPES[c[1]], COLOR_NAMES[c[2]], get(SIZES, c[3]))]
        if c[0] == 1:
            objs.append(Obj(SHAPES[c[4]], COLOR_NAMES[c[5]], get(SIZES, c[6])))
            return Scene(tuple(objs), relation=AXES[c[8]])
        return Scene(tuple(objs), position=get(POSITIONS, c[7]))


# ---------------------------------------------------------------------------- captions

POSITION_PHRASES = {"center": ("in the center", "in the middle"), "left": ("on the left",),
                    "right": ("on the right",), "top": ("at the top",), "bottom": ("at the bottom",)}
RELATION_PHRASES = {"left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
                    "above": ("above", "over"), "below": ("below", "under")}
TRAILING = {"left of": "to the right", "above": "underneath"}  # "red circle, blue square underneath"


def caption(scene: Scene, variant: int = 0) -> str:
    """One caption of `scene`; variant picks the template and paraphrase (any int, taken mod the
    number of phrasings). Unknown sizes or positions are left out."""
    if len(scene.objects) == 1:
        o, pos = scene.objects[0], scene.position
        words = o.words()
        if pos is None:
            return f"a {words}"
        phrases = POSITION_PHRASES[pos]
        p = phrases[variant % len(phrases)]
        forms = (f"a {words} {p}", f"{p}, a {words}", f"{words}, {p}")
        return forms[variant // len(phrases) % len(forms)]
    s = scene.canonical()
    a, b = s.objects
    forms = [lambda: f"a {a.words()} {_rel(s.relation, variant)} a {b.words()}",
             lambda: f"a {b.words()} {_rel(INVERSE[s.relation], variant)} a {a.words()}",
             lambda: f"{a.words()}, {b.words()} {TRAILING[s.relation]}"]
    return forms[variant // 2 % len(forms)]()


def _rel(relation: str, variant: int) -> str:
    phrases = RELATION_PHRASES[relation]
    return phrases[variant % len(phrases)]


N_VARIANTS = 6  # caption(scene, v) for v in range(N_VARIANTS) covers every phrasing above

VOCABULARY = frozenset(
    ["a", "the", "in", "on", "at", "to", "of", ","] + list(SHAPES) + list(COLORS) + list(SIZES)
    + "center middle left right top bottom above over below under underneath".split())
_WORD = re.compile(r"[a-z]+|,")


def words_of(text: str) -> list:
    """The caption's words (lower case; commas kept as words)."""
    return _WORD.findall(text.lower())


def unknown_words(text: str) -> list:
    """Words of `text` outside the shapes world's vocabulary, in order."""
    return [w for w in words_of(text) if w not in VOCABULARY]


def parse_caption(text: str) -> Scene:
    """The attributes a caption asks for, as a Scene (sizes and position None where it does not say).

    Reads the grammar of `caption`'s templates: objects are '[size] color shape' in order; a
    relation phrase between them, or a trailing 'to the right' / 'underneath'. A clear ValueError
    for an empty caption, unknown words, or a caption that names no shape, or more than two.
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the caption is empty; describe one or two shapes, e.g. 'a red circle on the left'")
    bad = unknown_words(text)
    if bad:
        raise ValueError(f"words outside the shapes vocabulary: {bad}; the shapes world knows "
                         f"{', '.join(SHAPES)}; {', '.join(COLORS)}; {', '.join(SIZES)}; positions and relations")
    toks = [w for w in words_of(text) if w not in ("a", "the", ",")]
    objs, size, color, relation, position, rel_at = [], None, None, None, None, None
    for i, w in enumerate(toks):
        if w in SIZES:
            size = w
        elif w in COLORS:
            color = w
        elif w in SHAPES:
            if color is None:
                raise ValueError(f"'{w}' in {text!r} has no color; say e.g. 'a red {w}'")
            objs.append(Obj(w, color, size))
            size = color = None
        elif w in ("above", "over"):
            relation, rel_at = "above", len(objs)
        elif w in ("below", "under"):
            relation, rel_at = "below", len(objs)
        elif w == "underneath":
            relation, rel_at = "above", 2  # "A, B underneath": A above B
        elif w in ("left", "right"):
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if nxt == "of":
                relation, rel_at = f"{w} of", len(objs)
            elif len(objs) == 2 and w == "right" and i == len(toks) - 1:
                relation, rel_at = "left of", 2  # "A, B to the right": A left of B
            else:
                position = w
        elif w in ("top", "bottom"):
            position = w
        elif w in ("center", "middle"):
            position = "center"
    if not objs:
        raise ValueError(f"no shape named in {text!r}; name one of {SHAPES} with a color")
    if len(objs) > 2:
        raise ValueError(f"{text!r} names {len(objs)} shapes; a shapes scene holds one or two")
    if len(objs) == 1:
        if relation is not None:
            raise ValueError(f"{text!r} has a relation ('{relation}') but only one shape")
        return Scene(tuple(objs), position=position)
    if relation is None:
        raise ValueError(f"{text!r} names two shapes but no relation between them (left of, right of, above, below)")
    return Scene(tuple(objs), relation=relation)


# ---------------------------------------------------------------------------- sampling scenes

class _Draw(NamedTuple):
    scenes: list      # Scene per item (sizes and position always set)
    jitter: np.ndarray  # (n, 2 objects, 4): dx, dy, dradius (relative), rotation (rad)
    tint: np.ndarray    # (n, 2 objects, 3) color jitter
    background: np.ndarray  # (n,) grey level in [0, 1]
    variants: np.ndarray    # (n,) caption variant


def _draw_block(seed: int, split: int, block: int) -> _Draw:
    rng = np.random.default_rng([seed, split, block, 0x5A4E])
    n = BLOCK
    two = rng.random(n) < TWO_OBJECT_SHARE
    shape = rng.integers(0, len(SHAPES), (n, 2))
    color = rng.integers(0, len(COLORS), (n, 2))
    color[:, 1] = (color[:, 0] + rng.integers(1, len(COLORS), n)) % len(COLORS)  # two colors differ
    size = rng.integers(0, len(SIZES), (n, 2))
    pos = rng.integers(0, len(POSITIONS), n)
    axis = rng.integers(0, 2, n)
    jitter = np.stack([rng.uniform(-0.035, 0.035, (n, 2)), rng.uniform(-0.035, 0.035, (n, 2)),
                       rng.uniform(-0.08, 0.08, (n, 2)), rng.uniform(-0.15, 0.15, (n, 2))], axis=-1)
    tint = rng.uniform(-0.05, 0.05, (n, 2, 3))
    background = rng.uniform(0.35, 0.55, n)
    variants = rng.integers(0, 1 << 16, n)
    scenes = []
    for i in range(n):
        objs = tuple(Obj(SHAPES[shape[i, k]], COLOR_NAMES[color[i, k]], SIZES[size[i, k]])
                     for k in range(2 if two[i] else 1))
        scenes.append(Scene(objs, relation=AXES[axis[i]]) if two[i] else Scene(objs, position=POSITIONS[pos[i]]))
    return _Draw(scenes, jitter, tint, background, variants)


def _draw(n: int, seed: int, split: str) -> _Draw:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    blocks = [_draw_block(int(seed), SPLITS.index(split), b) for b in range(max(1, math.ceil(n / BLOCK)))]
    return _Draw(sum((b.scenes for b in blocks), [])[:n], *(np.concatenate(f)[:n] for f in list(zip(*blocks))[1:]))


def centers(scene: Scene) -> list:
    """Nominal centers (x, y) in [0, 1] (y down) of the scene's objects, before jitter."""
    if len(scene.objects) == 1:
        return [POSITION_XY[scene.position or "center"]]
    s = scene.canonical()
    if s.relation == "left of":
        return [(0.27, 0.5), (0.73, 0.5)]
    return [(0.5, 0.27), (0.5, 0.73)]


# ---------------------------------------------------------------------------- rendering

def _inside(kind: str, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Whether points (u, v) (object frame, y down, units of the image width) lie inside a shape of radius r."""
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "square":
        a = 0.82 * r
        return (u.abs() <= a) & (v.abs() <= a)
    if kind == "triangle":  # pointing up, circumradius 1.1 r
        R = 1.1 * r
        top, base = -R, 0.5 * R
        half = (v - top) / (base - top) * (R * math.sqrt(3) / 2)
        return (v >= top) & (v <= base) & (u.abs() <= half)
    if kind == "cross":
        w = 0.34 * r
        return ((u.abs() <= r) & (v.abs() <= w)) | ((u.abs() <= w) & (v.abs() <= r))
    raise ValueError(f"unknown shape {kind!r}")


def render(draw: _Draw, size: int, chunk: int = 256) -> torch.Tensor:
    """Images (n, 3, size, size) in [-1, 1] for the drawn scenes, anti-aliased by supersampling."""
    if size not in IMAGE_SIZES:
        raise ValueError(f"size must be one of {IMAGE_SIZES}, got {size!r}")
    n, S = len(draw.scenes), size * SUPERSAMPLE
    grid = (torch.arange(S, dtype=torch.float32) + 0.5) / S
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")               # (S, S), y down
    out = torch.empty(n, 3, size, size)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        img = torch.tensor(draw.background[lo:hi], dtype=torch.float32)[:, None, None, None].expand(-1, 3, S, S).clone()
        for i in range(lo, hi):
            for k, (obj, (cx, cy)) in enumerate(zip(draw.scenes[i].objects, centers(draw.scenes[i]))):
                dx, dy, dr, rot = (float(z) for z in draw.jitter[i, k])
                r = RADIUS[obj.size] * (1 + dr)
                c, s = math.cos(rot), math.sin(rot)
                x, y = gx - (cx + dx), gy - (cy + dy)
                mask = _inside(obj.shape, c * x + s * y, -s * x + c * y, torch.tensor(r))
                rgb = torch.tensor(COLORS[obj.color]) + torch.tensor(draw.tint[i, k], dtype=torch.float32)
                img[i - lo] = torch.where(mask, rgb.clamp(0, 1)[:, None, None], img[i - lo])
        out[lo:hi] = F.avg_pool2d(img, SUPERSAMPLE) * 2 - 1
    return out


def render_scenes(scenes, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Real renders (n, 3, size, size) of given Scenes (e.g. parsed prompts), with the dataset's
    jitter drawn from `seed`; a size or a single object's position the scene leaves open is drawn too."""
    scenes = list(scenes)
    rng = np.random.default_rng([seed, 0xC0DE])
    full = []
    for s in scenes:
        if not isinstance(s, Scene):
            raise TypeError(f"render_scenes takes Scenes (parse_caption gives one), got {type(s).__name__}")
        objs = tuple(Obj(o.shape, o.color, o.size or SIZES[rng.integers(len(SIZES))]) for o in s.objects)
        if len(objs) == 1:
            full.append(Scene(objs, position=s.position or POSITIONS[rng.integers(len(POSITIONS))]))
        else:
            full.append(Scene(objs, relation=s.relation).canonical())
    n = len(full)
    jitter = np.stack([rng.uniform(-0.035, 0.035, (n, 2)), rng.uniform(-0.035, 0.035, (n, 2)),
                       rng.uniform(-0.08, 0.08, (n, 2)), rng.uniform(-0.15, 0.15, (n, 2))], axis=-1)
    draw = _Draw(full, jitter.reshape(n, 2, 4), rng.uniform(-0.05, 0.05, (n, 2, 3)), rng.uniform(0.35, 0.55, n),
                 np.zeros(n, dtype=int))
    return render(draw, size)


# ---------------------------------------------------------------------------- the dataset

class ShapesData(NamedTuple):
    images: torch.Tensor    # (n, 3, size, size) in [-1, 1]
    labels: torch.Tensor    # (n, len(LABEL_FIELDS)) int64 scene codes, -1 where not applicable
    captions: list          # n strings
    scenes: list            # n Scenes


class ShapesDataset(torch.utils.data.Dataset):
    """n captioned scenes of one split, rendered at `size` (32 or 64), made from `seed` in memory.

    Item i: (image (3, size, size) in [-1, 1], caption str, label code (9,) int64); `scenes[i]` is
    its Scene. Deterministic: the same (split, size, n, seed) gives the same items, and item i does
    not depend on n. caption_variant: a fixed caption phrasing for every item, or None (each item's
    own, drawn with the scene).
    """

    def __init__(self, split: str = "train", size: int = 32, n: int = 10_000, seed: int = 0,
                 caption_variant: int | None = None):
        if size not in IMAGE_SIZES:
            raise ValueError(f"size must be one of {IMAGE_SIZES}, got {size!r}")
        draw = _draw(n, seed, split)
        self.split, self.size, self.seed = split, size, seed
        self.scenes = draw.scenes
        variants = draw.variants if caption_variant is None else np.full(n, caption_variant)
        self.captions = [caption(s, int(v)) for s, v in zip(self.scenes, variants)]
        self.labels = torch.tensor([s.code() for s in self.scenes], dtype=torch.long).reshape(n, len(LABEL_FIELDS))
        self.images = render(draw, size)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i):
        return self.images[i], self.captions[i], self.labels[i]

    def data(self) -> ShapesData:
        return ShapesData(self.images, self.labels, self.captions, self.scenes)

    def all_captions(self, i: int) -> list:
        """Every distinct phrasing of item i's caption."""
        return sorted({caption(self.scenes[i], v) for v in range(N_VARIANTS)})
