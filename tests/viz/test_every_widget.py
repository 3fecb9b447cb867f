"""Every widget of course_lib.viz.widgets, built headlessly and moved through every value of every
control. After each move the picture shown is the frame the widget's own render gives for the key
the controls now select (decoded PNG pixels, compared with a fresh render and with the cache), the
cache answered without rendering, the picture changed exactly when that frame differs from the one
before, and its pixels are the images of that key (x_t at that t, the grid of that label, ...). The
static still (_repr_mimebundle_) shows the frame the controls were left on.

The last test lists the module's public functions: a new widget function with no sweep here (or
a helper not named in HELPERS) fails it, so a widget cannot land untested."""
import base64
import inspect
import io
import itertools

import ipywidgets
import numpy as np
import pytest
import torch
from PIL import Image

from course_lib.diffusion import formulas, schedules
from course_lib.samplers import loop
from course_lib.viz import plots, widgets

SWEPT = {}   # widget function name -> the tests that sweep it (filled by @sweeps as this file is read)
HELPERS = {  # public functions that build no widget, with what they are (tests/viz/test_widgets.py, test_mask_editor.py)
    "encode_png": "PNG bytes of an array",
    "default_ts": "the steps a t slider offers",
    "with_still": "a widget's mime bundle with its static picture (tested through every widget's still)",
    "mask_from_cells": "the inpainting mask of a grid of cells",
}


def sweeps(name):
    def mark(test):
        SWEPT.setdefault(name, []).append(test.__name__)
        return test
    return mark


def decode(png) -> np.ndarray:
    """The pixels of PNG bytes, uint8 (H, W) grey or (H, W, 3) RGB."""
    return np.asarray(Image.open(io.BytesIO(bytes(png))))


def assert_levels(pixels, array):
    """uint8 pixels are the array in [0, 1] as 0..255 levels, to within one level (float32 or float64
    arithmetic may round a level's half the other way)."""
    want = np.asarray(array, dtype=np.float64).clip(0, 1) * 255
    assert pixels.shape == want.shape and np.abs(pixels.astype(np.float64) - want).max() <= 1


def assert_shows(png, array, scale: int):
    """The PNG is `array` (in [0, 1]) with every pixel repeated scale x scale times."""
    pixels = decode(png)
    assert pixels.shape[:2] == (scale * array.shape[0], scale * array.shape[1])
    assert np.array_equal(pixels, np.repeat(np.repeat(pixels[::scale, ::scale], scale, 0), scale, 1))
    assert_levels(pixels[::scale, ::scale], array)


def values_of(control) -> list:
    """Every value a control can take, in order: an IntSlider's min..max by step, a selection's options
    ((label, value) pairs give the value)."""
    if isinstance(control, ipywidgets.IntSlider):
        return list(range(control.min, control.max + 1, control.step))
    return [o[1] if isinstance(o, tuple) else o for o in control.options]


def sweep(viewer, values: list, expect=None, scale: int = 1) -> list:
    """Move a FrameViewer's controls through every combination of `values` (one list per control),
    the last control fastest, checking the frame after every move. expect(key) -> the array in
    [0, 1] the frame must show (at `scale`). Returns the keys the renderer was asked for (keys
    that are not cached); a cached key must be answered from the cache."""
    render, asked = viewer.render_frame, []
    viewer.render_frame = lambda key: asked.append(key) or render(key)
    previous_png, previous_shown = render(viewer.key())[0], bytes(viewer.image.value)
    try:
        for combo in itertools.product(*values):
            for control, v in zip(viewer.controls, combo):
                if control.value != v:
                    control.value = v
            key = combo[0] if len(combo) == 1 else combo
            assert viewer.key() == key
            png, caption = render(key)
            shown = bytes(viewer.image.value)
            assert np.array_equal(decode(shown), decode(png)), f"the picture at {key!r} is not its frame"
            assert viewer.caption.value == caption
            if key in viewer.frames:
                assert shown == viewer.frames[key][0]
            assert (shown != previous_shown) == (png != previous_png), f"the picture at {key!r} changed wrongly"
            if expect is not None:
                assert_shows(shown, expect(key), scale)
            previous_png, previous_shown = png, shown
    finally:
        viewer.render_frame = render
    assert not set(asked) & set(viewer.frames), "a cached frame was rendered again on a move"
    return asked


def assert_still_shows_current_frame(w):
    """The static picture (for renderers without a kernel) is the frame the controls are on."""
    bundle = w._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == w.model_id
    png = base64.b64decode(bundle["image/png"])
    assert png.startswith(b"\x89PNG") and np.array_equal(decode(png), decode(w.image.value))
    assert bundle["image/png"] in bundle["text/html"] and w.caption.value in bundle["text/html"]


