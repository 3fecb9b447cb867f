"""The rendered site's page of lesson 01 (course_lib.site) in headless Chromium, offline: every
http(s) request is refused, as for a learner without a network. The formulas must be typeset:
MathML elements that the browser lays out (nonzero size; a subscript set lower and smaller than
its base; a fraction's numerator above its denominator), with no LaTeX source ($$, $\\...) left
in the visible text of the prose. Screenshots: .ci/artifacts/site_lesson01*.png."""
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from course_lib import site

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
LATEX_LEFT = re.compile(r"\$\$|\$[^$\n]*\\[A-Za-z]+|\\(frac|sqrt|bar|alpha|beta|mathcal|qquad)\b")

LAYOUT = """() => {
  const box = el => el.getBoundingClientRect();
  const size = el => parseFloat(getComputedStyle(el).fontSize);
  const maths = [...document.querySelectorAll('math')];
  const sub = document.querySelector('msub'), frac = document.querySelector('mfrac');
  return {
    count: maths.length,
    block: maths.filter(m => m.getAttribute('display') === 'block').length,
    mathml: maths.filter(m => m instanceof MathMLElement).length,
    sized: maths.filter(m => box(m).width > 0 && box(m).height > 0).length,
    errors: document.querySelectorAll('code.math-error').length,
    sub_lower: sub ? box(sub.children[1]).bottom > box(sub.children[0]).bottom : null,
    sub_smaller: sub ? size(sub.children[1]) < size(sub.children[0]) : null,
    frac_stacked: frac ? box(frac.children[0]).bottom <= box(frac.children[1]).top + 1 : null,
    prose: [...document.querySelectorAll('.jp-MarkdownCell')].map(c => c.innerText).join('\\n'),
  };
}"""


@pytest.fixture(scope="module")
def lesson01_page(tmp_path_factory) -> Path:
    """site/01_*.html built by `python -m course_lib.site` from the committed lesson 01 alone."""
    found = sorted((ROOT / "notebooks").glob("01_*.ipynb"))
    if not found:
        pytest.skip("no notebooks/01_*.ipynb")
    tmp = tmp_path_factory.mktemp("site")
    (tmp / "notebooks").mkdir()
    shutil.copy(found[0], tmp / "notebooks" / found[0].name)
    assert site.main(["--notebooks", str(tmp / "notebooks"), "--out", str(tmp / "site")]) == 0
    page = tmp / "site" / found[0].with_suffix(".html").name
    assert page.exists()
    return page


def test_lesson01_page_shows_typeset_math_offline(browser, lesson01_page, artifacts):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    refused = []

    def offline(route):
        url = route.request.url
        if url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            refused.append(url)
            route.abort()
    try:
        page = context.new_page()
        page.route("**/*", offline)
        page.goto(lesson01_page.as_uri(), wait_until="load")
        page.screenshot(path=str(artifacts / "site_lesson01.png"))
        first_display = page.locator("math[display='block']").first
        first_display.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "site_lesson01_math.png"))
        formula = np.asarray(Image.open(io.BytesIO(first_display.screenshot())).convert("L"))
        layout = page.evaluate(LAYOUT)
    finally:
        context.close()

    assert layout["count"] > 20 and layout["block"] > 0, f"too few formulas on the page: {layout['count']}"
    assert layout["mathml"] == layout["count"], "the browser does not treat <math> as MathML"
    assert layout["sized"] == layout["count"], f"{layout['count'] - layout['sized']} formulas have no size"
    assert layout["errors"] == 0, f"{layout['errors']} formulas were left as LaTeX (code.math-error)"
    assert layout["sub_lower"] and layout["sub_smaller"], "subscripts are not set as subscripts"
    assert layout["frac_stacked"], "a fraction's numerator is not above its denominator"
    left = sorted(set(m.group(0) for m in LATEX_LEFT.finditer(layout["prose"])))
    assert not left, f"LaTeX source visible in the prose: {left[:5]}"
    assert formula.shape[0] > 20 and (formula < 128).mean() > 0.005, "the first display formula draws no ink"
    print(f"offline: refused {len(refused)} request(s): {sorted(set(refused))[:3]}")
