"""The docs stay true to the code: every line link in docs/*.md and README.md points at an existing file and a line
inside it, and the name the link shows (in backticks) is on the line it points to; relative links to pages and
images resolve. Pure Python, no torch."""
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
METHOD_PAGES = ["sft", "s3ft", "fait", "asft", "otr", "drift", "sorted_ft", "roste", "merge"]
SECTIONS = ["## Overview", "## Usage", "## Logged metrics", "## Implementation details", "## Results",
            "## Deviations from the paper"]

LINK = re.compile(r"\[([^\[\]]*)\]\(([^()\s]+)\)")
LINES = re.compile(r"L(\d+)(?:-L(\d+))?")
NAME = re.compile(r"`([^`]+)`")


def links(text: str):
    """(link text, target) of every markdown link outside fenced code blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return LINK.findall(prose)


def generated(path: Path) -> bool:
    """RESULTS.md and results/*.png are written by results.py, not committed."""
    return path == REPO / "RESULTS.md" or (path.parent == REPO / "results" and path.suffix == ".png")


def problems(page: Path) -> list:
    """Every broken link of one markdown file, as readable strings (empty when all is well)."""
    found = []
    for label, target in links(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # external (http:, mailto:) or an anchor in the same page
        path_part, _, fragment = target.partition("#")
        path = (page.parent / path_part).resolve()
        if generated(path):
            continue
        where = f"{page.relative_to(REPO)}: [{label}]({target})"
        if not path.exists():
            found.append(f"{where}: {path_part} does not exist")
            continue
        lines = LINES.fullmatch(fragment) if path.suffix == ".py" else None
        if fragment and path.suffix == ".py" and not lines:
            found.append(f"{where}: a .py link's fragment must be #L<n> or #L<n>-L<m>")
            continue
        if not lines:
            continue
        source = path.read_text().splitlines()
        first, last = int(lines[1]), int(lines[2] or lines[1])
        if not 1 <= first <= last <= len(source):
            found.append(f"{where}: lines {first}-{last} outside 1-{len(source)}")
            continue
        stated = re.search(r"\blines? (\d+)(?:-(\d+))?", label)
        if stated and (int(stated[1]), int(stated[2] or stated[1])) != (first, last):
            found.append(f"{where}: the text says lines {stated[1]}-{stated[2] or stated[1]}, the link {first}-{last}")
        span = "\n".join(source[first - 1:last])
        names = NAME.findall(label)
        if names and names[0] not in source[first - 1]:
            found.append(f"{where}: `{names[0]}` is not on line {first} (`{source[first - 1].strip()}`; python docs/relink.py docs/*.md re-points the links)")
        for name in names[1:]:
            if name not in span:
                found.append(f"{where}: `{name}` is not within lines {first}-{last}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_the_named_code(page):
    assert not problems(page), "\n".join(problems(page))


@pytest.mark.parametrize("name", METHOD_PAGES)
def test_method_page_has_the_sections_in_order(name):
    page = REPO / "docs" / f"{name}.md"
    headings = [line.strip() for line in page.read_text().splitlines() if line.startswith("## ")]
    assert headings == SECTIONS
    text = page.read_text()
    assert "[RESULTS.md](../RESULTS.md)" in text
    assert re.search(r"\]\(\.\./\w+\.py#L\d+", text), "no line link into the script"


def test_readme_links_every_method_page():
    readme = REPO / "README.md"
    targets = {target for _, target in links(readme.read_text())}
    assert {f"docs/{name}.md" for name in METHOD_PAGES} <= targets


def test_checker_catches_a_wrong_line(tmp_path, monkeypatch):
    """The checker itself: a link that names a function one line off, a range that starts off, a line past the end
    of the file, a missing page and link text whose line numbers disagree with the link are each reported; the
    correct links are not."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "x.py").write_text("import os\n\n\ndef helper():\n    return os.sep\n")
    page = tmp_path / "docs" / "x.md"
    page.write_text("[`helper`](../x.py#L4) [`helper`, lines 4-5](../x.py#L4-L5) [RESULTS.md](../RESULTS.md)\n"
                    "```\n[`helper`](../x.py#L1)\n```\n")
    assert problems(page) == []
    page.write_text("[`helper`](../x.py#L3) [`helper`, lines 3-5](../x.py#L3-L5) [`helper`](../x.py#L9) "
                    "[page](other.md) [`helper`, lines 4-6](../x.py#L4-L5)\n")
    assert len(problems(page)) == 5
