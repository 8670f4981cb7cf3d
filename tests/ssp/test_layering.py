"""The rooms depend one way: every import of every module (function-level imports included) follows ALLOWED.

    ssp (core: config, paths, metrics, keys, processes, plug-in loading)   <- every room
    retriever, serving                                                   <- engine, launcher, bench
    engine (the trajectory format, the stream, clients)                  <- learner, launcher, bench
    learner                                                              <- launcher, bench
    launcher                                                             <- bench
The ssp modules that assemble the rooms (the root config and the command line) sit on top of everything. Every
room installs under the one import name ssp (engine/ is ssp.engine, and so on; pyproject.toml maps the folders).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from ssp.paths import PROJECT_ROOT

ROOMS = ("ssp", "retriever", "serving", "engine", "learner", "launcher", "bench")
ALLOWED = {
    "ssp": {"ssp"},
    "retriever": {"ssp", "retriever"},
    "serving": {"ssp", "serving"},
    "engine": {"ssp", "retriever", "engine"},
    "learner": {"ssp", "engine", "learner"},
    "launcher": {"ssp", "retriever", "serving", "engine", "learner", "launcher"},
    "bench": set(ROOMS),
}
ASSEMBLERS = {"ssp/run_config.py", "ssp/cli.py", "ssp/config_cli.py"}
"""The top of the stack: they name every room's config section or command."""


def imported_names(path: Path) -> list[str]:
    """Every absolute module name `path` imports, function-level imports included."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names += ([a.name for a in node.names] if isinstance(node, ast.Import) else
                  [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
    return names


def room_of(name: str) -> str | None:
    """The room a module name belongs to: "ssp.engine.pool" -> "engine", "ssp.config" -> "ssp"; None outside."""
    parts = name.split(".")
    if parts[0] != "ssp":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS[1:] else "ssp"


def imported_rooms(path: Path) -> set[str]:
    return {room for room in map(room_of, imported_names(path)) if room is not None}


def modules() -> list[Path]:
    return sorted(p for room in ROOMS for p in (PROJECT_ROOT / room).rglob("*.py")
                  if str(p.relative_to(PROJECT_ROOT)) not in ASSEMBLERS)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_imports_run_one_way(path: Path) -> None:
    room = path.relative_to(PROJECT_ROOT).parts[0]
    wrong = imported_rooms(path) - ALLOWED[room]
    assert not wrong, f"{path.relative_to(PROJECT_ROOT)} ({room}) imports {sorted(wrong)}; allowed: {sorted(ALLOWED[room])}"


def test_the_scan_sees_function_level_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from ssp.launcher.train import train\n    import ssp.engine.wire\n")
    assert imported_rooms(source) == {"launcher", "engine"}


PYTHON_FILES = sorted(p for p in PROJECT_ROOT.rglob("*.py")
                      if not {".venv", ".git", "artifacts", "__pycache__"} & set(p.relative_to(PROJECT_ROOT).parts))


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_rooms_are_imported_under_ssp(path: Path) -> None:
    """One import name: a bare `engine` (or learner, ...) would still resolve from the repository root and load a
    second copy of the module next to `ssp.engine`, with its own globals."""
    bare = sorted({n for n in imported_names(path) if n.split(".")[0] in ROOMS[1:]})
    assert not bare, f"{path.relative_to(PROJECT_ROOT)} imports {bare}; import them as ssp.<room>... instead"


def test_the_distribution_installs_one_top_level_name() -> None:
    setuptools = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = setuptools["packages"]
    assert all(p == "ssp" or p.startswith("ssp.") for p in packages), packages
    assert {f"ssp.{room}" for room in ROOMS[1:]} <= set(packages)
    assert {name: folder for name, folder in setuptools["package-dir"].items() if name != "ssp"} == \
        {f"ssp.{room}": room for room in ROOMS[1:]}


ROOT_CONFIG = "ssp.run_config"
SECTION_TAKERS = ("retriever", "serving", "engine", "learner")
"""Rooms whose components are handed their own config sections; only their command-line modules load the root."""


def imports_module(path: Path, module: str) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        if module in names:
            return True
    return False


@pytest.mark.parametrize("path", [p for p in modules() if p.relative_to(PROJECT_ROOT).parts[0] in SECTION_TAKERS
                                  and not p.name.endswith("cli.py")],
                         ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_components_take_their_own_sections(path: Path) -> None:
    assert not imports_module(path, ROOT_CONFIG), (
        f"{path.relative_to(PROJECT_ROOT)} imports the root config ({ROOT_CONFIG}); a component takes its own "
        "section (the engine: ssp.engine.config.EngineConfig, from SSPConfig.engine()), and only a *cli.py module loads "
        "the root")
