"""The store's layout: the SQL backend is chosen once, from the engine's dialect, in
``asyncflow/store/_backend.py``; what a database does differently lives in its package
(``store/postgres/``, ``store/sqlite/``), and the shared part never looks at the dialect."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib

import asyncflow
from asyncflow.store._backend import PACKAGES

STORE = pathlib.Path(asyncflow.__file__).parent / "store"
PICKER = STORE / "_backend.py"
BACKENDS = (STORE / "postgres", STORE / "sqlite")
DATABASES = ("postgresql", "sqlite")
SCHEMA_TYPES = {STORE / "tables.py": {"JSONB"}}
"""The shared schema declares each column type's variants (``with_variant``): the names it imports."""


def _shared() -> list[pathlib.Path]:
    return [
        path
        for path in sorted(STORE.rglob("*.py"))
        if path != PICKER and not any(path.is_relative_to(package) for package in BACKENDS)
    ]


def _dialect_uses(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("name", "driver"):
            owner = node.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "dialect") or (
                isinstance(owner, ast.Name) and owner.id == "dialect"
            ):
                found.append(f"{path.name}:{node.lineno}: dialect.{node.attr}")
        if isinstance(node, ast.Compare) and any(
            isinstance(side, ast.Constant) and side.value in DATABASES
            for side in (node.left, *node.comparators)
        ):
            found.append(f"{path.name}:{node.lineno}: compares with a database's name")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy.dialects"):
            names = {alias.name for alias in node.names}
            schema_types = SCHEMA_TYPES.get(path, set())
            if not (node.module == "sqlalchemy.dialects.postgresql" and names <= schema_types):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import {sorted(names)}")
    return found


def test_only_the_picker_looks_at_the_dialect() -> None:
    assert [use for path in _shared() for use in _dialect_uses(path)] == []


def test_the_picker_does() -> None:
    assert "engine.dialect.name" in PICKER.read_text()


def test_each_backend_package_has_the_calls_of_the_picker() -> None:
    for name in PACKAGES.values():
        package = importlib.import_module(f"asyncflow.store.{name}")
        for module in pathlib.Path(package.__file__).parent.glob("*.py"):  # no submodule shadows them
            importlib.import_module(f"asyncflow.store.{name}.{module.stem}")
        for call in ("engine_url", "open_backend", "database_key"):
            assert inspect.isfunction(getattr(package, call)), (name, call)
        assert package.PLACE_SQL is None or isinstance(package.PLACE_SQL, str), name


def test_the_cli_asks_the_repo_not_the_dialect() -> None:
    """The CLI's default lock and its one-process warning come from ``repo.shared_by_processes``, not
    from an engine's dialect (reading a URL it was given, such as a SQLite file's path, is fine)."""
    cli = pathlib.Path(asyncflow.__file__).parent / "cli"
    uses = [use for path in sorted(cli.rglob("*.py")) for use in _dialect_uses(path)]
    assert [use for use in uses if ": dialect." in use] == []


def test_each_backend_says_whether_processes_share_it() -> None:
    shared = {name: importlib.import_module(f"asyncflow.store.{name}.backend") for name in PACKAGES.values()}
    assert shared["postgres"].PostgresBackend.shared_by_processes is True
    assert shared["sqlite"].SqliteBackend.shared_by_processes is False
