"""Widgets: they construct without a frontend, moving the control swaps the shown frame, cached
frames are served without recomputing q_sample, and a static picture rides along for renderers
without a kernel."""
import base64
import io

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from course_lib.diffusion import formulas, schedules  # noqa: E402
from course_lib.samplers import loop  # noqa: E402
from course_lib.viz import plots, widgets  # noqa: E402


def _images(n=4, seed=0):
    return torch.rand(n, 1, 6, 5, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _png_size(data: bytes):
    return Image.open(io.BytesIO(data)).size


@pytest.fixture
def sched():
    return schedules.schedule("linear", 100)


def test_default_ts_are_evenly_spaced_and_end_at_the_last_step():
    ts = widgets.default_ts(1000)
    assert len(ts) == 100 and ts[-1] == 999 and len({b - a for a, b in zip(ts, ts[1:])}) == 1
    assert widgets.default_ts(7) == list(range(7))


def test_t_slider_caches_every_frame_and_shows_the_first(sched):
    w = widgets.t_slider(sched, _images(), generator=torch.Generator().manual_seed(0))
    assert isinstance(w, ipywidgets.VBox) and isinstance(w.control, ipywidgets.IntSlider)
    assert (w.control.min, w.control.max, w.control.step) == (0, 99, 1)
    assert set(w.frames) == set(range(100))
    assert w.image.value == w.frames[0][0]
    assert "t = 0" in w.caption.value


def test_moving_the_slider_changes_the_frame_and_caption(sched):
    w = widgets.t_slider(sched, _images(), ts=[0, 20, 40, 60, 80], generator=torch.Generator().manual_seed(0))
    first = w.image.value
    w.control.value = 60
    assert w.image.value == w.frames[60][0] != first
    ab = float(sched.alpha_bar[60])
    assert "t = 60" in w.caption.value and f"{ab:.4g}" in w.caption.value and f"{ab / (1 - ab):.3g}" in w.caption.value


def test_cached_frames_are_served_without_recomputing(sched, monkeypatch):
    w = widgets.t_slider(sched, _images(), ts=[0, 50, 99], generator=torch.Generator().manual_seed(0))

    def boom(*args, **kwargs):
        raise AssertionError("q_sample ran on a slider move although the frames are cached")
    monkeypatch.setattr(formulas, "q_sample", boom)
    w.control.value = 99
    assert w.image.value == w.frames[99][0]


def test_without_cache_each_move_renders_the_same_frame(sched, monkeypatch):
    x0, noise = _images(), torch.randn(4, 1, 6, 5)
    cached = widgets.t_slider(sched, x0, ts=[0, 50, 99], noise=noise)
    calls = []
    real = formulas.q_sample
    monkeypatch.setattr(formulas, "q_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    live = widgets.t_slider(sched, x0, ts=[0, 50, 99], noise=noise, cache=False)
    assert live.frames == {} and len(calls) == 1
    live.control.value = 50
    assert len(calls) == 2 and live.image.value == cached.frames[50][0]


def test_uneven_ts_give_a_selection_slider_and_bad_ts_are_refused(sched):
    w = widgets.t_slider(sched, _images(), ts=[0, 5, 30, 99], t=30)
    assert isinstance(w.control, ipywidgets.SelectionSlider) and w.control.value == 30
    w.control.value = 99
    assert w.image.value == w.frames[99][0]
    for bad in ([0, 100], [50, 10], []):
        with pytest.raises(ValueError, match="ts"):
            widgets.t_slider(sched, _images(), ts=bad)
    with pytest.raises(ValueError, match="offered"):
        widgets.t_slider(sched, _images(), ts=[0, 10], t=5)


def test_static_picture_rides_along_for_renderers_without_a_kernel(sched):
    w = widgets.t_slider(sched, _images(), ts=[0, 50], t=50)
    bundle = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    png = base64.b64decode(bundle["image/png"])
    assert png == w.frames[50][0] and png.startswith(b"\x89PNG")
    assert bundle["image/png"] in bundle["text/html"] and "t = 50" in bundle["text/html"]


def test_small_images_are_enlarged_by_a_whole_factor(sched):
    w = widgets.t_slider(sched, _images(2), ts=[0], nrow=2, scale=3)
    grid = plots.grid_array(_images(2), nrow=2)
    assert _png_size(w.image.value) == (3 * grid.shape[1], 3 * grid.shape[0])


def _trajectory(T=10):
    sched = schedules.schedule("linear", T)
    traj = loop.Trajectory()
    loop.sample(lambda x, t, c: torch.zeros_like(x), sched, (3, 1, 6, 5), generator=torch.Generator().manual_seed(0),
                progress=False, callback=traj)
    return traj


def test_trajectory_slider_shows_x_t_beside_predicted_x0():
    traj = _trajectory()
    w = widgets.trajectory_slider(traj, scale=1)
    assert w.control.value == len(traj.t) - 1 and len(w.frames) == len(traj.t)  # starts on the finished sample
    grid = plots.grid_array(traj.x_t[0])
    assert _png_size(w.image.value) == (2 * grid.shape[1] + 6, grid.shape[0])
    w.control.value = 0
    assert w.image.value == w.frames[0][0] and f"t = {traj.t[0]}" in w.caption.value
    with pytest.raises(ValueError, match="empty"):
        widgets.trajectory_slider(loop.Trajectory())


def test_grid_selector_switches_between_cached_grids():
    grids = {"class <0>": _images(seed=1), "class 1": _images(seed=2)}
    w = widgets.grid_selector(grids, description="class")
    assert isinstance(w.control, ipywidgets.Dropdown) and list(w.control.options) == list(grids)
    assert "class &lt;0&gt;" in w.caption.value  # labels are escaped
    w.control.value = "class 1"
    assert w.image.value == w.frames["class 1"][0] != w.frames["class <0>"][0]
    with pytest.raises(ValueError, match="empty"):
        widgets.grid_selector({})


def test_class_scale_viewer_has_two_controls_and_shows_each_pair():
    grids = {(c, s): _images(4, seed=10 * c + int(2 * s)) for c in (0, 1, 2) for s in (0.0, 1.0, 2.5)}
    w = widgets.class_scale_viewer(grids, class_names=["tee", "trouser", "pullover"], scale_name="s",
                                   captions={(1, 2.5): "accuracy 93%"})
    dropdown, slider = w.controls
    assert isinstance(dropdown, ipywidgets.Dropdown) and isinstance(slider, ipywidgets.SelectionSlider)
    assert list(slider.options) == [0.0, 1.0, 2.5] and len(w.frames) == 9
    assert w.key() == (0, 0.0) and "tee" in w.caption.value
    first = w.image.value
    dropdown.value, slider.value = 1, 2.5
    assert w.key() == (1, 2.5) and w.image.value == w.frames[(1, 2.5)][0] != first
    assert "trouser" in w.caption.value and "s = 2.5" in w.caption.value and "accuracy 93%" in w.caption.value
    assert "image/png" in w._repr_mimebundle_()


def test_class_scale_viewer_refuses_missing_pairs_and_empty_grids():
    with pytest.raises(ValueError, match="every"):
        widgets.class_scale_viewer({(0, 1.0): _images(), (1, 2.0): _images()})
    with pytest.raises(ValueError, match="empty"):
        widgets.class_scale_viewer({})


def test_prompt_scale_viewer_moves_through_cached_frames_and_names_uncached_prompts():
    from course_lib.viz.widgets import prompt_scale_viewer
    grids = {(p, s): torch.full((2, 3, 8, 8), 0.1 * i + 0.05 * j - 0.5)
             for i, p in enumerate(["a red circle", "a blue square"]) for j, s in enumerate([0.0, 2.0, 5.0])}
    v = prompt_scale_viewer(grids, captions={("a red circle", 2.0): "acc 50%"})
    assert len(v.frames) == 6
    seen = {bytes(v.image.value)}
    v.controls[1].value = 2.0
    assert "acc 50%" in v.caption.value
    v.controls[0].value = "a blue square"
    seen.add(bytes(v.image.value))
    assert len(seen) == 2 and "a blue square" in v.caption.value
    v.controls[0].value = "a green cross"
    assert "was not sampled in advance" in v.caption.value and "a red circle" in v.caption.value
    with pytest.raises(ValueError, match="every"):
        prompt_scale_viewer({("a", 1.0): grids[("a red circle", 0.0)], ("b", 2.0): grids[("a red circle", 0.0)]})


def test_saved_widget_state_holds_the_shown_frame_and_the_control(sched):
    """What "Save widget state" stores with a notebook (and a page can embed): the image model's
    value is the PNG of the frame the slider is on, and the slider model holds that t."""
    from ipywidgets.embed import embed_data
    w = widgets.t_slider(sched, _images(), ts=[0, 33, 66, 99])                  # an IntSlider
    w.control.value = 66
    data = embed_data(views=[w])
    state = data["manager_state"]["state"]
    assert [v["model_id"] for v in data["view_specs"]] == [w.model_id]
    buffers = {tuple(b["path"]): b for b in state[w.image.model_id]["buffers"]}
    assert base64.b64decode(buffers[("value",)]["data"]) == w.frames[66][0]
    assert state[w.control.model_id]["state"]["value"] == 66
    assert state[w.caption.model_id]["state"]["value"] == w.frames[66][1]
