"""The package uses its dependencies (SQLAlchemy, aiosqlite, asyncpg, redis, the json module...)
through their public APIs only: no private attribute, no private module."""

from __future__ import annotations

import ast
import pathlib

import asyncflow

PACKAGE = pathlib.Path(asyncflow.__file__).parent
KNOWN_PRIVATE_USES = (  # what 0.1 used, and what a review would look for first
    "encode_basestring",
    "_proxied",
    "_max_overflow",
    "pool._invalidate",
    "Connection._execute",
    "aio_connection._execute",
    "aio_connection._conn",
)


def _sources() -> dict[pathlib.Path, str]:
    return {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _looked_up(tree: ast.AST) -> list[ast.Constant]:
    """The names in ``getattr(x, "name")`` / ``hasattr(x, "name")`` calls."""
    return [
        node.args[1]
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
    ]


def _own_names(trees: list[ast.AST]) -> set[str]:
    """Every private name the package defines itself (attributes, functions, classes, slots, args)."""
    names: set[str] = set()
    for tree in trees:
        looked_up = {id(node) for node in _looked_up(tree)}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in looked_up:
                names.add(node.value)  # __slots__ entries, dataclass fields by name
    return {name for name in names if _private(name)}


def test_no_private_attribute_or_module_of_a_dependency() -> None:
    sources = _sources()
    trees = {path: ast.parse(text) for path, text in sources.items()}
    own = _own_names(list(trees.values()))
    found = []
    for path, tree in trees.items():
        for constant in _looked_up(tree):
            if isinstance(constant.value, str) and _private(constant.value) and constant.value not in own:
                found.append(f"{path.relative_to(PACKAGE)}:{constant.lineno}: getattr {constant.value}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                ours = node.module.startswith("asyncflow")
                if not ours and node.module != "__future__" and any(map(_private, node.module.split("."))):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: from {node.module}")
                found += [
                    f"{path.relative_to(PACKAGE)}:{node.lineno}: import {alias.name} from {node.module}"
                    for alias in node.names
                    if _private(alias.name) and not ours
                ]
    assert found == []


def test_none_of_the_private_apis_01_used_is_back() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}: {use}"
        for path, text in _sources().items()
        for use in KNOWN_PRIVATE_USES
        if use in text
    ]
    assert found == []


def test_aiosqlite_is_used_through_sqlalchemy_only() -> None:
    importing = [path for path, text in _sources().items() if "import aiosqlite" in text]
    assert importing == []
