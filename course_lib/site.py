"""The course website: every lesson notebook exported to HTML, and an index page listing them.

  python -m course_lib.site [--notebooks notebooks] [--out site]      (or: course run, which executes first)

A lesson is a file named NN_topic.ipynb; its title is the first markdown heading in the notebook
(the file name when there is none). Nothing is executed here: the pages show the stored outputs.

Offline by construction: the math in markdown cells ($...$ inline, $$...$$ display) is converted
to MathML at build time (latex2mathml), which browsers render natively, and the page loads no
MathJax. A formula latex2mathml cannot read is shown as its LaTeX source in a red-bordered
<code class="math-error">, never dropped. Code cells, code spans and fenced code are left as they
are, and an escaped dollar (\\$) stays a dollar.

The index lists each lesson with its title, its first figure (site/figures/NN_topic.png), its run
time and its status. The run time is the one `course run` recorded (metadata "course"), else the
sum of the cells' recorded execution times (nbclient's timing metadata), else "not recorded".
"""
from __future__ import annotations

import argparse
import base64
import html
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

COURSE_TITLE = "Guided Diffusion, from DDPM to Latent Diffusion"
LESSON_FILE = re.compile(r"^(\d\d)_(\w+)\.ipynb$")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$")
FIGURE_TYPES = (("image/png", ".png"), ("image/jpeg", ".jpg"))


class Lesson(NamedTuple):
    number: str                   # "01"
    notebook: Path                # notebooks/01_forward_process.ipynb
    title: str                    # from the notebook's first markdown heading
    page: str                     # 01_forward_process.html, relative to the site folder
    figure: str | None = None     # figures/01_forward_process.png (the first image output), or None
    seconds: float | None = None  # run time: `course run`'s record, else the sum of the cells' times
    status: str = "not executed"  # "executed", "executed (quick)", "error", "partly executed", "not executed"
    math_errors: int = 0          # formulas latex2mathml could not convert (shown as LaTeX source)


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


def read_lesson(path: Path, nb=None) -> tuple[Lesson, object]:
    """The lesson of a notebook file (read from `path` unless its node `nb` is given)."""
    import nbformat
    nb = nbformat.read(path, as_version=4) if nb is None else nb
    number = LESSON_FILE.match(path.name).group(1)
    seconds, status = run_record(nb)
    return Lesson(number, path, title_of(nb, fallback_title(path)), path.with_suffix(".html").name,
                  seconds=seconds, status=status), nb


# ---------------------------------------------------------------------- run time and status

def _timestamp(text) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def cell_seconds(cell) -> float | None:
    """A code cell's recorded execution time (nbclient: iopub.execute_input to shell.execute_reply)."""
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = _timestamp(timing.get("iopub.execute_input")), _timestamp(timing.get("shell.execute_reply"))
    return None if start is None or end is None else max(0.0, (end - start).total_seconds())


def run_record(nb) -> tuple[float | None, str]:
    """(seconds, status) of a notebook's last run, from what it stores."""
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    if any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])):
        status = "error"
    else:
        ran = sum(c.get("execution_count") is not None for c in code)
        status = "executed" if code and ran == len(code) else ("partly executed" if ran else "not executed")
    record = nb.metadata.get("course", {})
    if "seconds" in record:
        quick = " (quick)" if record.get("quick") and status == "executed" else ""
        return float(record["seconds"]), record.get("status", status) + quick
    times = [cell_seconds(c) for c in code]
    return (round(sum(times), 1) if times and None not in times else None), status


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "run time not recorded"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------------- math to MathML

class MathSpan(NamedTuple):
    start: int      # index of the opening $ in the markdown source
    end: int        # index just past the closing $
    tex: str        # the LaTeX between the dollars
    display: bool   # $$...$$


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _fenced_ranges(text: str) -> list[tuple[int, int]]:
    """(start, end) character ranges of fenced code blocks (``` or ~~~), to be left alone."""
    ranges, pos, open_at, fence = [], 0, None, ""
    for line in text.splitlines(keepends=True):
        m = _FENCE.match(line)
        if open_at is None and m:
            open_at, fence = pos, m.group(1)
        elif open_at is not None and m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
            ranges.append((open_at, pos + len(line)))
            open_at = None
        pos += len(line)
    if open_at is not None:
        ranges.append((open_at, len(text)))   # an unclosed fence runs to the end (CommonMark)
    return ranges


