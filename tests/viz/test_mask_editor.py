"""The inpainting mask editor (lesson 07): it builds without a frontend, its mask is the pressed cells,
Inpaint runs the model once per (cells, prompt) and serves the cache after, the picture follows the
key, a static picture rides along, and bad input is a clear error (a failed run is shown, not lost)."""
import base64

import ipywidgets
import pytest
import torch

from course_lib.viz import widgets

PROMPTS = ["a red circle on the left", "a blue square at the top"]


class FakeRun:
    """run(mask, prompt) -> images that depend on both (so every key looks different); records calls."""

    def __init__(self, n=3, size=8):
        self.calls, self.n, self.size = [], n, size

    def __call__(self, mask, prompt):
        self.calls.append((mask.clone(), prompt))
        shade = 0.5 if prompt == PROMPTS[0] else -0.5
        base = torch.linspace(-1, 1, self.n).view(-1, 1, 1, 1)
        return (mask * shade + (1 - mask) * base).expand(self.n, 3, self.size, self.size).clone()


def _editor(run=None, **kw):
    kw = {"cells": 4, "size": 8, **kw}
    return widgets.mask_editor(run or FakeRun(size=kw["size"]), PROMPTS, **kw)


def test_mask_from_cells_fills_the_pressed_cells():
    bits = [0, 1,
            0, 0]                                                        # the top right cell to fill
    m = widgets.mask_from_cells(bits, 2, 6)
    assert m.shape == (1, 1, 6, 6) and m.dtype == torch.float32
    assert (m[0, 0, :3, 3:] == 0).all() and m.sum() == 36 - 9              # 1 = known everywhere else
    assert torch.equal(widgets.mask_from_cells([True] * 4, 2, 6), torch.zeros(1, 1, 6, 6))
    assert torch.equal(widgets.mask_from_cells(torch.zeros(3, 3), 3, 9), torch.ones(1, 1, 9, 9))


@pytest.mark.parametrize("args, match", [
    (([0] * 9, 3, 32), "cells=3 does not divide size=32"),
    (([0] * 4, 2, 0), "size must be a positive int"),
    (([0] * 4, 2.0, 8), "cells must be a positive int"),
    (([0] * 5, 2, 8), "cells \\* cells = 4 values"),
    (([0, 1, 2, 0], 2, 8), "0 \\(known\\) or 1 \\(to fill\\)"),
])
def test_mask_from_cells_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        widgets.mask_from_cells(*args)


def test_the_editor_builds_headlessly_with_a_grid_a_prompt_box_and_a_button():
    w = _editor()
    assert isinstance(w, ipywidgets.VBox) and isinstance(w, widgets.MaskEditor)
    assert len(w.buttons) == 16 and all(isinstance(b, ipywidgets.ToggleButton) for b in w.buttons)
    assert isinstance(w.prompt, ipywidgets.Dropdown) and list(w.prompt.options) == PROMPTS
    assert isinstance(w.button, ipywidgets.Button) and w.button.description == "Inpaint"
    assert w.key == ((0,) * 16, PROMPTS[0]) and torch.equal(w.mask(), torch.ones(1, 1, 8, 8))
    assert bytes(w.image.value).startswith(b"\x89PNG") and "press <i>Inpaint</i>" in w.caption.value


def test_the_mask_matches_the_toggled_cells():
    w = _editor()
    for i in (2, 3, 7):                                                  # row 0 cols 2, 3; row 1 col 3
        w.buttons[i].value = True
    assert w.bits() == tuple(int(i in (2, 3, 7)) for i in range(16))
    expected = torch.ones(1, 1, 8, 8)
    expected[0, 0, 0:2, 4:8] = 0
    expected[0, 0, 2:4, 6:8] = 0
    assert torch.equal(w.mask(), expected)
    assert torch.equal(w.mask(), widgets.mask_from_cells(w.bits(), 4, 8))
    assert "3 of 16 cells" in w.caption.value


def test_inpaint_runs_once_per_new_key_and_serves_the_cache_after():
    run = FakeRun()
    w = _editor(run)
    w.buttons[0].value = w.buttons[5].value = True
    before = w.image.value
    w.button.click()
    assert len(run.calls) == 1
    mask, prompt = run.calls[0]
    assert prompt == PROMPTS[0] and mask.shape == (1, 1, 8, 8) and torch.equal(mask, w.mask())
    assert set(w.cache) == {w.key} and w.image.value != before and "3 samples" in w.caption.value
    cached_png = w.image.value
    w.button.click()                                                     # the same key: no second run
    assert len(run.calls) == 1 and w.image.value == cached_png
    w.prompt.value = PROMPTS[1]                                          # a new key: the mask preview
    assert w.key[1] == PROMPTS[1] and w.image.value != cached_png
    w.button.click()
    assert len(run.calls) == 2 and run.calls[1][1] == PROMPTS[1] and len(w.cache) == 2
    second_png = w.image.value
    assert second_png != cached_png
    w.prompt.value = PROMPTS[0]                                          # back to the first key: from the cache
    assert w.image.value == cached_png and len(run.calls) == 2
    w.buttons[5].value = False                                           # another mask: a new key again
    assert w.image.value not in (cached_png, second_png)
    w.inpaint()
    assert len(run.calls) == 3 and torch.equal(run.calls[2][0], widgets.mask_from_cells(w.bits(), 4, 8))


