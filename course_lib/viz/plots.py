"""Plotting helpers shared by every lesson: image grids, schedules, SNR, noising grids, losses.

Images are batches (N, C, H, W) in [-1, 1] with C = 1 (grey) or 3 (RGB), the range every
course dataset and sampler uses; values outside [-1, 1] (noisy x_t) are clipped for display.
Each helper draws on `ax` (a new figure when None) and returns that Axes (its Figure is
`ax.figure`); none calls plt.show(). `grid_array` and `noised_images` are the pure array
pieces, shared with `viz.widgets`. Used from lesson 01 on.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from course_lib.diffusion import formulas
from course_lib.diffusion.schedules import NoiseSchedule


def _check_images(images) -> torch.Tensor:
    images = torch.as_tensor(images).detach().cpu()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C = 1 or 3, got "
                         f"{tuple(images.shape)}; for a single image use x[None]")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    return images.float()


def grid_array(images, nrow: int = 8, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one array in [0, 1]: (rows*H', cols*W') for
    grey, (.., .., 3) for RGB. nrow: images per row (as in torchvision.utils.make_grid);
    pad_value in [0, 1] (1 = white lines between tiles)."""
    x = _check_images(images).clamp(-1, 1).add(1).div(2)             # (N, C, H, W) in [0, 1]
    N, C, H, W = x.shape
    cols = max(1, min(nrow, N))
    rows = -(-N // cols)
    out = torch.full((C, rows * (H + padding) + padding, cols * (W + padding) + padding), float(pad_value))
    for i in range(N):
        r, c = divmod(i, cols)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        out[:, top:top + H, left:left + W] = x[i]
    return out[0].numpy() if C == 1 else out.permute(1, 2, 0).numpy()


def _new_ax(ax, figsize):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt
    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def image_grid(images, nrow: int = 8, ax=None, title: str | None = None, padding: int = 1):
    """Show (N, C, H, W) images in [-1, 1] as one grid, nrow images per row. Returns the Axes."""
    grid = grid_array(images, nrow=nrow, padding=padding)
    ax = _new_ax(ax, figsize=(min(12, 0.25 + 0.9 * grid.shape[1] / 30), 0.25 + 0.9 * grid.shape[0] / 30))
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def _as_dict(schedules) -> dict:
    if isinstance(schedules, NoiseSchedule):
        return {"": schedules}
    if not isinstance(schedules, Mapping) or not schedules:
        raise TypeError("schedules must be a NoiseSchedule or a non-empty dict {name: NoiseSchedule}")
    return dict(schedules)


def plot_schedules(schedules, ax=None, title: str | None = r"$\bar\alpha_t$: the share of signal variance left"):
    """alpha_bar_t against t for each schedule in {name: NoiseSchedule} (or one schedule)."""
    ax, named = _new_ax(ax, figsize=(5, 3.2)), _as_dict(schedules)
    for name, s in named.items():
        ax.plot(torch.arange(s.T).numpy(), s.alpha_bar.numpy(), label=name or None)
    ax.set(xlabel="t (index into the schedule)", ylabel=r"$\bar\alpha_t$", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    if any(named):
        ax.legend()
    return ax


def plot_snr(schedules, ax=None, title: str | None = "signal-to-noise ratio"):
    """SNR_t = alpha_bar_t / (1 - alpha_bar_t) against t on a log axis, with SNR = 1 marked."""
    ax, named = _new_ax(ax, figsize=(5, 3.2)), _as_dict(schedules)
    for name, s in named.items():
        ax.plot(torch.arange(s.T).numpy(), s.snr().numpy(), label=name or None)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set(xlabel="t (index into the schedule)", ylabel=r"SNR $=\bar\alpha_t/(1-\bar\alpha_t)$", title=title)
    ax.grid(alpha=0.3, which="major")
    if any(named):
        ax.legend()
    return ax


def noised_images(schedule: NoiseSchedule, x0, ts: Sequence[int], noise=None, *, generator=None) -> torch.Tensor:
    """x_t = q_sample(x0, t, noise) for each t in ts, the same noise for every t (so only the
    schedule changes between frames). x0 (N, C, H, W) -> (len(ts), N, C, H, W)."""
    x0 = _check_images(x0)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator)
    frames = [formulas.q_sample(schedule, x0, torch.full((x0.shape[0],), int(t), dtype=torch.long), noise)
              for t in ts]
    return torch.stack(frames)


def columns_grid(columns: Sequence, labels: Sequence[str], ax=None, title: str | None = None,
                 row_labels: Sequence[str] | None = None):
    """One grid from a list of batches: column j shows columns[j] (N, C, H, W), rows are images.
    labels name the columns (under them); row_labels name the rows. Returns the Axes."""
    cols = [_check_images(c) for c in columns]
    N, (C, H, W) = cols[0].shape[0], cols[0].shape[1:]
    if any(c.shape != cols[0].shape for c in cols):
        raise ValueError("every column must hold a batch of the same shape")
    tiles = torch.stack(cols, dim=1).reshape(N * len(cols), C, H, W)     # row-major: image i, column j
    ax = image_grid(tiles, nrow=len(cols), ax=_new_ax(ax, figsize=(1.0 + 0.75 * len(cols), 0.4 + 0.75 * N)))
    ax.set_axis_on()
    ax.set_xticks([1 + j * (W + 1) + W / 2 for j in range(len(cols))], list(labels), fontsize=8)
    ax.set_yticks([1 + i * (H + 1) + H / 2 for i in range(N)], list(row_labels) if row_labels else [""] * N,
                  fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title)
    return ax


def _short(value) -> str:
    """A schedule value for a label: 2 significant digits, more when it is close to 1."""
    value = float(value)
    return f"{value:.4f}" if 0.99 < value < 1 else f"{value:.2g}"


def noising_grid(schedule: NoiseSchedule, images, ts: Sequence[int], *, ax=None, noise=None, generator=None,
                 title: str | None = None, row_labels: Sequence[str] | None = None, show_x0: bool = True):
    """Rows = images, columns = x_t at each t in ts (one noise draw per image, shared by all t),
    with x_0 first when show_x0. Columns are labelled with t and alpha_bar_t. Returns the Axes."""
    x0 = _check_images(images)
    frames = noised_images(schedule, x0, ts, noise, generator=generator)
    columns = ([x0] if show_x0 else []) + list(frames)
    labels = (["$x_0$"] if show_x0 else []) + [f"t={int(t)}\n" + r"$\bar\alpha$=" + _short(schedule.alpha_bar[int(t)])
                                               for t in ts]
    return columns_grid(columns, labels, ax=ax, title=title, row_labels=row_labels)


def trajectory_grid(trajectory, n: int = 8, *, which: str = "x0", ax=None, title: str | None = None):
    """A static strip of a samplers.loop.Trajectory: n evenly spaced recorded steps as columns,
    showing `which` ("x0": the predicted clean image, or "x_t"). Returns the Axes."""
    if which not in ("x0", "x_t"):
        raise ValueError(f"which must be 'x0' or 'x_t', got {which!r}")
    if not trajectory.t:
        raise ValueError("the trajectory is empty: pass it as callback= to samplers.loop.sample first")
    picks = np.unique(np.linspace(0, len(trajectory.t) - 1, min(n, len(trajectory.t))).round().astype(int))
    frames = getattr(trajectory, which)
    return columns_grid([frames[i] for i in picks], [f"t={trajectory.t[i]}" for i in picks], ax=ax,
                        title=title or ("predicted $x_0$" if which == "x0" else "$x_t$"))


def smooth_ema(values, smooth: float) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard's smoothing): smooth in [0, 1)."""
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must lie in [0, 1), got {smooth}")
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = smooth * avg + (1 - smooth) * float(v)
        out[i] = avg / (1 - smooth ** (i + 1))
    return out


def plot_loss(history: Iterable, ax=None, smooth: float = 0.9, logy: bool = True,
              label: str | None = None, title: str | None = "training loss"):
    """Loss curve from (step, loss) pairs (trainer.TrainResult.history): the raw values faint,
    their debiased EMA (smooth in [0, 1), 0 = none) on top. Returns the Axes."""
    pairs = np.asarray(list(history), dtype=float)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise ValueError("history must be a non-empty sequence of (step, loss) pairs")
    steps, loss = pairs[:, 0], pairs[:, 1]
    ax = _new_ax(ax, figsize=(5, 3.2))
    raw = ax.plot(steps, loss, alpha=0.3 if smooth > 0 else 1.0, lw=0.8)[0]
    if smooth > 0:
        ax.plot(steps, smooth_ema(loss, smooth), color=raw.get_color(), label=label)
    elif label:
        raw.set_label(label)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    if label:
        ax.legend()
    return ax


def captioned_grid(images, captions: Sequence[str], ncol: int = 4, *, width: float = 2.3, wrap: int = 26,
                   suptitle: str | None = None, marks: Sequence[bool] | None = None):
    """Images (N, C, H, W) in [-1, 1] in a grid of ncol columns, each titled with its caption
    (wrapped at `wrap` characters); marks: per image True (green title) or False (red), e.g. whether
    the judge agrees with the caption. Returns the figure."""
    import textwrap
    import matplotlib.pyplot as plt
    images = _check_images(images)
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    nrow = max(1, -(-images.shape[0] // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, width * nrow * 1.15), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= images.shape[0]:
            continue
        tile = grid_array(images[k:k + 1], nrow=1, padding=0)
        ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=1)   # grey stays grey
        color = "black" if marks is None else ("#1a7f37" if marks[k] else "#b42318")
        ax.set_title("\n".join(textwrap.wrap(captions[k], wrap)), fontsize=8, color=color)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
