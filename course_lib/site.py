"""The course website: every lesson notebook exported to HTML, and an index page listing them.

  python -m course_lib.site [--notebooks notebooks] [--out site]

`make course` runs this after executing each lesson in place, so the pages show the outputs
of a full run. A lesson is a file named NN_topic.ipynb; its title is the first markdown
heading in the notebook (the file name when there is none). Nothing is executed here.
"""
from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path
from typing import NamedTuple

COURSE_TITLE = "Guided Diffusion, from DDPM to Latent Diffusion"
LESSON_FILE = re.compile(r"^(\d\d)_(\w+)\.ipynb$")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$")


class Lesson(NamedTuple):
    number: str     # "01"
    notebook: Path  # notebooks/01_forward_process.ipynb
    title: str      # from the notebook's first markdown heading
    page: str       # 01_forward_process.html, relative to the site folder


def find_lessons(folder: Path) -> list[Path]:
    """The lesson notebooks NN_topic.ipynb in `folder`, in lesson order."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and LESSON_FILE.match(p.name))


def title_of(nb, fallback: str) -> str:
    """The text of the first markdown heading (`# ...` to `###### ...`) in the notebook."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        in_code = False
        for line in cell.source.splitlines():
            if line.lstrip().startswith(("```", "~~~")):
                in_code = not in_code
            match = None if in_code else HEADING.match(line)
            if match:
                return match.group(1)
    return fallback


def fallback_title(path: Path) -> str:
    """"01_forward_process.ipynb" -> "Forward process"."""
    topic = LESSON_FILE.match(path.name).group(2).replace("_", " ")
    return topic[:1].upper() + topic[1:]


def read_lesson(path: Path) -> tuple[Lesson, object]:
    import nbformat
    nb = nbformat.read(path, as_version=4)
    number = LESSON_FILE.match(path.name).group(1)
    return Lesson(number, path, title_of(nb, fallback_title(path)), path.with_suffix(".html").name), nb


def export_html(nb, out_path: Path) -> None:
    """Write the notebook, with its stored outputs, as one HTML page (images embedded)."""
    from nbconvert import HTMLExporter
    body, _ = HTMLExporter().from_notebook_node(nb)
    out_path.write_text(body, encoding="utf-8")


def index_html(lessons: list[Lesson], title: str = COURSE_TITLE) -> str:
    """The index page: one link per lesson, in order."""
    items = "\n".join(
        f'    <li><a href="{html.escape(l.page, quote=True)}"><span class="n">{l.number}</span> '
        f"{html.escape(l.title)}</a></li>" for l in lessons)
    body = f"  <ol>\n{items}\n  </ol>" if lessons else "  <p>No lessons have been written yet.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{html.escape(title)}</title>
  <style>
    body {{ font-family: system-ui, sans-serif; max-width: 44rem; margin: 3rem auto; padding: 0 1rem; }}
    ol {{ list-style: none; padding: 0; }}
    li {{ margin: 0.6rem 0; font-size: 1.15rem; }}
    .n {{ display: inline-block; width: 2.2rem; color: #777; font-variant-numeric: tabular-nums; }}
  </style>
</head>
<body>
  <h1>{html.escape(title)}</h1>
{body}
</body>
</html>
"""


def build(notebooks: Path, out: Path) -> list[Lesson]:
    """Export every lesson in `notebooks` to `out`/NN_topic.html and write `out`/index.html."""
    out.mkdir(parents=True, exist_ok=True)
    lessons = []
    for path in find_lessons(notebooks):
        lesson, nb = read_lesson(path)
        export_html(nb, out / lesson.page)
        lessons.append(lesson)
        print(f"{path} -> {out / lesson.page}  ({lesson.title})")
    (out / "index.html").write_text(index_html(lessons), encoding="utf-8")
    print(f"{out / 'index.html'}: {len(lessons)} lesson(s)")
    return lessons


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.site", description=__doc__.split("\n")[0])
    parser.add_argument("--notebooks", default="notebooks", help="folder holding NN_topic.ipynb")
    parser.add_argument("--out", default="site", help="folder to write the HTML pages into")
    args = parser.parse_args(argv)
    notebooks = Path(args.notebooks)
    if not notebooks.is_dir():
        print(f"course_lib.site: no folder {notebooks}", file=sys.stderr)
        return 2
    build(notebooks, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
