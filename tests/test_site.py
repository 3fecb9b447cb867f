"""The course website builder: lessons found in order, titles from the first markdown heading,
one HTML page per lesson and an index linking them. Notebooks are written here, never executed."""
import nbformat
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
