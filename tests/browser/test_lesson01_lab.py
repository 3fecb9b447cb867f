"""Lesson 01 in JupyterLab, in headless Chromium: run the cells the t slider needs (found from the
names the slider's cell reads), drag the slider and check the picture changes, pixel by pixel,
with the readout and the caption following; a slider cell left unrun shows its saved still.
Screenshots: .ci/artifacts/lesson01_lab*.png."""
import ast
import builtins
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from course_lib.data import fashion_mnist

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
SLIDER_CALL = "widgets.t_slider("
RUN_TIMEOUT_S = 90            # the needed cells, in quick mode, on a slow CPU (about 15 s here)


def lesson01() -> Path:
    found = sorted((ROOT / "notebooks").glob("01_*.ipynb"))
    if not found:
        pytest.skip("no notebooks/01_*.ipynb")
    return found[0]


def names_of(source: str) -> tuple[set, set]:
    """(names a cell defines, names it reads without defining them): assignments, imports, def,
    class and function arguments define; every other use of a name reads."""
    defined, read = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return defined, read - defined - set(dir(builtins))


def cells_needed(sources: list, target: int) -> list[int]:
    """The code cells `target` needs, in order, itself last: for each name a needed cell reads, the
    last code cell before it that defines the name. sources: the cells' code (None: markdown)."""
    names = {i: names_of(s) for i, s in enumerate(sources) if s is not None}
    needed, todo = {target}, [target]
    while todo:
        i = todo.pop()
        for name in names[i][1]:
            j = next((j for j in range(i - 1, -1, -1) if j in names and name in names[j][0]), None)
            if j is not None and j not in needed:
                needed.add(j)
                todo.append(j)
    return sorted(needed)


def test_cells_needed_follows_names_back_to_the_cells_that_define_them():
    sources = ["import torch", None, "x = torch.ones(3)\ndef f(t): return t", "y = 2", "z = f(x) + len([])"]
    assert cells_needed(sources, 4) == [0, 2, 4]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def wait_for_kernel(lab, timeout_s: float = 60):
    """Wait until the notebook's kernel is started, connected to the page and idle."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kernels = [s["kernel"] for s in lab.api("sessions") if s.get("kernel")]
        if any(k["execution_state"] == "idle" and k.get("connections", 0) > 0 for k in kernels):
            return
        time.sleep(0.25)
    pytest.fail(f"the lesson's kernel did not start within {timeout_s} s:\n{lab.log_tail()}", pytrace=False)


def run_cell(page, cell, count: int, deadline: float):
    """Run a cell as a learner would (click it, Ctrl+Enter) and wait until its prompt reads [count],
    the kernel's count for it; fail with the traceback if it errs."""
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+Enter")
    prompt = cell.locator(".jp-InputPrompt")
    while prompt.inner_text().strip() != f"[{count}]:":
        if time.monotonic() > deadline:
            pytest.fail(f"the cells the slider needs did not finish within {RUN_TIMEOUT_S} s "
                        f"(at the cell now showing {prompt.inner_text().strip()})", pytrace=False)
        page.wait_for_timeout(200)
    for text in cell.locator(".jp-OutputArea-output").all_inner_texts():
        if "Traceback" in text:
            pytest.fail(f"a cell of lesson 01 failed in JupyterLab:\n{text[-3000:]}", pytrace=False)


def test_the_t_slider_moves_and_the_picture_changes(jupyter_lab, page, artifacts):
    path = lesson01()
    if fashion_mnist.source("test") is None:
        pytest.skip("Fashion-MNIST not found, which lesson 01 loads: `course data` says where to put it")
    nb = json.loads(path.read_text())
    sources = [("".join(c["source"]) if c["cell_type"] == "code" else None) for c in nb["cells"]]
    target = next(i for i, s in enumerate(sources) if s and SLIDER_CALL in s)
    needed = cells_needed(sources, target)

    page.goto(jupyter_lab.url(path.name))
    cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    cells.first.wait_for(timeout=60_000)
    page.wait_for_function(f"document.querySelectorAll('.jp-NotebookPanel .jp-Cell').length == {len(sources)}",
                           timeout=30_000)
    wait_for_kernel(jupyter_lab)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for count, i in enumerate(needed, 1):                # a fresh kernel numbers them 1, 2, ...
        first_line = sources[i].strip().splitlines()[0]
        assert first_line in cells.nth(i).locator(".jp-InputArea-editor").inner_text(), f"cell {i} is not the notebook's"
        run_cell(page, cells.nth(i), count, deadline)
    cells.nth(target).locator(".jp-OutputArea-output .widget-hslider").wait_for(timeout=10_000)
    for i in [i for i, src in enumerate(sources) if src and SLIDER_CALL in src and i not in needed]:
        still = cells.nth(i).locator(".jp-OutputArea-output")  # a saved slider not run: its still, not an error
        assert "a still of the interactive viewer" in still.inner_text(), f"cell {i} shows no still of its slider"
        assert still.locator("img").count() == 1 and still.locator("img").bounding_box()["width"] > 100

    out = cells.nth(target).locator(".jp-OutputArea-output").first
    image, readout = out.locator("img.widget-image"), out.locator(".widget-readout")
    caption = out.locator(".widget-html-content")
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    out.scroll_into_view_if_needed()
    t_before = readout.inner_text().strip()
    assert f"t = {t_before}" in caption.inner_text()
    before = image.screenshot()
    out.screenshot(path=str(artifacts / "lesson01_lab_slider_before.png"))

    track = out.locator(".noUi-target").bounding_box()   # drag the handle to the right end: the noisiest t
    handle = out.locator(".noUi-handle").bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] + 20, handle["y"] + handle["height"] / 2, steps=12)
    page.mouse.up()

    page.wait_for_function("([el, t]) => el.innerText.trim() !== t", arg=[readout.element_handle(), t_before])
    t_after = readout.inner_text().strip()
    assert float(t_after) == float(out.locator(".noUi-handle").get_attribute("aria-valuemax")) > float(t_before)
    page.wait_for_function("([el, t]) => el.innerText.includes('t = ' + t)", arg=[caption.element_handle(), t_after])
    deadline, after = time.monotonic() + 10, before
    while after == before and time.monotonic() < deadline:   # the new PNG reaches the page just after the caption
        page.wait_for_timeout(100)
        after = image.screenshot()
    out.screenshot(path=str(artifacts / "lesson01_lab_slider_after.png"))
    page.screenshot(path=str(artifacts / "lesson01_lab.png"))

    a, b = pixels(before), pixels(after)
    assert a.shape == b.shape, "the picture changed size as the slider moved"
    changed = (np.abs(a - b).max(axis=2) > 8).mean()
    assert changed > 0.2, f"only {changed:.1%} of the picture's pixels changed from t = {t_before} to t = {t_after}"
