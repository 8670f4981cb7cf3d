"""The docs stay true to the tree: docs/architecture.md lists every module and only existing paths, and every link
of the README and of docs/ resolves inside the repository.

A layout table or a link that is not checked falls behind the code within weeks: a new module goes unmentioned, a
moved one keeps its old row, a renamed page leaves a dead link. These tests make each visible at once.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ssp.paths import PROJECT_ROOT

ROOMS = ("ssp", "retriever", "serving", "engine", "learner", "launcher", "bench")
DOC = PROJECT_ROOT / "docs" / "architecture.md"
PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def listed_paths(text: str) -> set[str]:
    """The paths in the first column of the doc's layout tables."""
    return set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE))


def repository_modules(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for room in ROOMS for p in (root / room).rglob("*.py")
            if p.name != "__init__.py" and "__pycache__" not in p.parts}


def test_every_module_is_listed() -> None:
    missing = sorted(repository_modules(PROJECT_ROOT) - listed_paths(DOC.read_text(encoding="utf-8")))
    assert not missing, f"docs/architecture.md does not list {missing}; add a row for each to its room's table"


def test_every_listed_path_exists() -> None:
    stale = sorted(p for p in listed_paths(DOC.read_text(encoding="utf-8"))
                   if not any((PROJECT_ROOT).glob(p)))
    assert not stale, f"docs/architecture.md lists {stale}, which do not exist; remove or rename those rows"


def link_targets(text: str) -> list[str]:
    """The targets of a page's markdown links, without any #fragment."""
    return [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_links_resolve_inside_the_repository(page: Path) -> None:
    targets = link_targets(page.read_text(encoding="utf-8"))
    outside = [t for t in targets if "://" in t or not t or not (page.parent / t).resolve().is_relative_to(PROJECT_ROOT)]
    dead = [t for t in targets if t not in outside and not (page.parent / t).exists()]
    assert not outside and not dead, (f"{page.name}: links outside the repository {outside}, dead links {dead}; "
                                      "link only to files of the repository, relative to the page")


def test_the_link_check_sees_a_dead_link() -> None:
    assert link_targets("see [a](docs/a.md#x) and [b](https://example.com)") == ["docs/a.md", "https://example.com"]


def test_the_check_sees_a_missing_module(tmp_path: Path) -> None:
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "listed.py").write_text("")
    (tmp_path / "engine" / "unlisted.py").write_text("")
    doc = "| path | what |\n|---|---|\n| `engine/listed.py` | a module |\n"
    assert repository_modules(tmp_path) - listed_paths(doc) == {"engine/unlisted.py"}
