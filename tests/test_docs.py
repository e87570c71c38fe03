"""The README and the pages under docs/: every relative link and image resolves, and the README stays one page.

A link `[text](path)`, `[text](path#anchor)`, `[text](#anchor)` or image `![alt](path)` outside fenced code
blocks must name a file that exists relative to the page that links it, and an anchor into a markdown page
must be the GitHub slug of one of that page's headings. Links with a scheme (https:, mailto:, ...) are not
followed.
"""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, only letters, digits, spaces, '-' and '_'
    kept, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    """Every heading anchor of a page, repeated headings numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return frozenset(out)


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """One line per link of `page` that does not resolve, named relative to `root`."""
    text = page.read_text(encoding="utf-8")
    kept = dict(prose_lines(text))
    # code blocks blanked, inline code spans too (a link spelled in code is not a link); offsets are kept,
    # and a link whose text wraps onto the next line is still one link
    prose = "\n".join(kept.get(number, "") for number in range(1, len(text.splitlines()) + 1))
    prose = re.sub(r"`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group()), prose)
    broken = []
    for match in LINK.finditer(prose):
        target = match.group(1)
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        number = prose.count("\n", 0, match.start()) + 1
        where = f"{page.relative_to(root)}:{number}: ({target})"
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{where} no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{where} no heading with that anchor in {linked.relative_to(root)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    assert not broken_links(page), "\n".join(broken_links(page))


def test_readme_is_one_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the rest belongs in docs/"


def test_the_checker_finds_what_is_broken(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## Two words\n## Two words\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#two-words-1) [ok](#here) ![ok](a.md) [web](https://example.org/x)\n"
        "## Here\n```\n[in code](missing.md)\n```\n"
        "[bad file](missing.md) [bad anchor](a.md#three-words) [bad\nhere](#nowhere) `[code](missing.md)`\n"
    )
    found = broken_links(page, root=tmp_path)
    assert [f.split(": (")[1].split(")")[0] for f in found] == ["missing.md", "a.md#three-words", "#nowhere"]
