"""Interactive viewers for the lessons: a slider over t, a slider over a sampler's trajectory,
a dropdown over precomputed grids, a class dropdown with a guidance-scale slider. Each is a
function returning a `FrameViewer` widget.

Frames are rendered once, up front, to PNG bytes (cache=True), so moving a control only swaps
bytes and answers at once even on a slow CPU. Every viewer also carries a static picture of
its current frame (text/html and image/png beside the widget view), so a notebook rendered
without a kernel (HTML export, GitHub, an untrusted notebook) still shows the first frame and
its caption. Used from lesson 01 (t_slider) on; samplers.loop.Trajectory feeds
trajectory_slider in lessons 02-03.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Callable, Hashable, Mapping, Sequence

import ipywidgets as widgets
import numpy as np
import torch

from course_lib.diffusion.schedules import NoiseSchedule
from course_lib.viz import plots

TARGET_WIDTH_PX = 600  # small grids are enlarged by a whole factor to about this width


def encode_png(array: np.ndarray, scale: int = 1) -> bytes:
    """PNG bytes of a grid array in [0, 1] ((H, W) grey or (H, W, 3) RGB), every pixel
    repeated scale x scale times, so small images stay crisp when shown large."""
    from PIL import Image
    a = np.repeat(np.repeat(np.asarray(array), scale, axis=0), scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8)).save(buf, format="png")
    return buf.getvalue()


def _scale_for(width: int, scale: int | None) -> int:
    return scale if scale is not None else max(1, min(8, TARGET_WIDTH_PX // max(1, width)))


def with_still(data: dict, png: bytes, caption: str, hint: str) -> dict:
    """A widget's mime bundle plus a static picture and its caption, for renderers without a live frontend
    (nbconvert, GitHub, the site): `hint` says what running the cell in Jupyter gives."""
    b64 = base64.b64encode(bytes(png)).decode("ascii")
    data["image/png"] = b64
    data["text/html"] = (f'<figure style="margin:0"><img src="data:image/png;base64,{b64}"/>'
                         f'<figcaption>{caption}<br><i>({hint})</i></figcaption></figure>')
    return data


class FrameViewer(widgets.VBox):
    """One or more controls (slider, dropdown), the image of the selected frame and a caption under it.

    render(key) -> (png bytes, caption html) for each key the controls can take: the control's value,
    or with several controls the tuple of their values. With cache=True all frames are rendered
    here, once, and `frames` holds them; with cache=False a frame is rendered each time a control
    moves. Attributes: control (the first control), controls, image, caption, frames.
    """

    def __init__(self, control, render: Callable[[Hashable], tuple], keys: Sequence, *, cache: bool = True):
        super().__init__()
        self.controls = list(control) if isinstance(control, (list, tuple)) else [control]
        self.control = self.controls[0]
        self.render_frame = render
        self.frames = {k: render(k) for k in keys} if cache else {}
        png, caption = self.frame(self.key())
        self.image = widgets.Image(value=png, format="png")
        self.caption = widgets.HTML(caption)
        bar = self.controls[0] if len(self.controls) == 1 else widgets.HBox(self.controls)
        self.children = [bar, self.image, self.caption]
        for c in self.controls:
            c.observe(self._show, names="value")

    def key(self):
        """The key of the frame the controls select now."""
        values = tuple(c.value for c in self.controls)
        return values[0] if len(values) == 1 else values

    def frame(self, key) -> tuple:
        """(png bytes, caption html) of frame `key`: from the cache when there is one."""
        return self.frames[key] if key in self.frames else self.render_frame(key)

    def _show(self, change=None):
        png, caption = self.frame(self.key())
        with self.hold_sync():
            self.image.value, self.caption.value = png, caption

    def _repr_mimebundle_(self, **kwargs):
        """The widget view for a live frontend, plus a static picture for renderers without one."""
        return with_still(super()._repr_mimebundle_(**kwargs), self.image.value, self.caption.value,
                          "a still of the interactive viewer: run the cell in Jupyter to move the control")


def _control_over(values: Sequence[int], value: int, description: str):
    """An IntSlider when values are evenly spaced integers, else a SelectionSlider over them."""
    values = [int(v) for v in values]
    steps = {b - a for a, b in zip(values, values[1:])}
    if len(steps) <= 1 and all(s > 0 for s in steps):
        return widgets.IntSlider(value=value, min=values[0], max=values[-1], step=steps.pop() if steps else 1,
                                 description=description, continuous_update=True)
    return widgets.SelectionSlider(options=values, value=value, description=description, continuous_update=True)


def default_ts(T: int, frames: int = 100) -> list:
    """About `frames` evenly spaced steps that end on the last one, T - 1 (the noisiest)."""
    stride = max(1, T // frames)
    return list(range((T - 1) % stride, T, stride))


def t_slider(schedule: NoiseSchedule, images, ts: Sequence[int] | None = None, cache: bool = True, *,
             t: int | None = None, noise=None, generator=None, nrow: int = 8, scale: int | None = None):
    """A slider over t showing x_t = q_sample(x0, t, noise) for a batch of images (N, C, H, W)
    in [-1, 1], with t, alpha_bar_t and the SNR in the caption. One noise draw serves every t,
    so only the schedule changes as the slider moves. ts: the steps offered (default
    default_ts(T)); t: the first one shown (default ts[0])."""
    x0 = plots._check_images(images)
    ts = [int(v) for v in (default_ts(schedule.T) if ts is None else ts)]
    if not ts or min(ts) < 0 or max(ts) >= schedule.T or sorted(set(ts)) != ts:
        raise ValueError(f"ts must be increasing distinct steps in [0, {schedule.T - 1}], got {ts[:5]}...")
    noise = torch.randn(x0.shape, generator=generator) if noise is None else noise
    width = plots.grid_array(x0, nrow=nrow).shape[1]

    def render(step):
        x_t = plots.noised_images(schedule, x0, [step], noise)[0]
        ab = float(schedule.alpha_bar[step])
        caption = (f"<b>t = {step}</b> (of 0..{schedule.T - 1}) &nbsp; &alpha;&#772;<sub>t</sub> = {ab:.4g}"
                   f" &nbsp; SNR = {ab / (1 - ab):.3g} &nbsp; signal std &radic;&alpha;&#772; = {ab ** 0.5:.3f},"
                   f" noise std &radic;(1&minus;&alpha;&#772;) = {(1 - ab) ** 0.5:.3f}")
        return encode_png(plots.grid_array(x_t, nrow=nrow), _scale_for(width, scale)), caption

    start = ts[0] if t is None else int(t)
    if start not in ts:
        raise ValueError(f"t={start} is not one of the offered steps ts")
    return FrameViewer(_control_over(ts, start, "t"), render, ts, cache=cache)


def trajectory_slider(trajectory, *, value: int | None = None, cache: bool = True, nrow: int = 8,
                      scale: int | None = None):
    """A slider over the recorded steps of a samplers.loop.Trajectory: x_t on the left, the
    model's prediction of x_0 at that step on the right. value: the step index shown first
    (default: the last one, the finished sample)."""
    n = len(trajectory.t)
    if n == 0:
        raise ValueError("the trajectory is empty: pass it as callback= to samplers.loop.sample first")
    width = 2 * plots.grid_array(trajectory.x_t[0], nrow=nrow).shape[1]

    def render(i):
        left = plots.grid_array(trajectory.x_t[i], nrow=nrow)
        right = plots.grid_array(trajectory.x0[i], nrow=nrow)
        gap = np.ones((left.shape[0], 6) + left.shape[2:])
        caption = (f"<b>step {i + 1} of {n}</b>, t = {trajectory.t[i]} &nbsp; left: x<sub>t</sub>, the "
                   f"sampler's current image; right: its prediction of x<sub>0</sub> at this step")
        return encode_png(np.concatenate([left, gap, right], axis=1), _scale_for(width, scale)), caption

    start = n - 1 if value is None else int(value)
    control = widgets.IntSlider(value=start, min=0, max=n - 1, step=1, description="step", continuous_update=True)
    return FrameViewer(control, render, list(range(n)), cache=cache)


def grid_selector(grids: Mapping[str, object], *, value: str | None = None, cache: bool = True,
                  nrow: int = 8, scale: int | None = None, description: str = "show"):
    """A dropdown over precomputed image grids {label: (N, C, H, W) in [-1, 1]}, e.g. samples
    per class or per guidance scale; the caption names the selected label."""
    if not grids:
        raise ValueError("grids is empty: pass {label: images}")
    labels = list(grids)
    width = max(plots.grid_array(grids[k], nrow=nrow).shape[1] for k in labels)

    def render(label):
        grid = plots.grid_array(grids[label], nrow=nrow)
        return encode_png(grid, _scale_for(width, scale)), f"<b>{html.escape(str(label))}</b>"

    control = widgets.Dropdown(options=labels, value=labels[0] if value is None else value,
                               description=description)
    return FrameViewer(control, render, labels, cache=cache)


def _pair_grid(grids: Mapping[tuple, object], what: str) -> tuple:
    """(the first keys in order, the sorted scales) of grids {(key, scale): images}, checked complete."""
    if not grids:
        raise ValueError(f"grids is empty: pass {{({what}, scale): images}}")
    keys = list(dict.fromkeys(k[0] for k in grids))
    scales = sorted(dict.fromkeys(k[1] for k in grids))
    missing = [(c, s) for c in keys for s in scales if (c, s) not in grids]
    if missing:
        raise ValueError(f"grids must hold every ({what}, scale) pair; missing {missing[:3]}")
    return keys, scales


def _scale_caption(label: str, scale_name: str, s, extra: str) -> str:
    return f"<b>{html.escape(label)}</b>, {html.escape(scale_name)} = {s:g}" + (f" &nbsp; {extra}" if extra else "")


def class_scale_viewer(grids: Mapping[tuple, object], *, class_names: Sequence[str] | None = None,
                       scale_name: str = "scale", value: tuple | None = None, cache: bool = True, nrow: int = 8,
                       scale: int | None = None, captions: Mapping[tuple, str] | None = None):
    """A class dropdown and a guidance-scale slider over precomputed grids {(class, s): (N, C, H, W)}
    (lessons 04-05: samples of each class at each guidance scale). class is an int index (named by
    class_names) or "all"; s a number. captions: extra html per key (e.g. the row's accuracy)."""
    classes, scales = _pair_grid(grids, "class")
    name = (lambda c: class_names[c] if class_names is not None and isinstance(c, int) else str(c))
    width = max(plots.grid_array(g, nrow=nrow).shape[1] for g in grids.values())

    def render(key):
        c, s = key
        caption = _scale_caption(name(c), scale_name, s, (captions or {}).get(key, ""))
        return encode_png(plots.grid_array(grids[key], nrow=nrow), _scale_for(width, scale)), caption

    start = (classes[0], scales[0]) if value is None else value
    dropdown = widgets.Dropdown(options=[(name(c), c) for c in classes], value=start[0], description="class")
    slider = widgets.SelectionSlider(options=scales, value=start[1], description=scale_name, continuous_update=True)
    return FrameViewer([dropdown, slider], render, [(c, s) for c in classes for s in scales], cache=cache)


def prompt_scale_viewer(grids: Mapping[tuple, object], *, scale_name: str = "scale", value: tuple | None = None,
                        cache: bool = True, nrow: int = 8, scale: int | None = None,
                        captions: Mapping[tuple, str] | None = None):
    """A prompt box and a guidance-scale slider over precomputed grids {(prompt, s): (N, C, H, W)}
    (lesson 06 on: samples of each cached prompt at each guidance scale). The box is a Combobox: it
    suggests the cached prompts as the learner types; a prompt that was not cached shows a grey
    frame and says which prompts were. captions: extra html per key (e.g. the row's caption accuracy)."""
    prompts, scales = _pair_grid(grids, "prompt")
    first = plots.grid_array(next(iter(grids.values())), nrow=nrow)
    width = max(plots.grid_array(g, nrow=nrow).shape[1] for g in grids.values())

    def render(key):
        p, s = key
        if (p, s) not in grids:
            known = "; ".join(html.escape(q) for q in prompts)
            blank = np.full_like(first, 0.5)
            return encode_png(blank, _scale_for(width, scale)), (
                f"<b>{html.escape(str(p))}</b> was not sampled in advance. Cached prompts: {known}")
        caption = _scale_caption(p, scale_name, s, (captions or {}).get(key, ""))
        return encode_png(plots.grid_array(grids[key], nrow=nrow), _scale_for(width, scale)), caption

    start = (prompts[0], scales[0]) if value is None else value
    box = widgets.Combobox(options=prompts, value=start[0], description="prompt", ensure_option=False,
                           placeholder="type a caption", layout=widgets.Layout(width="420px"))
    slider = widgets.SelectionSlider(options=scales, value=start[1], description=scale_name, continuous_update=True)
    return FrameViewer([box, slider], render, [(p, s) for p in prompts for s in scales], cache=cache)


# ---- lesson 07: a mask editor for inpainting ----------------------------------------------------

def _check_cells(cells, size) -> tuple:
    for name, v in (("cells", cells), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if size % cells:
        whole = [c for c in range(1, size + 1) if size % c == 0]
        raise ValueError(f"cells={cells} does not divide size={size}: each cell must be a whole number of pixels "
                         f"(cells could be one of {whole})")
    return int(cells), int(size)


def _check_bits(bits, cells: int) -> tuple:
    """bits as a tuple of cells * cells ints 0 / 1, row-major (1: a cell to fill)."""
    if isinstance(bits, torch.Tensor):
        bits = bits.flatten().tolist()
    try:
        bits = tuple(bits)
    except TypeError:
        raise TypeError(f"bits must be a sequence of {cells * cells} values 0 or 1, got {type(bits).__name__}") from None
    if len(bits) != cells * cells:
        raise ValueError(f"bits must hold cells * cells = {cells * cells} values (row-major, 1: a cell to fill), "
                         f"got {len(bits)}")
    if any(b not in (0, 1) for b in bits):
        raise ValueError(f"bits must be 0 (known) or 1 (to fill), got {sorted(set(bits) - {0, 1}, key=str)[:3]}")
    return tuple(int(b) for b in bits)


def mask_from_cells(bits, cells: int, size: int) -> torch.Tensor:
    """The inpainting mask (1, 1, size, size), float, of a cells x cells grid of bits (row-major, 1 or
    True: a cell to fill): 1 where the image is known, 0 in the cells to fill (models.glide's mask)."""
    cells, size = _check_cells(cells, size)
    fill = torch.tensor(_check_bits(bits, cells), dtype=torch.float32).view(cells, cells)
    block = size // cells
    return (1 - fill.repeat_interleave(block, 0).repeat_interleave(block, 1))[None, None]


def _editor_images(images, size: int, what: str) -> torch.Tensor:
    """images checked to be (N, 3, size, size), finite floats: what a run returns and cached holds."""
    want = f"images shaped (N, 3, {size}, {size}) in [-1, 1]"
    if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating-point tensor of {want}, got "
                        f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.dim() != 4 or images.shape[0] == 0 or tuple(images.shape[1:]) != (3, size, size):
        hint = " (one image? return x[None])" if images.dim() == 3 else ""
        raise ValueError(f"{what} must be {want}, N >= 1, got {tuple(images.shape)}{hint}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} holds NaN or inf")
    return images.detach().cpu().float()


def _side_by_side(arrays, gap: int = 6) -> np.ndarray:
    """RGB arrays in [0, 1] joined left to right on a white ground, top-aligned, `gap` columns apart."""
    height = max(a.shape[0] for a in arrays)
    parts = []
    for i, a in enumerate(arrays):
        parts.append(np.concatenate([a, np.ones((height - a.shape[0],) + a.shape[1:])], 0))
        if i < len(arrays) - 1:
            parts.append(np.ones((height, gap, 3)))
    return np.concatenate(parts, 1)


class MaskEditor(widgets.VBox):
    """A cells x cells grid of toggle buttons (pressed: a cell for the model to fill), a prompt dropdown,
    an Inpaint button, the picture and a caption under it (lesson 07's inpainting).

    Inpaint calls run(mask, prompt) -> images (N, 3, size, size) in [-1, 1], mask (1, 1, size, size)
    float with 1 = known, 0 = fill, once per key (the pressed cells, the prompt); the result is kept in
    `cache` {(bits, prompt): images}, bits a tuple of cells * cells 0 / 1 (row-major, 1: fill). A cached
    key shows the first sample with the filled cells shaded beside all N samples; a key not yet run
    shows the mask (dark: to fill). Attributes: buttons, prompt, button, image, caption, cache, error
    (the message of the last failed run, or None); methods bits(), mask(), key, set_bits(), inpaint(),
    frame(key), show().
    """

    def __init__(self, run: Callable, prompts: Sequence[str], *, cells: int = 4, size: int = 32,
                 cached: Mapping[tuple, object] | None = None, nrow: int = 8, scale: int | None = None):
        super().__init__()
        if not callable(run):
            raise TypeError(f"run must be a function run(mask, prompt) -> images, got {type(run).__name__}")
        self.cells, self.size = _check_cells(cells, size)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass the captions the learner can choose from")
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings (captions)")
        self.prompts = list(dict.fromkeys(prompts))
        self.run_fn, self.nrow, self.scale, self.error, self._quiet = run, nrow, scale, None, False
        self.cache = {}
        for key, images in (cached or {}).items():
            if not isinstance(key, tuple) or len(key) != 2 or key[1] not in self.prompts:
                raise ValueError(f"cached keys must be (bits, prompt) with the prompt one of prompts, got {key!r}")
            self.cache[(_check_bits(key[0], self.cells), key[1])] = _editor_images(images, self.size,
                                                                                    f"cached[{key!r}]")
        bits, prompt = next(iter(self.cache), ((0,) * self.cells ** 2, self.prompts[0]))   # a cached key first
        self.buttons = [widgets.ToggleButton(value=bool(b), tooltip=f"row {i // self.cells}, column "
                                             f"{i % self.cells}: press to fill", layout=widgets.Layout(
                                                 width="28px", height="28px", padding="0px"))
                        for i, b in enumerate(bits)]
        grid = widgets.GridBox(self.buttons, layout=widgets.Layout(
            grid_template_columns=f"repeat({self.cells}, 30px)", grid_gap="2px"))
        self.prompt = widgets.Dropdown(options=self.prompts, value=prompt, description="prompt",
                                       layout=widgets.Layout(width="420px"))
        self.button = widgets.Button(description="Inpaint", button_style="primary",
                                     tooltip="fill the pressed cells with the prompt")
        self.image = widgets.Image(format="png")
        self.caption = widgets.HTML()
        self.children = [widgets.HBox([grid, widgets.VBox([self.prompt, self.button])]), self.image, self.caption]
        for b in self.buttons:
            b.observe(self._changed, names="value")
        self.prompt.observe(self._changed, names="value")
        self.button.on_click(self._clicked)
        self.show()

    def bits(self) -> tuple:
        """The pressed cells, row-major, 1: to fill."""
        return tuple(int(b.value) for b in self.buttons)

    def mask(self) -> torch.Tensor:
        """The mask of the pressed cells, (1, 1, size, size), 1 = known, 0 = fill."""
        return mask_from_cells(self.bits(), self.cells, self.size)

    @property
    def key(self) -> tuple:
        """(bits, prompt): what the controls select now, the cache's key."""
        return self.bits(), self.prompt.value

    def set_bits(self, bits) -> None:
        """Press exactly the cells of `bits` (row-major, 1: fill), showing the frame once."""
        bits = _check_bits(bits, self.cells)
        self._quiet = True
        try:
            for b, v in zip(self.buttons, bits):
                b.value = bool(v)
        finally:
            self._quiet = False
        self.show()

    def inpaint(self) -> torch.Tensor:
        """The images of the current key: from the cache, or run(mask, prompt) once and cached."""
        key = self.key
        if key not in self.cache:
            images = self.run_fn(self.mask(), key[1])
            self.cache[key] = _editor_images(images, self.size, "run(mask, prompt)")
        self.show()
        return self.cache[key]

    def frame(self, key) -> tuple:
        """(png bytes, caption html) of `key`: the samples if it is cached, else the mask to fill."""
        bits, prompt = key
        mask = mask_from_cells(bits, self.cells, self.size)
        filled = f"{sum(bits)} of {self.cells ** 2} cells filled"
        if key in self.cache:
            images = self.cache[key]
            shaded = images[:1].clamp(-1, 1) * (1 - 0.6 * (1 - mask))        # the filled cells toward grey
            arrays = [plots.grid_array(shaded, nrow=1), plots.grid_array(images, nrow=self.nrow)]
            caption = (f"<b>{html.escape(prompt)}</b>: {len(images)} samples, {filled} (shaded in the first "
                       f"image on the left)")
        else:
            m = mask.expand(1, 3, -1, -1)
            arrays = [plots.grid_array(0.6 * m - 0.5 * (1 - m), nrow=1)]           # light: known, dark: to fill
            caption = (f"<b>{html.escape(prompt)}</b>: {filled} (dark); press <i>Inpaint</i> to sample"
                       + ("" if sum(bits) else " (no cell pressed: press the cells to fill first)"))
        a = _side_by_side(arrays)
        return encode_png(a, _scale_for(a.shape[1], self.scale)), caption

    def show(self) -> None:
        """Show the frame of the current key (the cached samples, or the mask to fill)."""
        png, caption = self.frame(self.key)
        if self.error:
            caption += f'<br><span style="color:#b42318">{html.escape(self.error)}</span>'
        with self.hold_sync():
            self.image.value, self.caption.value = png, caption

    def _changed(self, change=None):
        self.error = None
        if not self._quiet:
            self.show()

    def _clicked(self, button=None):
        """Inpaint, with a failure shown in the caption (an error raised in a widget callback is not)."""
        self.button.disabled, self.button.description = True, "Inpainting..."
        try:
            self.error = None
            self.inpaint()
        except Exception as e:
            self.error = f"run failed: {type(e).__name__}: {e}"
            self.show()
        finally:
            self.button.disabled, self.button.description = False, "Inpaint"

    def _repr_mimebundle_(self, **kwargs):
        """The widget view for a live frontend, plus a static picture for renderers without one."""
        return with_still(super()._repr_mimebundle_(**kwargs), self.image.value, self.caption.value,
                          "a still of the mask editor: run the cell in Jupyter to press cells and inpaint")


def mask_editor(run: Callable, prompts: Sequence[str], *, cells: int = 4, size: int = 32,
                cached: Mapping[tuple, object] | None = None, nrow: int = 8, scale: int | None = None) -> MaskEditor:
    """A mask editor for inpainting (lesson 07): press cells of a cells x cells grid to mark the region
    to fill, choose a prompt, press Inpaint. run(mask, prompt) -> images (N, 3, size, size) in [-1, 1]
    is called with mask (1, 1, size, size), 1 = known, 0 = fill, once per (cells, prompt); cached
    {(bits, prompt): images} holds results computed before (e.g. another editor's `.cache`), so a saved
    notebook shows them without a kernel; the editor starts on the first cached key. bits: a tuple of
    cells * cells 0 / 1, row-major, 1 = a cell to fill (mask_from_cells turns it into the mask)."""
    return MaskEditor(run, prompts, cells=cells, size=size, cached=cached, nrow=nrow, scale=scale)