def _closing_inline(text: str, i: int) -> int:
    """The index of the $ closing an inline formula opened at i, or -1 (pandoc's rules: no space after
    the opening $, none before the closing one, no digit right after it, no blank line inside)."""
    if i + 1 >= len(text) or text[i + 1].isspace():
        return -1
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "\n" and text[j + 1:j + 2] == "\n":
            return -1
        if c == "$":
            if text[j - 1].isspace() or text[j + 1:j + 2].isdigit():
                return -1
            return j
        j += 1
    return -1


def _closing_display(text: str, i: int) -> int:
    """The index of the $$ closing a display formula opened at i, or -1."""
    j = i + 2
    while j < len(text) - 1:
        if text[j] == "\\":
            j += 2
            continue
        if text.startswith("$$", j):
            return j
        j += 1
    return -1


def find_math(text: str) -> list[MathSpan]:
    """The $...$ and $$...$$ formulas of a markdown source, skipping fenced code, code spans and
    escaped dollars (\\$)."""
    fenced = _fenced_ranges(text)
    spans, i = [], 0
    while i < len(text):
        block = next((r for r in fenced if r[0] <= i < r[1]), None)
        if block:
            i = block[1]
            continue
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "`":
            run = len(text[i:]) - len(text[i:].lstrip("`"))
            close = text.find("`" * run, i + run)
            while close != -1 and text[close + run:close + run + 1] == "`":   # a longer run does not close it
                close = text.find("`" * run, close + run + 1)
            i = i + run if close == -1 else close + run
            continue
        if c == "$":
            display = text.startswith("$$", i)
            j = _closing_display(text, i) if display else _closing_inline(text, i)
            if j != -1:
                width = 2 if display else 1
                spans.append(MathSpan(i, j + width, text[i + width:j], display))
                i = j + width
                continue
        i += 1
    return spans


def _unconverted(mathml: str) -> bool:
    """latex2mathml passes some things through instead of failing: an unknown command as
    <mi>\\foo</mi>, an alignment & as a raw character."""
    return bool(re.search(r">\\[A-Za-z]+<|>&<", mathml))


def tex_to_mathml(tex: str, display: bool) -> tuple[str, bool]:
    """(HTML, ok): a <math> element, or, when latex2mathml cannot read the formula, its source in a
    visible <code class="math-error"> (ok False)."""
    from latex2mathml.converter import convert
    try:
        mathml = convert(tex.strip(), display="block" if display else "inline")
        if not _unconverted(mathml):
            return mathml, True
        reason = "a command or environment latex2mathml does not know"
    except Exception as e:   # latex2mathml raises many kinds (unbalanced braces, missing arguments, ...)
        reason = f"{type(e).__name__}: {e}".rstrip(": ")
    dollars = "$$" if display else "$"
    source = html.escape(f"{dollars}{tex}{dollars}")
    return (f'<code class="math-error" title="{html.escape("not converted to MathML: " + reason, quote=True)}">'
            f"{source}</code>"), False


def _placeholder(k: int) -> str:
    return f"CourseMathPlaceholder{k}X"   # letters and digits only: markdown leaves it as it is


def math_to_placeholders(nb) -> tuple[object, list[tuple[str, str]], int]:
    """A copy of `nb` whose markdown cells hold placeholders instead of formulas; the list of
    (placeholder, HTML) to put back into the exported page; and the number of formulas not converted."""
    import copy
    nb = copy.deepcopy(nb)
    found, errors = [], 0
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        text, parts, last = cell.source, [], 0
        for span in find_math(text):
            key = _placeholder(len(found))
            mathml, ok = tex_to_mathml(span.tex, span.display)
            errors += not ok
            found.append((key, mathml))
            parts += [text[last:span.start], key]
            last = span.end
        cell.source = "".join(parts) + text[last:]
    return nb, found, errors


_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)
MATH_CSS = """<style>
  math[display="block"] { display: block; margin: 0.8em 0; overflow-x: auto; }
  code.math-error { border: 1px solid #b42318; color: #b42318; padding: 0 0.2em; }
</style>
"""


def _put_back(body: str, formulas: list[tuple[str, str]]) -> str:
    """The exported page with each placeholder replaced by its MathML in text, and by nothing inside a
    tag (a heading's anchor id and link carry the heading's text)."""
    if not formulas:
        return body
    html_of = dict(formulas)
    key = re.compile(r"CourseMathPlaceholder\d+X")
    parts = re.split(r"(<[^>]*>)", body)
    for i, part in enumerate(parts):
        inside_tag = part.startswith("<")
        parts[i] = key.sub(lambda m: "" if inside_tag else html_of.get(m.group(0), m.group(0)), part)
    return "".join(parts)


