"""README.md and docs/: short, linked, and true to the code they name.

No mount, no root: these read files (and run bench.chart into a
temporary file).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README] + sorted(DOCS.glob("*.md"))

# The set-up commands CI runs (.ci/run, .ci/other-release): the README gives them verbatim.
SETUP_COMMANDS = ("bash .ci/setup && python3 -m shiftfs.demo",
                  "bash .ci/setup && python3 -m pytest -q tests")


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


@pytest.mark.parametrize("command", SETUP_COMMANDS)
def test_readme_gives_the_setup_commands(command):
    assert re.search(rf"^{re.escape(command)}$", README.read_text(encoding="utf-8"), re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M)}


def links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_files_and_tests_exist(page):
    """A path of this repository (tests/..., shiftfs/..., bench/...) named in the
    text exists, and a named test function is defined in it."""
    missing = []
    for ref in set(re.findall(r"\b((?:tests|bench|shiftfs|man|docs|\.ci)/[\w./-]*[\w/])(?:::(\w+))?",
                              page.read_text(encoding="utf-8"))):
        path, func = ref
        if not (REPO / path).exists():
            missing.append(path)
        elif func and not re.search(rf"^\s*def {func}\b", (REPO / path).read_text(), re.M):
            missing.append(f"{path}::{func}")
    assert missing == []


def test_every_known_difference_is_described():
    """Each difference the oracle allows (tests/oracle) is a D-item of
    docs/semantics.md, which names every operation it covers."""
    semantics = (DOCS / "semantics.md").read_text(encoding="utf-8")
    oracle = (REPO / "tests" / "oracle" / "test_differential.py").read_text()
    documented = (REPO / "tests" / "oracle" / "differential.py").read_text()
    table = oracle[oracle.index("KNOWN_DIFFERENCES: dict"):oracle.index("\nALLOWED = {")]
    names = set(re.findall(r'"(D\d+)"', table)) | set(re.findall(r'"(D\d+) ', documented))
    assert names >= {"D1", "D2", "D5"}
    assert sorted(n for n in names if f"**{n}." not in semantics) == []
    ops = {op for group in re.findall(r"\(\(([^()]*)\),", table) for op in re.findall(r'"(\w+)"', group)}
    assert ops and sorted(op for op in ops if op not in semantics) == []


def test_chart_is_drawn_from_the_results(tmp_path):
    """docs/performance.svg is what bench/chart.py draws from bench/results.md
    (after a new benchmark run: python3 -m bench.chart)."""
    out = tmp_path / "performance.svg"
    subprocess.run([sys.executable, "-m", "bench.chart", "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=REPO)
    assert (DOCS / "performance.svg").read_text(encoding="utf-8") == out.read_text(encoding="utf-8"), \
        "docs/performance.svg is stale: run python3 -m bench.chart"
    assert "performance.svg" in README.read_text(encoding="utf-8")
