"""``--app module:attribute``: import the user's registry or service (like ``uvicorn main:app``).

The attribute may be a :class:`~asyncflow.registry.Registry`, a
:class:`~asyncflow.engine.service.WorkflowService`, or a function (sync or async, no arguments) that
returns one. The current directory is put on ``sys.path`` first, so ``myapp:registry`` finds
``./myapp.py``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from ..engine.service import WorkflowService
from ..registry import Registry
from .backend import CLIError

__all__ = ["load_app"]


def _import(spec: str) -> Any:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise CLIError(f"APP must look like module:attribute (e.g. myapp:registry), got {spec!r}", 2)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            raise CLIError(f"cannot import {module_name!r}: no such module (from {cwd})", 2) from error
        raise CLIError(f"importing {module_name!r} failed: {type(error).__name__}: {error}", 2) from error
    except Exception as error:  # the user's module raised while importing: say what, briefly
        raise CLIError(f"importing {module_name!r} failed: {type(error).__name__}: {error}", 2) from error
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError as error:
            raise CLIError(f"{module_name!r} has no attribute {attribute!r}", 2) from error
    return value


async def load_app(spec: str) -> Registry | WorkflowService:
    """The registry or service that ``spec`` (``module:attribute``) names; :class:`CLIError` if none."""
    value = _import(spec)
    if not isinstance(value, Registry | WorkflowService) and callable(value):
        try:
            value = value()
            if inspect.isawaitable(value):
                value = await value
        except CLIError:
            raise
        except Exception as error:
            raise CLIError(f"{spec} failed: {type(error).__name__}: {error}", 2) from error
    if not isinstance(value, Registry | WorkflowService):
        raise CLIError(
            f"{spec} must be a Registry or a WorkflowService (or a function returning one), "
            f"got {type(value).__name__}",
            2,
        )
    return value
