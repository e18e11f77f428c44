"""The package's layout is its architecture: packages by role, each importing only the packages
below it, no module importing itself back through others, and nothing at the root but the API
and the command line."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cdeq"
ORDER = ["engine", "solvers", "deq", "consistency", "tasks", "hub", "run"]
"""The packages, bottom to top: each may import those before it, never one after it."""
CORE = {"engine", "solvers", "deq", "consistency"}
ROOT_MODULES = {"__init__.py", "cli.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The cdeq modules ``name`` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in MODULES else stem for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


def test_the_root_holds_only_the_api_and_the_command_line():
    assert {p.name for p in SRC.glob("*.py")} <= ROOT_MODULES | {"__main__.py"}
    assert {p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ORDER)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _room(m)))
def test_a_package_imports_only_the_packages_below_it(module):
    room = ORDER.index(_room(module))
    above = sorted(t for t in GRAPH[module] if _room(t) and ORDER.index(_room(t)) > room)
    assert not above, f"{module} imports {above}, from packages above {ORDER[room]!r} ({ORDER})"
    if _room(module) in CORE:  # the library alone distils a user's DEQ: no task, hub or run
        assert not [t for t in GRAPH[module] if _room(t) not in CORE and t != "cdeq"]


def test_no_module_imports_itself_back_through_others():
    """No circle in the import graph (a package's ``__init__`` re-exports count as edges)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1 and not m.startswith(t + "."):  # a module may read its own package
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_import_test_sees_a_wrong_way_import(tmp_path):
    """The check itself: an upward import in a core module is found."""
    bad = tmp_path / "x.py"
    bad.write_text("from ..run.stages import Run\n")
    MODULES["cdeq.solvers.x"] = bad
    try:
        assert _imports("cdeq.solvers.x", bad) == {"cdeq.run.stages"}
    finally:
        del MODULES["cdeq.solvers.x"]
