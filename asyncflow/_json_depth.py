"""How deeply a JSON value may nest: contexts, event contents and configs deeper than
:data:`MAX_JSON_DEPTH` are refused where they come in (never stored, so no later pass can fail on them).

The check walks the value with an explicit stack (it cannot itself hit ``RecursionError``), and JSON
text is decoded with its ``RecursionError`` turned into the same typed error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from asyncflow.errors import ParamInvalidError

__all__ = ["MAX_JSON_DEPTH", "check_json_depth", "json_depth_exceeds", "loads_json_checked"]

MAX_JSON_DEPTH = 100
"""The deepest nesting of objects and arrays a context, an event's content or a config may have
(``{"a": [1]}`` is 2 deep). The engine itself nests a few levels more (``node_event``,
``pre_node_context``), far below what Python's recursion allows."""


_SCALARS = frozenset({str, int, float, bool, type(None)})
"""Types that never nest: checked by identity before the slower ``isinstance`` against ``Mapping``."""


def _nests(value: Any) -> bool:
    kind = type(value)
    if kind is dict or kind is list:
        return True
    return kind not in _SCALARS and isinstance(value, Mapping | list | tuple)


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests dicts/lists/tuples more than ``limit`` deep (iterative; a reference
    cycle counts as too deep)."""
    if not _nests(value):
        return False
    if not value and limit >= 1:  # an empty dict or list is 1 deep
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > limit:
            return True
        kind = type(current)  # dict and list first: the Mapping check is an ABC's (a Python call)
        children = (
            current.values()
            if kind is dict or (kind is not list and isinstance(current, Mapping))
            else current
        )
        stack.extend((child, depth + 1) for child in children if _nests(child))
    return False


def check_json_depth(
    value: Any,
    what: str,
    *,
    limit: int = MAX_JSON_DEPTH,
    error: Callable[[str], Exception] = ParamInvalidError,
) -> None:
    """Raise ``error`` (``ParamInvalidError``) naming ``what`` if ``value`` nests deeper than ``limit``."""
    if json_depth_exceeds(value, limit):
        raise error(f"{what} is nested more than {limit} levels deep (the most asyncflow accepts)")


def loads_json_checked(
    text: str | bytes | bytearray,
    what: str,
    *,
    error: Callable[[str], Exception] = ParamInvalidError,
) -> Any:
    """``json.loads(text)`` whose value nests at most :data:`MAX_JSON_DEPTH` deep, else ``error``.

    ``ValueError`` (invalid JSON) propagates for the caller to word; nesting too deep for the decoder
    itself raises ``error`` like any other depth beyond the limit, and so does an integer of more digits
    than Python converts (``sys.get_int_max_str_digits()``): json raises a plain ``ValueError`` for it,
    not the ``JSONDecodeError`` callers word as invalid JSON.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(
            f"{what} is nested more than {MAX_JSON_DEPTH} levels deep (the most asyncflow accepts)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:
        raise error(
            f"{what} holds an integer of more than {sys.get_int_max_str_digits()} digits (the most "
            "Python reads)"
        ) from None
    check_json_depth(value, what, error=error)
    return value
