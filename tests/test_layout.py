"""The house's shape: every import flows one way between the rooms, no two files import each other in a
loop, and no file outgrows a sitting's reading."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "minisbert"
# Rooms from the ground up: a module imports only from its own room or the ones below it.
ROOMS = [
    {"errors", "checks", "search", "quantize", "util"},  # small utilities, importable from anywhere
    {"models"},
    {"modules"},
    {"io", "text"},
    {"loading"},
    {"runner", "fast", "trace"},
    {"encoder", "encoding"},
    {"train", "corpus", "sts", "inspect", "serve", "integrations"},
    {"cli", "__main__", "__init__"},
]
FLOOR = {room: i for i, rooms in enumerate(ROOMS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """The minisbert modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minisbert"):
            for alias in node.names:  # ``from minisbert.io import hub`` imports the module minisbert.io.hub
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("minisbert"))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_imports_flow_one_way_between_rooms():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if target == "minisbert":
                if room(module) not in ("__init__", "cli", "corpus"):  # those read ``__version__``
                    wrong.append(f"{module} -> minisbert (the package's face)")
            elif target != "minisbert" and FLOOR[room(target)] > FLOOR[room(module)]:
                wrong.append(f"{module} (floor {FLOOR[room(module)]}) -> {target} (floor {FLOOR[room(target)]})")
    assert not wrong, "imports that run back up:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges.get(module, ()):
            if target not in edges or target == module:
                continue
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [])


def test_every_module_has_a_room_and_a_readable_size():
    for path in PACKAGE.rglob("*.py"):
        assert room(module_name(path)) in FLOOR, f"{path} is in no room of ROOMS"
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 420, f"{path.relative_to(REPO)} has {lines} lines: split it by concern"


def test_the_checker_sees_a_back_import(tmp_path, monkeypatch):
    """The rule is not vacuous: a model file importing the encoder is caught."""
    bad = PACKAGE / "models" / "bert.py"
    original = graph()
    monkeypatch.setattr(__import__(__name__), "graph",
                        lambda: {**original, module_name(bad): original[module_name(bad)] | {"minisbert.encoder"}})
    try:
        test_imports_flow_one_way_between_rooms()
    except AssertionError as e:
        assert "minisbert.models.bert (floor 1) -> minisbert.encoder (floor 6)" in str(e)
    else:
        raise AssertionError("a model importing the encoder was not caught")
