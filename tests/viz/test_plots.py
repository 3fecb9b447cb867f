"""Plot helpers: grids tile and scale images as documented, curves carry the schedule's values,
noising grids use one noise draw for every t, and nothing calls plt.show()."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib.diffusion import formulas, schedules  # noqa: E402
from course_lib.samplers import loop  # noqa: E402
from course_lib.viz import plots  # noqa: E402


@pytest.fixture(autouse=True)
def no_show_and_close(monkeypatch):
    def show(*args, **kwargs):
        raise AssertionError("plot helpers must not call plt.show()")
    monkeypatch.setattr(plt, "show", show)
    yield
    plt.close("all")


def _images(n=5, c=1, h=4, w=3, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_grid_array_tiles_grey_images_row_major_with_padding():
    x = _images(5)
    grid = plots.grid_array(x, nrow=3, padding=1)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (3 + 1) + 1)
    # image 4 is row 1, column 1; [-1, 1] maps to [0, 1]
    np.testing.assert_allclose(grid[6:10, 5:8], ((x[4, 0] + 1) / 2).numpy(), atol=1e-6)
    assert grid[0].min() == 1.0  # the padding is white
    assert grid[6:10, 9:12].min() == 1.0  # the unused sixth tile is padding


def test_grid_array_rgb_and_clipping():
    x = _images(2, c=3) * 3  # noisy values beyond [-1, 1] are clipped for display
    grid = plots.grid_array(x, nrow=8, padding=0)
    assert grid.shape == (4, 6, 3)
    assert grid.min() >= 0 and grid.max() <= 1
    np.testing.assert_allclose(grid[:, :3], ((x[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 3), (2, 4, 3), (2, 2, 4, 3), (0, 1, 4, 3)])
def test_grid_array_rejects_bad_shapes_with_a_clear_error(shape):
    with pytest.raises(ValueError, match="N, C, H, W|empty"):
        plots.grid_array(torch.zeros(shape))


def test_image_grid_draws_on_the_given_axes():
    fig, ax = plt.subplots()
    out = plots.image_grid(_images(6), nrow=3, ax=ax, title="six")
    assert out is ax and ax.get_title() == "six"
    assert ax.images[0].get_array().shape == (2 * 5 + 1, 3 * 4 + 1)
    assert isinstance(plots.image_grid(_images(2)).figure, matplotlib.figure.Figure)  # new figure when ax=None


def test_plot_schedules_and_snr_plot_the_schedule_values():
    named = {"linear": schedules.schedule("linear", 50), "cosine": schedules.schedule("cosine", 50)}
    ax = plots.plot_schedules(named)
    assert [line.get_label() for line in ax.get_lines()] == ["linear", "cosine"]
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), named["cosine"].alpha_bar.numpy())
    ax = plots.plot_snr(named)
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), named["linear"].snr().numpy())
    ax = plots.plot_snr(named["linear"])  # a single schedule is fine too
    assert ax.get_legend() is None


def test_noised_images_match_q_sample_and_share_one_noise_draw():
    sched = schedules.schedule("linear", 100)
    x0, noise = _images(3), torch.randn(3, 1, 4, 3)
    ts = [0, 30, 99]
    frames = plots.noised_images(sched, x0, ts, noise)
    assert frames.shape == (3, 3, 1, 4, 3)
    for frame, t in zip(frames, ts):
        tt = torch.full((3,), t)
        torch.testing.assert_close(frame, formulas.q_sample(sched, x0, tt, noise))
        torch.testing.assert_close(formulas.eps_from_x0(sched, frame, tt, x0), noise, rtol=1e-4, atol=1e-4)


def test_noising_grid_labels_columns_with_t_and_rows_with_names():
    sched = schedules.schedule("cosine", 100)
    ax = plots.noising_grid(sched, _images(2), [10, 50, 99], row_labels=["a", "b"], title="cosine",
                            generator=torch.Generator().manual_seed(0))
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels[0] == "$x_0$" and labels[1].startswith("t=10") and len(labels) == 4
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["a", "b"]
    assert ax.images[0].get_array().shape == (2 * 5 + 1, 4 * 4 + 1)
    ax = plots.noising_grid(sched, _images(2), [10], show_x0=False)
    assert len(ax.get_xticklabels()) == 1


def test_trajectory_grid_shows_evenly_spaced_recorded_steps():
    sched = schedules.schedule("linear", 12)
    traj = loop.Trajectory()
    loop.sample(lambda x, t, c: torch.zeros_like(x), sched, (2, 1, 4, 3), generator=torch.Generator().manual_seed(0),
                progress=False, callback=traj)
    ax = plots.trajectory_grid(traj, n=4, which="x_t")
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["t=11", "t=7", "t=4", "t=0"]
    with pytest.raises(ValueError, match="which"):
        plots.trajectory_grid(traj, which="eps")
    with pytest.raises(ValueError, match="empty"):
        plots.trajectory_grid(loop.Trajectory())


def test_smooth_ema_is_debiased_and_plot_loss_draws_raw_and_smoothed():
    np.testing.assert_allclose(plots.smooth_ema([2.0] * 5, 0.9), [2.0] * 5)  # no pull towards 0 at the start
    history = [(i, 1.0 / (i + 1)) for i in range(50)]
    ax = plots.plot_loss(history, smooth=0.8, label="run")
    raw, smooth = ax.get_lines()
    np.testing.assert_allclose(raw.get_ydata(), [loss for _, loss in history])
    assert smooth.get_label() == "run" and ax.get_yscale() == "log"
    assert len(plots.plot_loss(history, smooth=0, logy=False).get_lines()) == 1
    with pytest.raises(ValueError, match="smooth"):
        plots.plot_loss(history, smooth=1.0)
    with pytest.raises(ValueError, match="pairs"):
        plots.plot_loss([])


def test_captioned_grid_titles_and_marks():
    import matplotlib.pyplot as plt
    from course_lib.viz.plots import captioned_grid
    x = torch.zeros(5, 3, 8, 8)
    fig = captioned_grid(x, [f"caption {i}" for i in range(5)], ncol=3, marks=[True, False, True, True, False])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"caption {i}" for i in range(5)]
    assert fig.axes[1].title.get_color() == "#b42318"
    plt.close(fig)
    with pytest.raises(ValueError, match="captions"):
        captioned_grid(x, ["one"])


def test_captioned_grid_draws_grey_images_in_grey():
    import matplotlib
    matplotlib.use("Agg")
    import torch
    from course_lib.viz import plots
    fig = plots.captioned_grid(torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4), ["a"], ncol=1)
    im = fig.axes[0].images[0]
    assert im.get_cmap().name == "gray" and im.get_clim() == (0, 1)