def _images(n, c=1, h=6, w=5, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _distinct(grids):
    frames = [bytes(widgets.encode_png(plots.grid_array(g))) for g in grids]
    assert len(set(frames)) == len(frames), "the test grids must differ, so every move must change the picture"


# ---- t_slider -------------------------------------------------------------------------------------

@sweeps("t_slider")
@pytest.mark.parametrize("ts", [None, [0, 3, 10, 31, 49]], ids=["even ts: IntSlider", "uneven ts: SelectionSlider"])
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "rendered on each move"])
def test_t_slider_shows_x_t_at_every_t(ts, cache):
    sched, x0, noise = schedules.schedule("cosine", 50), _images(3), torch.randn(3, 1, 6, 5)
    w = widgets.t_slider(sched, x0, ts=ts, noise=noise, nrow=3, scale=2, cache=cache)
    offered = values_of(w.control)
    assert offered == (widgets.default_ts(50) if ts is None else ts)
    assert isinstance(w.control, ipywidgets.IntSlider if ts is None else ipywidgets.SelectionSlider)

    def x_t(t):
        return plots.grid_array(formulas.q_sample(sched, x0, torch.full((3,), t), noise), nrow=3)
    asked = sweep(w, [offered[::-1] + offered], x_t, scale=2)       # down from the noisiest, then up again
    assert asked == ([] if cache else offered[::-1] + offered[1:])          # at the turn the slider stays
    assert f"t = {offered[-1]}" in w.caption.value
    assert_still_shows_current_frame(w)


# ---- trajectory_slider ------------------------------------------------------------------------------

@sweeps("trajectory_slider")
def test_trajectory_slider_shows_x_t_beside_predicted_x0_at_every_step():
    sched, traj = schedules.schedule("linear", 8), loop.Trajectory()
    loop.sample(lambda x, t, c: 0.3 * x, sched, (2, 1, 6, 5), generator=torch.Generator().manual_seed(0),
                progress=False, callback=traj)
    w = widgets.trajectory_slider(traj, nrow=2, scale=1)
    steps = values_of(w.control)
    assert steps == list(range(len(traj.t))) and w.control.value == steps[-1]

    def pair(i):
        left, right = plots.grid_array(traj.x_t[i], nrow=2), plots.grid_array(traj.x0[i], nrow=2)
        return np.concatenate([left, np.ones((left.shape[0], 6)), right], axis=1)
    assert sweep(w, [steps], pair) == []
    assert f"t = {traj.t[-1]}" in w.caption.value
    assert_still_shows_current_frame(w)


# ---- grid_selector ----------------------------------------------------------------------------------

@sweeps("grid_selector")
def test_grid_selector_shows_the_grid_of_every_label():
    grids = {"ddpm <1000>": _images(4, seed=1), "ddim 50": _images(4, seed=2), "dpm 20": _images(2, seed=3)}
    _distinct(grids.values())
    w = widgets.grid_selector(grids, nrow=4, scale=3, description="sampler")
    assert values_of(w.control) == list(grids)
    assert sweep(w, [list(grids)[::-1]], lambda label: plots.grid_array(grids[label], nrow=4), scale=3) == []
    assert "ddpm &lt;1000&gt;" in w.caption.value
    assert_still_shows_current_frame(w)


# ---- class_scale_viewer -----------------------------------------------------------------------------

@sweeps("class_scale_viewer")
def test_class_scale_viewer_shows_every_class_at_every_scale():
    classes, scales = [0, 2, "all"], [0.0, 1.0, 3.0, 7.5]
    grids = {(c, s): _images(3, seed=10 * i + j) for i, c in enumerate(classes) for j, s in enumerate(scales)}
    _distinct(grids.values())
    w = widgets.class_scale_viewer(grids, class_names=["tee", "trouser", "pullover"], scale_name="w",
                                   captions={(2, 7.5): "accuracy 93%"}, nrow=3, scale=1)
    dropdown, slider = w.controls
    assert values_of(dropdown) == classes and values_of(slider) == scales
    assert [label for label, _ in dropdown.options] == ["tee", "pullover", "all"]
    assert sweep(w, [classes, scales], lambda key: plots.grid_array(grids[key], nrow=3)) == []
    assert w.key() == ("all", 7.5) and "w = 7.5" in w.caption.value
    dropdown.value = 2
    assert "pullover" in w.caption.value and "accuracy 93%" in w.caption.value
    assert_still_shows_current_frame(w)


# ---- prompt_scale_viewer ----------------------------------------------------------------------------

