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
