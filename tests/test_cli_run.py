"""`course run`: lesson names resolved, lessons executed in order with COURSE_QUICK set or unset,
outputs kept in place in full mode only, the site built. Notebooks are tiny ones written here; the
executor is replaced, except in one test that runs a two-cell notebook in a real kernel."""
import os

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from course_lib import cli


@pytest.fixture
def lessons(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in ("01_forward_process", "02_ddpm", "03_ddim", "05_classifier_free_guidance",
                 "04_classifier_guidance"):
        nbformat.write(new_notebook(cells=[new_markdown_cell(f"# {name}"), new_code_cell("x = 1")]),
                       folder / f"{name}.ipynb")
    (folder / "scratch.ipynb").write_text("{}")
    return folder


def stems(paths):
    return [p.stem for p in paths]


@pytest.mark.parametrize("names, expected", [
    ([], ["01_forward_process", "02_ddpm", "03_ddim", "04_classifier_guidance", "05_classifier_free_guidance"]),
    (["3", "01"], ["01_forward_process", "03_ddim"]),                    # numbers, run in lesson order
    (["ddim", "03_ddim", "03_ddim.ipynb"], ["03_ddim"]),                  # topic, stem, file: once
    (["notebooks/02_ddpm.ipynb"], ["02_ddpm"]),
    (["classifier_f"], ["05_classifier_free_guidance"]),                 # a unique prefix of a topic
    (["ddpm"], ["02_ddpm"]),                                             # exact beats prefix
])
def test_lesson_names_resolve(lessons, names, expected):
    assert stems(cli.resolve_lessons(names, lessons)) == expected


@pytest.mark.parametrize("name, message", [("classifier", "matches 2"), ("latent", "matches none"), ("7", "matches none")])
def test_unknown_or_ambiguous_lesson_exits_2(lessons, name, message, capsys, monkeypatch):
    monkeypatch.setattr(cli, "execute_notebook", lambda *a, **k: pytest.fail("nothing may run"))
    assert cli.main(["run", name, "--notebooks", str(lessons), "--out", str(lessons.parent / "site")]) == 2
    err = capsys.readouterr().err
    assert message in err and "lessons: 01_forward_process, 02_ddpm" in err


def test_bad_arguments(lessons, tmp_path, capsys):
    assert cli.main(["run", "--notebooks", str(tmp_path / "nope")]) == 2
    assert cli.main(["run", "--notebooks", str(lessons), "--timeout", "0"]) == 2
    assert "no folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--quick=yes"])
    assert info.value.code == 2


def fake_executor(calls, fail=()):
    def execute(nb, cwd, timeout, on_cell=None):
        calls.append((nb.cells[0].source, os.environ.get("COURSE_QUICK"), timeout))
        for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
            cell.execution_count = i + 1
            cell.outputs = [new_output("stream", name="stdout", text=f"ran quick={os.environ.get('COURSE_QUICK')}\n")]
            on_cell()
        if nb.cells[0].source.lstrip("# ") in fail:
            nb.cells[-1].outputs = [new_output("error", ename="RuntimeError", evalue="boom", traceback=["RuntimeError: boom"])]
            raise RuntimeError("cell failed: boom")
    return execute


def test_quick_runs_in_order_and_leaves_notebooks_alone(lessons, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "execute_notebook", fake_executor(calls))
    monkeypatch.delenv("COURSE_QUICK", raising=False)
    before = (lessons / "03_ddim.ipynb").read_text()
    site = lessons.parent / "site"
    assert cli.main(["run", "ddim", "1", "--quick", "--notebooks", str(lessons), "--out", str(site)]) == 0
    assert calls == [("# 01_forward_process", "1", 7200), ("# 03_ddim", "1", 7200)]
    assert "COURSE_QUICK" not in os.environ                         # the kernels' environment only
    assert (lessons / "03_ddim.ipynb").read_text() == before         # quick outputs never replace full ones
    page = (site / "03_ddim.html").read_text(encoding="utf-8")
    assert "ran quick=1" in page and "executed (quick)" in (site / "index.html").read_text(encoding="utf-8")
    assert sorted(p.name for p in site.glob("*.html"))[:2] == ["01_forward_process.html", "02_ddpm.html"]


def test_full_run_keeps_outputs_in_place_and_a_failure_keeps_the_last_good_ones(lessons, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "execute_notebook", fake_executor(calls, fail=("03_ddim",)))
    monkeypatch.setenv("COURSE_QUICK", "1")                         # unset for the kernels of a full run
    before = (lessons / "03_ddim.ipynb").read_text()
    site = lessons.parent / "site"
    assert cli.main(["run", "1", "3", "4", "--timeout", "60", "--notebooks", str(lessons), "--out", str(site)]) == 1
    assert calls == [("# 01_forward_process", None, 60), ("# 03_ddim", None, 60)]   # stops at the failure
    assert os.environ["COURSE_QUICK"] == "1"
    nb = nbformat.read(lessons / "01_forward_process.ipynb", as_version=4)
    assert nb.cells[1].outputs[0].text == "ran quick=None\n"
    assert nb.metadata.course["status"] == "executed" and nb.metadata.course["quick"] is False
    assert (lessons / "03_ddim.ipynb").read_text() == before
    index = (site / "index.html").read_text(encoding="utf-8")
    assert ">error<" in index and "boom" in (site / "03_ddim.html").read_text(encoding="utf-8")
    err = capsys.readouterr().err
    assert "1 lesson(s) failed: 03_ddim" in err and "cell failed: boom" in err


def test_keep_going_runs_the_rest(lessons, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "execute_notebook", fake_executor(calls, fail=("01_forward_process",)))
    assert cli.main(["run", "1", "2", "--quick", "--keep-going", "--notebooks", str(lessons),
                     "--out", str(lessons.parent / "site")]) == 1
    assert [c[0] for c in calls] == ["# 01_forward_process", "# 02_ddpm"]


@pytest.mark.slow
def test_a_real_kernel_runs_a_tiny_lesson(tmp_path, capsys):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nbformat.write(new_notebook(cells=[
        new_markdown_cell("# A tiny lesson with $x^2$"),
        new_code_cell("import os; print('quick', os.environ.get('COURSE_QUICK'), 'cwd', os.path.basename(os.getcwd()))")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}),
        folder / "01_tiny.ipynb")
    assert cli.main(["run", "--quick", "--timeout", "120", "--notebooks", str(folder), "--out", str(tmp_path / "site")]) == 0
    page = (tmp_path / "site" / "01_tiny.html").read_text(encoding="utf-8")
    assert "quick 1 cwd notebooks" in page and "<math" in page