@sweeps("prompt_scale_viewer")
def test_prompt_scale_viewer_shows_every_cached_prompt_at_every_scale_and_grey_for_another():
    prompts, scales = ["a red circle", "a blue square"], [0.0, 2.0, 5.0]
    grids = {(p, s): _images(2, c=3, seed=10 * i + j) for i, p in enumerate(prompts) for j, s in enumerate(scales)}
    _distinct(grids.values())
    w = widgets.prompt_scale_viewer(grids, scale_name="s", nrow=2, scale=2)
    box, slider = w.controls
    assert isinstance(box, ipywidgets.Combobox) and values_of(box) == prompts and values_of(slider) == scales
    typed = "a green cross"                                                 # typed, not cached

    def expect(key):
        grid = plots.grid_array(grids[(prompts[0], 0.0)], nrow=2)
        return plots.grid_array(grids[key], nrow=2) if key in grids else np.full_like(grid, 0.5)
    asked = sweep(w, [prompts + [typed], scales], expect, scale=2)
    assert set(asked) == {(typed, s) for s in scales}                      # only the uncached prompt renders
    assert "was not sampled in advance" in w.caption.value and "a red circle; a blue square" in w.caption.value
    assert_still_shows_current_frame(w)


# ---- mask_editor --------------------------------------------------------------------------------------

PROMPTS = ["a red circle on the left", "a blue square at the top"]


class FakeRun:
    """run(mask, prompt) -> 2 images that depend on both; records the keys it was called for."""

    def __init__(self):
        self.calls = []

    def __call__(self, mask, prompt):
        self.calls.append((tuple(int(v) for v in (mask[0, 0, ::2, ::2] == 0).flatten()), prompt))
        shade = 0.5 if prompt == PROMPTS[0] else -0.5
        return (mask * shade + (1 - mask) * torch.tensor([-0.8, 0.8]).view(2, 1, 1, 1)).expand(2, 3, 8, 8).clone()


def mask_preview(bits) -> np.ndarray:
    """What the editor shows for a key not yet run: the mask on one padded tile, light known, dark to fill."""
    m = widgets.mask_from_cells(bits, 4, 8).expand(1, 3, -1, -1)
    return plots.grid_array(0.6 * m - 0.5 * (1 - m), nrow=1)


@sweeps("mask_editor")
def test_mask_editor_every_cell_and_prompt_shows_its_mask_and_inpaint_shows_its_samples():
    run = FakeRun()
    w = widgets.mask_editor(run, PROMPTS, cells=4, size=8, nrow=2, scale=1)
    assert len(w.buttons) == 16 and values_of(w.prompt) == PROMPTS
    for prompt in PROMPTS:                                                 # every cell on, then off, at each prompt
        w.prompt.value = prompt
        for i, button in enumerate(w.buttons):
            for pressed in (True, False):
                before = bytes(w.image.value)
                button.value = pressed
                bits = tuple(int(j == i and pressed) for j in range(16))
                assert w.key == (bits, prompt) and bytes(w.image.value) != before
                assert np.array_equal(decode(w.image.value), decode(w.frame(w.key)[0]))
                assert_shows(w.image.value, mask_preview(bits), 1)
    assert run.calls == []                                                 # moving the controls never runs the model

    bits = (1, 1, 0, 0) * 2 + (0,) * 8                                     # the top left quarter
    w.set_bits(bits)
    for prompt in PROMPTS:
        w.prompt.value = prompt
        before = bytes(w.image.value)
        w.button.click()
        samples = w.cache[(bits, prompt)]
        assert run.calls[-1] == (bits, prompt) and bytes(w.image.value) != before
        mask = widgets.mask_from_cells(bits, 4, 8)
        left = plots.grid_array(samples[:1] * (1 - 0.6 * (1 - mask)), nrow=1)   # the first, its filled cells shaded
        right = plots.grid_array(samples, nrow=2)                                 # beside all the samples
        pixels = decode(w.image.value)
        assert_levels(pixels[:left.shape[0], :left.shape[1]], left)
        assert_levels(pixels[:right.shape[0], -right.shape[1]:], right)
        assert np.array_equal(decode(w.image.value), decode(w.frame(w.key)[0]))
    shown = {p: decode(w.frame((bits, p))[0]) for p in PROMPTS}
    w.set_bits((0,) * 16)
    for prompt in PROMPTS[::-1]:                                            # back to each key: from the cache
        w.prompt.value = prompt
        w.set_bits(bits)
        assert np.array_equal(decode(w.image.value), shown[prompt])
        w.button.click()
    assert run.calls == [(bits, p) for p in PROMPTS]                        # once per key
    assert_still_shows_current_frame(w)


# ---- the list --------------------------------------------------------------------------------------

def test_every_public_widget_function_is_swept_here():
    public = {name for name, f in inspect.getmembers(widgets, inspect.isfunction)
              if f.__module__ == widgets.__name__ and not name.startswith("_")}
    untested = public - set(SWEPT) - set(HELPERS)
    assert not untested, (f"viz.widgets has public functions no test here sweeps: {sorted(untested)}; add a "
                          f"@sweeps(name) test (or, for a function that builds no widget, name it in HELPERS)")
    gone = (set(SWEPT) | set(HELPERS)) - public
    assert not gone, f"named here but not in viz.widgets: {sorted(gone)}"
    assert not set(SWEPT) & set(HELPERS)
