"""Fixtures of the real-browser tests (pytest -m browser): Debian's Chromium driven by Python
Playwright (its executable_path: Playwright's own browser download is never used), and a
JupyterLab server on 127.0.0.1 with a token, a free port and every Jupyter folder (config, data,
runtime, settings, workspaces, IPython, matplotlib) in a temporary directory, serving a copy of
the lessons so nothing is saved into the repository.

Without playwright or Chromium the tests are skipped with the reason; with COURSE_BROWSER_REQUIRED=1
(set by .ci/run) they fail instead, so CI cannot pass without running them. Screenshots go to
.ci/artifacts/ (ignored by git). The Chromium used: $COURSE_CHROMIUM, else `chromium` or
`chromium-browser` on PATH (Debian: apt-get install chromium).
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".ci" / "artifacts"
LAB_START_TIMEOUT_S = 60


def skip_or_fail(reason: str):
    """Skip with the reason, or fail where the browser tests must run (COURSE_BROWSER_REQUIRED=1)."""
    if os.environ.get("COURSE_BROWSER_REQUIRED") == "1":
        pytest.fail(f"{reason} (COURSE_BROWSER_REQUIRED=1: the browser tests must run here)", pytrace=False)
    pytest.skip(reason)


def find_chromium() -> str | None:
    named = os.environ.get("COURSE_CHROMIUM")
    if named:
        return named if Path(named).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, launched once per test file and closed after it (so nothing of it outlives
    tests/browser when the whole suite runs)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install playwright; it is in the dev extra)")
    chromium = find_chromium()
    if chromium is None:
        skip_or_fail("no Chromium found: apt-get install chromium, or set COURSE_CHROMIUM=/path/to/chromium "
                     "(Playwright's own browser download is not used)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh page at a fixed window size, closed after the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_settings(settings: Path):
    """JupyterLab user settings: every cell in the page (no windowing, so cells are found by index),
    no autosave, no news or update checks."""
    values = {
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }
    for name, value in values.items():
        path = settings / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


class Lab:
    """A running JupyterLab: url(path) opens `path` (relative to `root`) with the token."""

    def __init__(self, proc, port: int, token: str, root: Path, log: Path):
        self.proc, self.port, self.token, self.root, self.log = proc, port, token, root, log

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/lab/tree/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.base}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


def _wait_until_up(lab: Lab):
    deadline = time.monotonic() + LAB_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if lab.proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {lab.proc.returncode} while starting:\n{lab.log_tail()}")
        try:
            lab.api("status")
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer on port {lab.port} within {LAB_START_TIMEOUT_S} s:\n{lab.log_tail()}")


def _stop(lab: Lab):
    """Shut the kernels and the server down through the API, then terminate, then kill."""
    if lab.proc.poll() is None:
        try:
            for kernel in lab.api("kernels"):
                lab.api(f"kernels/{kernel['id']}", method="DELETE")
            lab.api("shutdown", method="POST")
            lab.proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if lab.proc.poll() is not None:
            break
        lab.proc.send_signal(sig)
        try:
            lab.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def jupyter_lab(browser, tmp_path_factory):
    """JupyterLab serving a temporary copy of notebooks/ (kernels in quick mode, this venv's Python),
    stopped after the test file whatever happens."""
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists() or subprocess.run([str(jupyter), "lab", "--version"], capture_output=True).returncode:
        pytest.skip(f"JupyterLab is not installed next to {sys.executable} (pip install jupyterlab)")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    root.mkdir()
    for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        shutil.copy(nb, root / nb.name)
    dirs = {name: tmp / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython", "mpl")}
    for d in dirs.values():
        d.mkdir()
    lab_settings(dirs["settings"])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # tests/kernels/conftest.py sets it
    env.update(JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
               JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
               JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), IPYTHONDIR=str(dirs["ipython"]),
               MPLCONFIGDIR=str(dirs["mpl"]), JUPYTER_PREFER_ENV_PATH="1", COURSE_QUICK="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    port, token, log = free_port(), secrets.token_hex(16), tmp / "jupyterlab.log"
    cmd = [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:                                # CI runs as root; Jupyter refuses that unless told
        cmd.append("--allow-root")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    lab = Lab(proc, port, token, root, log)
    try:
        _wait_until_up(lab)
        yield lab
    finally:
        _stop(lab)
