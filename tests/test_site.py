"""The course website builder: lessons found in order, titles from the first markdown heading,
one HTML page per lesson and an index linking them, math as MathML. Notebooks are written here, never executed."""
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from course_lib import site


def write_notebook(path, cells):
    nbformat.write(new_notebook(cells=cells), path)


def make_course(folder):
    folder.mkdir()
    write_notebook(folder / "02_ddpm.ipynb", [
        new_code_cell("x = 1"),
        new_markdown_cell("Some text first.\n\n```python\n# not a heading, inside code\n```\n\n## 02 · DDPM & L_simple"),
        new_code_cell("print('hello')", outputs=[new_output("stream", name="stdout", text="hello\n")]),
    ])
    write_notebook(folder / "01_forward_process.ipynb", [
        new_markdown_cell("# The forward process q(x_t | x_0)\n\nmore"),
        new_markdown_cell("# A later heading"),
    ])
    write_notebook(folder / "scratch.ipynb", [new_markdown_cell("# Not a lesson")])
    (folder / "03_notes.txt").write_text("not a notebook")


def test_build_writes_pages_and_index_in_lesson_order(tmp_path):
    make_course(tmp_path / "notebooks")
    lessons = site.build(tmp_path / "notebooks", tmp_path / "site")

    assert [l.number for l in lessons] == ["01", "02"]
    assert [l.title for l in lessons] == ["The forward process q(x_t | x_0)", "02 · DDPM & L_simple"]
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    first, second = index.index('href="01_forward_process.html"'), index.index('href="02_ddpm.html"')
    assert first < second
    assert "02 · DDPM &amp; L_simple" in index  # titles are HTML-escaped
    assert "Not a lesson" not in index
    page = (tmp_path / "site" / "02_ddpm.html").read_text(encoding="utf-8")
    assert "hello" in page and "<html" in page.lower()  # stored outputs are kept
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == [
        "01_forward_process.html", "02_ddpm.html", "index.html"]


def test_title_falls_back_to_the_file_name():
    nb = new_notebook(cells=[new_markdown_cell("no heading here"), new_code_cell("# a comment, not a heading")])
    path = site.Path("notebooks/05_classifier_free_guidance.ipynb")
    assert site.title_of(nb, site.fallback_title(path)) == "Classifier free guidance"


def test_empty_folder_gives_an_index_that_says_so(tmp_path):
    (tmp_path / "notebooks").mkdir()
    assert site.main(["--notebooks", str(tmp_path / "notebooks"), "--out", str(tmp_path / "site")]) == 0
    assert "No lessons" in (tmp_path / "site" / "index.html").read_text(encoding="utf-8")


def test_missing_folder_is_an_error(tmp_path, capsys):
    assert site.main(["--notebooks", str(tmp_path / "nope"), "--out", str(tmp_path / "site")]) == 2
    assert "no folder" in capsys.readouterr().err


# ---------------------------------------------------------------------- math, offline

MATH_MD = r"""# The posterior $q(x_{t-1} \mid x_t, x_0)$

Inline $\bar\alpha_t = \prod_{s=1}^t \alpha_s$ and a price: costs \$5, or $5 and $10 (not math).

$$
\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t} x_0
$$

Code keeps its dollars: `echo $HOME` and ``a $b$ c``.

```text
echo "$x" $$ $y$
```

Broken: $\frac{1}{$ stays visible."""


def math_notebook(path):
    write_notebook(path, [new_markdown_cell(MATH_MD),
                          new_code_cell("price = '$3 and $4'  # $x$ in a code cell")])


def test_find_math_skips_code_and_escapes():
    spans = site.find_math(MATH_MD)
    tex = [(s.tex.strip(), s.display) for s in spans]
    assert tex == [(r"q(x_{t-1} \mid x_t, x_0)", False), (r"\bar\alpha_t = \prod_{s=1}^t \alpha_s", False),
                   (r"\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t} x_0", True),
                   (r"\frac{1}{", False)]


def test_page_has_mathml_no_mathjax_and_a_visible_fallback(tmp_path, capsys):
    (tmp_path / "nb").mkdir()
    math_notebook(tmp_path / "nb" / "01_math.ipynb")
    (lesson,) = site.build(tmp_path / "nb", tmp_path / "site")
    page = (tmp_path / "site" / "01_math.html").read_text(encoding="utf-8")
    assert "mathjax" not in page.lower() and "$$" not in page.split("<pre")[0]
    assert page.count('MathML" display="inline"') == 2 and page.count('MathML" display="block"') == 1   # heading, inline; display
    assert "<msubsup>" in page and "<mfrac>" in page
    assert "costs $5, or $5 and $10" in page                     # escaped and non-math dollars are text
    assert "$HOME" in page and "a $b$ c" in page and "$$ $y$" in page   # code spans and fences untouched
    assert "$3 and $4" in page and "$x$ in a code cell" in page   # code cells untouched
    assert 'class="math-error"' in page and r"$\frac{1}{$" in page   # shown as its source, not dropped
    assert lesson.math_errors == 1 and "1 formula(s) left as LaTeX" in capsys.readouterr().out
    assert "CourseMathPlaceholder" not in page                    # none left, not even in the heading's anchor
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "<math" in index and "$" not in index                  # the title's formula is MathML too


