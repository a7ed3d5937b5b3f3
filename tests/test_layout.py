"""The layout stays a picture of the architecture: no module over 500 lines, and no module
using another module's private names (a helper needed elsewhere moves to its real home)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parent.parent / "src" / "pytree_ckpt"
MODULES = sorted(PACKAGE.rglob("*.py"))
MOST_LINES = 500


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_is_longer_than_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES
            if (n := len(p.read_text().splitlines())) > MOST_LINES}
    assert long == {}


def _reach_ins(path: pathlib.Path) -> list[str]:
    """``from ._x import _y`` and ``_x._y`` (``_x`` imported with ``from . import``) in one
    module's source, naming the line."""
    found, modules = [], set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            for alias in node.names:
                if node.module is None:
                    modules.add(alias.asname or alias.name)
                elif _private(alias.name) and node.module.split(".")[-1] != path.stem:
                    found.append(f"{node.lineno}: from .{node.module} import {alias.name}")
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and _private(node.attr)):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = {str(p.relative_to(PACKAGE)): r for p in MODULES if (r := _reach_ins(p))}
    assert found == {}


def test_the_reach_in_check_finds_one(tmp_path):
    # The check itself can fail: a module reaching into _read's private helper is caught.
    module = tmp_path / "_x.py"
    module.write_text("from . import _read\nfrom ._build import _helper\n_read._slab(1)\n")
    assert _reach_ins(module) == ["2: from ._build import _helper", "3: _read._slab"]
