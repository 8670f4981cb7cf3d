"""The rooms depend one way: every import of every module (function-level imports included) follows ALLOWED.

    ssp (core: config, paths, metrics, keys, processes, plug-in loading)   <- every room
    retriever, serving                                                   <- engine, launcher, bench
    engine (the trajectory format, the stream, clients)                  <- learner, launcher, bench
    learner                                                              <- launcher, bench
    launcher                                                             <- bench
The ssp modules that assemble the rooms (the root config and the command line) sit on top of everything.
"""

from __future__ import annotations

import ast
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


def imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        rooms.update(n.split(".")[0] for n in names if n.split(".")[0] in ROOMS)
    return rooms


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
    source.write_text("import os\n\ndef f():\n    from launcher.processes import free_port\n    import engine.wire\n")
    assert imported_rooms(source) == {"launcher", "engine"}


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
        "section (the engine: engine.config.EngineConfig, from SSPConfig.engine()), and only a *cli.py module loads "
        "the root")
