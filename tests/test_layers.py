"""The layering stays true: every import of every module, read from its source (imports
inside functions too), against the floors each package may stand on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = {"config", "kitewire", "rediswire", "publisher", "consumers", "simulator", "kitebus"}
# what each package may import of the project (itself always)
ALLOWED = {
    "config": set(),
    "kitewire": set(),
    "rediswire": {"config"},
    "simulator": {"config", "kitewire"},
    "publisher": {"config", "kitewire", "rediswire"},
    "consumers": {"config", "kitewire", "rediswire"},
    "kitebus": FIRST_PARTY,
}


def _imports(path: Path) -> set[str]:
    """The top-level project packages ``path`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in FIRST_PARTY)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_floors_below_it(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(bad)
        for path in sorted((ROOT / package).rglob("*.py"))
        if (bad := _imports(path) - ALLOWED[package] - {package})
    }
    assert wrong == {}


def test_the_walk_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from publisher import app\n    import consumers.subscriber\n")
    assert _imports(module) == {"publisher", "consumers"}


# What a module documented as pure (docs/architecture.md) must not reach, even through
# other project modules: sockets, event loops, threads, processes, Redis and WebSocket clients.
IO_MODULES = {
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "threading",
    "subprocess",
    "redis",
    "websockets",
    "http",
}


def _documented_pure() -> list[str]:
    """The modules docs/architecture.md's table marks ``(pure)``."""
    table = (ROOT / "docs" / "architecture.md").read_text().splitlines()
    return [line.split("`")[1] for line in table if line.startswith("| `") and "(pure)" in line]


def _runtime_imports(path: Path) -> set[str]:
    """Every module ``path`` imports when it runs (imports under ``if TYPE_CHECKING:`` never run)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _reach(module: str) -> set[str]:
    """Every module ``module`` imports at run time, through project modules transitively."""
    reached: set[str] = set()
    read: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"  # a package
        if name in read or not path.exists():
            continue  # read already, or a name imported from a module rather than a module
        read.add(name)
        for imported in _runtime_imports(path):
            reached.add(imported)
            if imported.split(".")[0] in FIRST_PARTY:
                todo.append(imported)
    return reached


def test_architecture_names_its_pure_modules() -> None:
    pure = _documented_pure()
    assert {
        "publisher/backlog.py",
        "publisher/subscriptions.py",
        "kitewire/codec.py",
        "rediswire/resp.py",
    } <= set(pure)


@pytest.mark.parametrize("path", _documented_pure())
def test_a_pure_module_reaches_no_io(path: str) -> None:
    reached = _reach(path.removesuffix(".py").replace("/", "."))
    assert sorted(name for name in reached if name.split(".")[0] in IO_MODULES) == []


def test_the_reach_follows_project_modules_and_skips_type_checking_imports() -> None:
    assert "hiredis" in _reach("publisher.inflight")  # through rediswire.resp
    assert "redis.asyncio" in _reach("publisher.sink")  # through rediswire.bus
    assert "rediswire.bus" not in _reach("publisher.backlog")  # its import is for types only