def test_the_displayed_frame_is_the_cached_frame_of_the_key():
    w = _editor()
    w.set_bits([1] * 8 + [0] * 8)                                        # the top half to fill
    w.inpaint()
    assert w.image.value == w.frame(w.key)[0]
    w.set_bits([0] * 16)
    assert w.image.value == w.frame(w.key)[0] != w.frame(((1,) * 8 + (0,) * 8, PROMPTS[0]))[0]
    w.set_bits([1] * 8 + [0] * 8)
    w.show()
    assert w.image.value == w.frame(w.key)[0] and "samples" in w.caption.value


def test_a_prepopulated_cache_is_shown_first_without_running():
    run = FakeRun()
    bits = (0, 0, 1, 1) * 4                                              # the right half
    first = _editor(run)
    first.set_bits(bits)
    first.prompt.value = PROMPTS[1]
    images = first.inpaint()
    run.calls.clear()
    w = widgets.mask_editor(run, PROMPTS, cells=4, size=8, cached={(bits, PROMPTS[1]): images})
    assert w.key == (bits, PROMPTS[1]) and w.bits() == bits and w.prompt.value == PROMPTS[1]
    assert "samples" in w.caption.value and w.image.value == first.image.value
    w.button.click()
    assert run.calls == []                                               # served from the cache
    bools = widgets.mask_editor(run, PROMPTS, cells=4, size=8, cached={(tuple(map(bool, bits)), PROMPTS[1]): images})
    assert bools.key == (bits, PROMPTS[1])                               # True / False bits are the same key


def test_the_static_picture_rides_along_for_renderers_without_a_kernel():
    w = _editor()
    w.set_bits([1] + [0] * 15)
    w.inpaint()
    bundle = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    png = base64.b64decode(bundle["image/png"])
    assert png == w.image.value and png.startswith(b"\x89PNG")
    assert bundle["image/png"] in bundle["text/html"] and "a red circle on the left" in bundle["text/html"]


def test_the_frame_shows_the_shaded_first_sample_beside_the_samples():
    from PIL import Image
    import io
    w = _editor(FakeRun(n=3), scale=1)
    w.set_bits([1] + [0] * 15)
    w.inpaint()
    width, height = Image.open(io.BytesIO(w.image.value)).size
    assert (width, height) == ((8 + 2) + 6 + (3 * 9 + 1), 8 + 2)         # padded tile, gap, a row of 3


@pytest.mark.parametrize("kw, error, match", [
    ({"cells": 3, "size": 32}, ValueError, "cells=3 does not divide size=32"),
    ({"cells": 0}, ValueError, "cells must be a positive int"),
    ({"cached": {((0,) * 15, PROMPTS[0]): torch.zeros(1, 3, 8, 8)}}, ValueError, "16 values"),
    ({"cached": {((0,) * 16, "a green cross"): torch.zeros(1, 3, 8, 8)}}, ValueError, "one of prompts"),
    ({"cached": {((0,) * 16, PROMPTS[0]): torch.zeros(1, 3, 16, 16)}}, ValueError, r"\(N, 3, 8, 8\)"),
])
def test_bad_arguments_are_clear_errors(kw, error, match):
    with pytest.raises(error, match=match):
        _editor(**kw)


def test_empty_prompts_and_a_run_that_is_not_a_function_are_clear_errors():
    with pytest.raises(ValueError, match="prompts is empty"):
        widgets.mask_editor(FakeRun(), [], size=8)
    with pytest.raises(TypeError, match="strings"):
        widgets.mask_editor(FakeRun(), [3], size=8)
    with pytest.raises(TypeError, match="run must be a function"):
        widgets.mask_editor(None, PROMPTS, size=8)


@pytest.mark.parametrize("bad, error, match", [
    (lambda mask, prompt: torch.zeros(3, 8, 8), ValueError, r"got \(3, 8, 8\) \(one image\? return x\[None\]\)"),
    (lambda mask, prompt: torch.zeros(2, 1, 8, 8), ValueError, r"\(N, 3, 8, 8\)"),
    (lambda mask, prompt: torch.zeros(2, 3, 16, 16), ValueError, r"\(N, 3, 8, 8\)"),
    (lambda mask, prompt: torch.zeros(0, 3, 8, 8), ValueError, "N >= 1"),
    (lambda mask, prompt: torch.full((1, 3, 8, 8), float("nan")), ValueError, "NaN"),
    (lambda mask, prompt: [[0.0]], TypeError, "floating-point tensor"),
    (lambda mask, prompt: None, TypeError, "floating-point tensor"),
])
def test_a_run_that_returns_the_wrong_thing_is_a_clear_error_and_is_not_cached(bad, error, match):
    w = _editor(bad)
    with pytest.raises(error, match=match):
        w.inpaint()
    assert w.cache == {}
    w.button.click()                                                     # in the widget: shown in the caption
    assert w.cache == {} and "run failed" in w.caption.value and error.__name__ in w.caption.value
    assert w.button.description == "Inpaint" and not w.button.disabled
    w.buttons[0].value = True                                            # moving on clears the message
    assert "run failed" not in w.caption.value and w.error is None
