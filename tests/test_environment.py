"""environment.yml (conda users) lists what pyproject.toml lists: its dependencies and the dev
extra, by name and version range, both ways. Python, pip and the `-e .` line are conda's own."""
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONDA_OWN = {"python", "pip"}


def pyproject_requirements() -> dict:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def environment_entries(text: str) -> tuple[list, list]:
    """(conda entries, pip entries) of the `dependencies:` list and its nested `- pip:` list.

    A deliberately small parser for the file's plain structure (no PyYAML needed): it fails
    loudly on a line it does not understand instead of guessing."""
    conda, pip, section, pip_indent = [], [], None, None
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()  # drop comments
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:  # a top-level key: name, channels, dependencies
            section, pip_indent = line.split(":", 1)[0], None
            continue
        if section != "dependencies":
            continue
        item = re.match(r"^\s*-\s+(.+)$", line)
        if not item:
            raise ValueError(f"environment.yml line {number}: expected a list item, got {raw!r}")
        value = item.group(1).strip().strip("'\"")
        if value == "pip:":
            pip_indent = indent
        elif pip_indent is not None and indent > pip_indent:
            pip.append(value)
        else:
            pip_indent = None
            conda.append(value)
    return conda, pip


def test_parser_reads_the_nested_pip_list():
    conda, pip = environment_entries(
        "name: x\n# c\ndependencies:\n  - python>=3.10\n  - pip\n  - pip:\n      - torch>=2.4  # why\n      - -e .\n")
    assert conda == ["python>=3.10", "pip"]
    assert pip == ["torch>=2.4", "-e ."]


def environment_requirements() -> dict:
    conda, pip = environment_entries((ROOT / "environment.yml").read_text())
    reqs = {}
    for entry in conda + pip:
        if entry.startswith("-"):  # "-e ." installs the course itself
            continue
        r = Requirement(entry.replace("=", "==", 1) if re.match(r"^[\w.-]+=[^=]", entry) else entry)
        reqs[canonicalize_name(r.name)] = r
    return {name: r for name, r in reqs.items() if name not in CONDA_OWN}


def test_every_pyproject_dependency_is_in_environment_yml():
    missing = set(pyproject_requirements()) - set(environment_requirements())
    assert not missing, f"add to environment.yml (pip section): {sorted(missing)}"


def test_environment_yml_lists_nothing_pyproject_does_not():
    extra = set(environment_requirements()) - set(pyproject_requirements())
    assert not extra, f"in environment.yml but not in pyproject.toml (dependencies or dev): {sorted(extra)}"


def test_version_ranges_agree():
    ours, conda = pyproject_requirements(), environment_requirements()
    differ = {name: (str(ours[name].specifier), str(conda[name].specifier))
              for name in set(ours) & set(conda) if ours[name].specifier != conda[name].specifier}
    assert not differ, f"pyproject.toml vs environment.yml version ranges differ: {differ}"


def test_environment_installs_the_course_itself():
    _, pip = environment_entries((ROOT / "environment.yml").read_text())
    assert "-e ." in pip