def test_unknown_command_falls_back_instead_of_printing_backslashes():
    html, ok = site.tex_to_mathml(r"\notacommand{x}", display=False)
    assert not ok and "math-error" in html and r"\notacommand{x}" in html
    html, ok = site.tex_to_mathml(r"x^2", display=True)
    assert ok and html.startswith("<math") and 'display="block"' in html


# ---------------------------------------------------------------------- index: figure, run time, status

def test_index_records_figure_time_and_status(tmp_path):
    import base64
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
    ran = new_code_cell("plot()", execution_count=1, outputs=[
        new_output("display_data", data={"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"})])
    ran.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00.000Z",
                                 "shell.execute_reply": "2026-01-01T00:01:30.500Z"}
    failed = new_code_cell("1/0", execution_count=1, outputs=[new_output("error", ename="ZeroDivisionError",
                                                                         evalue="division by zero", traceback=[])])
    (tmp_path / "nb").mkdir()
    write_notebook(tmp_path / "nb" / "01_a.ipynb", [new_markdown_cell("# A"), ran])
    write_notebook(tmp_path / "nb" / "02_b.ipynb", [new_markdown_cell("# B"), failed])
    write_notebook(tmp_path / "nb" / "03_c.ipynb", [new_markdown_cell("# C"), new_code_cell("x = 1")])
    a, b, c = site.build(tmp_path / "nb", tmp_path / "site")
    assert (a.figure, a.seconds, a.status) == ("figures/01_a.png", 90.5, "executed")
    assert (tmp_path / "site" / a.figure).read_bytes() == png
    assert (b.figure, b.status) == (None, "error") and c.status == "not executed" and c.seconds is None
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert 'src="figures/01_a.png"' in index and "1.5 min" in index and "no figure" in index
    assert ">error<" in index and "run time not recorded" in index


def test_run_record_from_course_run_metadata():
    nb = new_notebook(cells=[new_code_cell("x = 1", execution_count=1)])
    nb.metadata["course"] = {"seconds": 12.0, "status": "executed", "quick": True}
    assert site.run_record(nb) == (12.0, "executed (quick)")


def committed_notebooks(folder):
    """A copy of the lessons git tracks (a notebook being written and not yet added is left out);
    all of notebooks/ outside a git checkout."""
    import shutil
    import subprocess
    repo = Path(__file__).resolve().parents[1]
    try:
        tracked = subprocess.run(["git", "ls-files", "notebooks"], cwd=repo, capture_output=True, text=True,
                                 check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        tracked = [str(p.relative_to(repo)) for p in (repo / "notebooks").glob("*.ipynb")]
    folder.mkdir()
    for name in tracked:
        if name.endswith(".ipynb") and (repo / name).is_file():
            shutil.copy(repo / name, folder / Path(name).name)
    return folder


@pytest.mark.slow
def test_site_from_the_committed_notebooks(tmp_path):
    """The real lessons, not executed: every index link and figure resolves, every lesson has its
    figure, no page loads MathJax and every formula became MathML."""
    notebooks = committed_notebooks(tmp_path / "notebooks")
    paths = site.find_lessons(notebooks)
    if not paths:
        pytest.skip("no lesson notebooks committed yet")
    lessons = site.build(notebooks, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    links = re.findall(r'(?:href|src)="([^"]+)"', index)
    assert links and all((tmp_path / "site" / link).is_file() for link in links), links
    assert [l.page for l in lessons] == [p.with_suffix(".html").name for p in paths]
    for lesson in lessons:
        assert f'href="{lesson.page}"' in index
        assert lesson.figure is not None, f"lesson {lesson.number} has no image output"
        assert f'src="{lesson.figure}"' in index
        page = (tmp_path / "site" / lesson.page).read_text(encoding="utf-8")
        assert "mathjax" not in page.lower() and "<math" in page, lesson.page
        assert lesson.math_errors == 0, f"{lesson.page}: {lesson.math_errors} formula(s) latex2mathml cannot read"