def inline_html(text: str) -> str:
    """Text for the index (a lesson's title): HTML-escaped, its $...$ formulas as MathML."""
    parts, last = [], 0
    for span in find_math(text):
        parts += [html.escape(text[last:span.start]), tex_to_mathml(span.tex, span.display)[0]]
        last = span.end
    return "".join(parts) + html.escape(text[last:])


def export_html(nb, out_path: Path) -> int:
    """Write the notebook, with its stored outputs, as one HTML page (images embedded, math as
    MathML, no MathJax). Returns the number of formulas left as LaTeX source."""
    from nbconvert import HTMLExporter
    nb, formulas, errors = math_to_placeholders(nb)
    body, _ = HTMLExporter().from_notebook_node(nb)
    body = _MATHJAX.sub("", body).replace("</head>", MATH_CSS + "</head>", 1)
    out_path.write_text(_put_back(body, formulas), encoding="utf-8")
    return errors


# ---------------------------------------------------------------------- figures and the index

def first_figure(nb) -> tuple[bytes, str] | None:
    """(bytes, suffix) of the first PNG or JPEG output of the notebook, or None."""
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = output.get("data", {})
            for mime, suffix in FIGURE_TYPES:
                if mime in data:
                    payload = data[mime]
                    payload = "".join(payload) if isinstance(payload, list) else payload
                    return base64.b64decode(payload), suffix
    return None


def index_html(lessons: list[Lesson], title: str = COURSE_TITLE) -> str:
    """The index page: one entry per lesson, in order, with its figure, run time and status."""
    items = []
    for l in lessons:
        page = html.escape(l.page, quote=True)
        figure = (f'<a href="{page}"><img src="{html.escape(l.figure, quote=True)}" alt="first figure of lesson '
                  f'{l.number}"></a>' if l.figure else '<span class="nofig">no figure</span>')
        status = html.escape(l.status)
        math = f" · {l.math_errors} formula(s) left as LaTeX" if l.math_errors else ""
        items.append(f'    <li class="lesson">{figure}<div><a href="{page}"><span class="n">{l.number}</span> '
                     f'{inline_html(l.title)}</a><div class="meta"><span class="status {status.split()[0]}">'
                     f'{status}</span> · {html.escape(format_seconds(l.seconds))}{html.escape(math)}</div></div></li>')
    body = ("  <ol>\n" + "\n".join(items) + "\n  </ol>") if lessons else "  <p>No lessons have been written yet.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{html.escape(title)}</title>
  <style>
    body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 3rem auto; padding: 0 1rem; }}
    ol {{ list-style: none; padding: 0; }}
    li.lesson {{ display: flex; gap: 1rem; align-items: center; margin: 1rem 0; font-size: 1.15rem; }}
    li.lesson img {{ width: 11rem; height: 7rem; object-fit: contain; border: 1px solid #ddd; background: #fff; }}
    .nofig {{ display: inline-block; width: 11rem; color: #999; font-size: 0.9rem; text-align: center; }}
    .n {{ display: inline-block; width: 2.2rem; color: #777; font-variant-numeric: tabular-nums; }}
    .meta {{ font-size: 0.9rem; color: #555; margin-top: 0.3rem; }}
    .status.error {{ color: #b42318; font-weight: bold; }}
    .status.executed {{ color: #1a7f37; }}
  </style>
</head>
<body>
  <h1>{html.escape(title)}</h1>
{body}
</body>
</html>
"""


def build(notebooks: Path, out: Path, executed: dict | None = None) -> list[Lesson]:
    """Export every lesson in `notebooks` to `out`/NN_topic.html, its first figure to
    `out`/figures/, and write `out`/index.html. `executed` maps a notebook's path to a freshly
    executed node to render instead of the file (what `course run --quick` does)."""
    out.mkdir(parents=True, exist_ok=True)
    executed = {Path(k).resolve(): v for k, v in (executed or {}).items()}
    lessons = []
    for path in find_lessons(notebooks):
        lesson, nb = read_lesson(path, executed.get(path.resolve()))
        figure = first_figure(nb)
        if figure is not None:
            (out / "figures").mkdir(exist_ok=True)
            name = f"figures/{path.stem}{figure[1]}"
            (out / name).write_bytes(figure[0])
            lesson = lesson._replace(figure=name)
        lesson = lesson._replace(math_errors=export_html(nb, out / lesson.page))
        lessons.append(lesson)
        note = f", {lesson.math_errors} formula(s) left as LaTeX" if lesson.math_errors else ""
        print(f"{path} -> {out / lesson.page}  ({lesson.title}; {lesson.status}{note})")
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
