"""``JSONContext``: the JSON document a workflow and each of its nodes carry.

A ``JSONContext`` wraps a ``dict[str, Any]`` holding JSON values (``dict``, ``list``, ``str``, ``int``,
``float``, ``bool``, ``None``). Paths are sequences of string keys and walk through ``dict`` values
only; lists are never indexed. The semantics follow the Go ``JSONContext`` with these fixes:

* ``null``, invalid JSON or a non-object decode to ``{}`` (with a WARNING log); Go panics on ``null``.
* Integers stay exact (Go turns every number into a float64).
* ``bool`` never counts as an int or a float; ``get_int64`` truncates floats toward zero and rejects
  NaN, infinities and values outside the int64 range.
* ``to_bytes`` is compact, sorted, UTF-8 and refuses NaN/infinity; ``clone`` is a real deep copy that
  never fails (Go silently returns ``{}`` when its JSON round trip fails).

Ownership: ``JSONContext(mapping)`` deep-copies; ``JSONContext.from_map(d)`` and ``to_map()`` share the
live dict (no copy, as in Go; the engine relies on it to avoid copies); ``set`` stores the value as given.

``dumps_json`` and ``loads_json_object`` are the canonical encoder and decoder, shared with the storage
layer.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from asyncflow._text import shown
from asyncflow.errors import ParamInvalidError

__all__ = ["JSONContext", "dumps_json", "loads_json_object", "merge_json_contexts"]

_log = logging.getLogger(__name__)

T = TypeVar("T")
JSONObject = dict[str, Any]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_ATOMIC: frozenset[type] = frozenset((str, int, float, bool, type(None)))
_MISSING: Any = object()

_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# Fallback for strings holding lone surrogates (valid JSON escapes, but not encodable as UTF-8).
_ASCII_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Python's json accepts NaN/Infinity tokens by default; JSON (and Go) do not.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _encode(obj: Any) -> str:
    try:
        return _ENCODER.encode(obj)
    except ValueError as exc:
        if "Out of range float" in str(exc):
            raise ParamInvalidError(f"JSON cannot represent NaN or infinite floats: {exc}") from exc
        raise ParamInvalidError(f"value cannot be encoded as JSON: {exc}") from exc
    except TypeError as exc:
        raise ParamInvalidError(f"value cannot be encoded as JSON: {exc}") from exc
    except RecursionError as exc:
        raise ParamInvalidError("value is nested too deeply to be encoded as JSON") from exc


def dumps_json(obj: Any) -> str:
    """Encode ``obj`` in the canonical form: compact, keys sorted, non-ASCII kept as is.

    Raises ``ParamInvalidError`` (original as ``__cause__``) for NaN/infinity, non-JSON values,
    circular references and keys that cannot be sorted. Non-``str`` keys that Python's ``json``
    accepts (``int``, ``float``, ``bool``, ``None``) are written as strings. A string holding a lone
    surrogate makes the whole document ASCII-escaped, so the result is always encodable as UTF-8.
    """
    text = _encode(obj)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _ASCII_ENCODER.encode(obj)
    return text


def loads_json_object(data: str | bytes | bytearray | memoryview | None) -> JSONObject:
    """Decode JSON text that should hold an object; return a new ``dict``.

    ``None`` or empty input gives ``{}`` silently. Invalid JSON (including non-UTF-8 bytes and the
    ``NaN``/``Infinity`` tokens), ``null`` or a non-object gives ``{}`` and logs a WARNING.
    Integers stay exact; duplicate keys: the last wins.
    """
    if data is None or len(data) == 0:
        return {}
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _log.warning("invalid JSON context (%d chars/bytes) replaced by {}: %s", len(data), exc)
        return {}
    if type(value) is dict:
        return value
    _log.warning("JSON context is %s, not an object; replaced by {}", _json_kind(value))
    return {}


def _json_kind(value: Any) -> str:
    kinds = {type(None): "null", list: "an array", str: "a string", bool: "a boolean"}
    return kinds.get(type(value), "a number")


def _deep_copy_dict(d: Mapping[str, Any]) -> JSONObject:
    return {k: (v if type(v) in _ATOMIC else _deep_copy_value(v)) for k, v in d.items()}


def _deep_copy_value(v: Any) -> Any:
    cls = type(v)
    if cls is dict:
        return _deep_copy_dict(v)
    if cls is list:
        return [x if type(x) in _ATOMIC else _deep_copy_value(x) for x in v]
    if cls in _ATOMIC:
        return v
    return copy.deepcopy(v)


class JSONContext:
    """A JSON object with path-based typed access (Go's ``JSONContext``).

    ``JSONContext(data)`` accepts a mapping (deep-copied), JSON text as ``str`` or ``bytes``, another
    ``JSONContext`` (deep-copied) or ``None`` (empty). Text that is invalid JSON, ``null`` or not an
    object gives an empty context and logs a WARNING; ``None`` and empty text do not warn.

    Getters return ``(value, found)``; a typed getter returns its type's zero value and ``False`` when
    the path is missing or holds another type. Not thread-safe; contexts are mutable and unhashable.
    """

    __slots__ = ("_data",)

    _data: JSONObject

    def __init__(self, data: Mapping[str, Any] | str | bytes | bytearray | JSONContext | None = None) -> None:
        if data is None:
            self._data = {}
        elif isinstance(data, (str, bytes, bytearray)):
            self._data = loads_json_object(data)
        elif isinstance(data, JSONContext):
            self._data = _deep_copy_dict(data._data)
        elif isinstance(data, Mapping):
            self._data = _deep_copy_dict(data)
        else:
            raise ParamInvalidError(
                f"JSONContext needs a mapping, JSON text (str/bytes) or None, not {type(data).__name__}"
            )

    @classmethod
    def from_map(cls, m: JSONObject | None) -> JSONContext:
        """Wrap ``m`` WITHOUT copying (Go parity): later changes on either side are shared.

        ``None`` gives a new empty context. Use ``JSONContext(m)`` for an independent copy.
        """
        ctx = cls.__new__(cls)
        if m is None:
            ctx._data = {}
        elif isinstance(m, dict):
            ctx._data = m
        else:
            raise ParamInvalidError(f"JSONContext.from_map needs a dict or None, not {type(m).__name__}")
        return ctx

    # -- reading -------------------------------------------------------------------------------

    def get(self, *keys: str) -> tuple[Any, bool]:
        """Return ``(value, True)`` at the path, or ``(None, False)`` if it is missing.

        No keys gives ``(None, False)``; a path through a non-dict value is missing; a JSON ``null``
        that is present gives ``(None, True)``.
        """
        if not keys:
            return None, False
        current: Any = self._data
        for key in keys:
            if not isinstance(current, dict):
                return None, False
            current = current.get(key, _MISSING)
            if current is _MISSING:
                return None, False
        return current, True

    def get_string(self, *keys: str) -> tuple[str, bool]:
        """A ``str`` at the path, or ``("", False)``; no coercion from other types."""
        value, found = self.get(*keys)
        if found and isinstance(value, str):
            return value, True
        return "", False

    def get_int64(self, *keys: str) -> tuple[int, bool]:
        """An integer at the path, or ``(0, False)``.

        An ``int`` (never a ``bool``) is returned exactly; a finite ``float`` is truncated toward zero
        (3.9 → 3, -3.9 → -3). NaN, infinities, values outside the int64 range, strings and everything
        else are rejected.
        """
        value, found = self.get(*keys)
        if not found or isinstance(value, bool):
            return 0, False
        if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
            result = int(value)
            if INT64_MIN <= result <= INT64_MAX:
                return result, True
        return 0, False

    def get_float64(self, *keys: str) -> tuple[float, bool]:
        """A number at the path as ``float`` (``int`` converted, ``bool`` rejected), or ``(0.0, False)``."""
        value, found = self.get(*keys)
        if not found or isinstance(value, bool):
            return 0.0, False
        if isinstance(value, float):
            return value, True
        if isinstance(value, int):
            try:
                return float(value), True
            except OverflowError:
                return 0.0, False
        return 0.0, False

    def get_bool(self, *keys: str) -> tuple[bool, bool]:
        """A ``bool`` at the path, or ``(False, False)``; no coercion from numbers or strings."""
        value, found = self.get(*keys)
        if found and isinstance(value, bool):
            return value, True
        return False, False

    def __contains__(self, key: object) -> bool:
        """Whether the top level has ``key``."""
        return key in self._data

    def keys(self) -> typing.KeysView[str]:
        """The top-level keys (a live view)."""
        return self._data.keys()

    # -- writing -------------------------------------------------------------------------------

    def set(self, keys: Sequence[str], value: Any) -> None:
        """Store ``value`` at the path ``keys``, creating intermediate objects.

        An intermediate key that is missing or holds a non-dict (scalar, list, null) gets a new ``{}``.
        The value is stored as given, not copied; it is only checked when serialized. Raises
        ``ParamInvalidError`` for an empty path, a bare ``str`` instead of a sequence, or a non-``str`` key.
        """
        if type(keys) is list and len(keys) == 1 and type(keys[0]) is str:  # the common case: one key
            self._data[keys[0]] = value
            return
        if isinstance(keys, (str, bytes)):
            raise ParamInvalidError(f"keys must be a sequence of str such as [{keys!r}], not a bare string")
        if not keys:
            raise ParamInvalidError("keys cannot be empty")
        for key in keys:
            if not isinstance(key, str):
                raise ParamInvalidError(f"every key must be a str, got {type(key).__name__}: {shown(key)}")
        current = self._data
        for key in keys[:-1]:
            child = current.get(key)
            if not isinstance(child, dict):
                child = {}
                current[key] = child
            current = child
        current[keys[-1]] = value

    def delete(self, *keys: str) -> None:
        """Remove the value at the path; a missing path or a non-dict on the way is a no-op."""
        if not keys:
            return
        current: Any = self._data
        for key in keys[:-1]:
            current = current.get(key)
            if not isinstance(current, dict):
                return
        current.pop(keys[-1], None)

    # -- copying and serializing ----------------------------------------------------------------

    def clone(self) -> JSONContext:
        """An independent deep copy (dicts and lists copied; other non-JSON values via ``deepcopy``)."""
        return JSONContext.from_map(_deep_copy_dict(self._data))

    def to_map(self) -> JSONObject:
        """The live underlying dict (no copy, Go parity): changes to it change this context."""
        return self._data

    def to_bytes(self) -> bytes:
        """Canonical UTF-8 JSON (see ``dumps_json``); ``ParamInvalidError`` if not serializable."""
        text = _encode(self._data)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return _ASCII_ENCODER.encode(self._data).encode("ascii")

    def to_bytes_without_error(self) -> bytes | None:
        """``to_bytes()``, or ``None`` when the context cannot be serialized."""
        try:
            return self.to_bytes()
        except ParamInvalidError:
            return None

    def unmarshal(self, cls: type[T]) -> T:
        """Build ``cls`` from the top-level keys; keys ``cls`` does not accept are ignored.

        * A class with ``model_validate`` (pydantic v2) is validated by it.
        * A dataclass: fields annotated ``int``/``float``/``str``/``bool``/``list``/``dict`` (also
          ``X | None`` and parametrized ``list[...]``/``dict[...]``) are type-checked (``bool`` is not an
          int, an ``int`` is accepted and converted for ``float``); a field typed as a dataclass or a
          pydantic model is built from a nested object. Other annotations are not checked.
        * Any other class is called with the keyword arguments its signature accepts.

        Values are deep-copied, so the result never shares state with the context. A mismatch, a
        missing required field or a constructor's ``TypeError``/``ValueError`` raises
        ``ParamInvalidError`` (original as ``__cause__``).
        """
        return _build(cls, _deep_copy_dict(self._data), type_name=getattr(cls, "__name__", repr(cls)))

    # -- dunder --------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if isinstance(other, JSONContext):
            return self._data == other._data
        if isinstance(other, dict):
            return self._data == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"JSONContext({self._data!r})"


def wrap_dict(m: JSONObject) -> JSONContext:
    """:meth:`JSONContext.from_map` for an ``m`` the caller knows is a ``dict`` (the engine's node
    context, a node's hot path): wraps it without copying, without the classmethod's call and check."""
    ctx = _new_object(JSONContext)
    ctx._data = m
    return ctx


_new_object = object.__new__


def merge_json_contexts(*ctxs: JSONContext | None) -> JSONContext:
    """A new context with the top-level keys of each non-``None`` context in order; later keys win.

    Shallow, as in Go: nested values are shared with the inputs, not merged or copied.
    """
    merged: JSONObject = {}
    for ctx in ctxs:
        if ctx is not None:
            merged.update(ctx._data)
    return JSONContext.from_map(merged)


# -- unmarshal helpers ------------------------------------------------------------------------------

_SIMPLE_TYPES: tuple[type, ...] = (int, float, str, bool, list, dict)


def _build(cls: type[T], data: JSONObject, *, type_name: str) -> T:
    validate = getattr(cls, "model_validate", None)
    try:
        if callable(validate):
            return typing.cast(T, validate(data))
        if dataclasses.is_dataclass(cls):
            return cls(**_dataclass_kwargs(cls, data, type_name))
        return cls(**_accepted_kwargs(cls, data))
    except ParamInvalidError:
        raise
    except (TypeError, ValueError) as exc:
        raise ParamInvalidError(f"cannot unmarshal the context into {type_name}: {exc}") from exc


def _dataclass_kwargs(cls: type[Any], data: JSONObject, type_name: str) -> dict[str, Any]:
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ParamInvalidError(f"cannot unmarshal into {type_name}: missing field {field.name!r}")
            continue
        kwargs[field.name] = _check_field(
            hints.get(field.name, Any), data[field.name], f"{type_name}.{field.name}"
        )
    return kwargs


def _type_hints(cls: type[Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: check only annotations that are real types
        return {f.name: f.type for f in dataclasses.fields(cls) if isinstance(f.type, type)}


def _check_field(annotation: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return value  # a real union: not checked
        annotation = rest[0]
        origin = typing.get_origin(annotation)
    target = origin if origin in (list, dict) else annotation
    if target in _SIMPLE_TYPES:
        return _check_simple(target, value, where)
    nested = callable(getattr(target, "model_validate", None)) or dataclasses.is_dataclass(target)
    if nested and isinstance(target, type) and isinstance(value, dict):
        return _build(target, value, type_name=where)
    return value


def _check_simple(target: type, value: Any, where: str) -> Any:
    if target is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            return float(value)
    elif target is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif target is list:
        ok = isinstance(value, (list, tuple))
        if ok:
            return list(value)
    else:
        ok = isinstance(value, target)
    if not ok:
        raise ParamInvalidError(
            f"cannot unmarshal {where}: expected {target.__name__}, "
            f"got {type(value).__name__} {shown(value):.80}"
        )
    return value


def _accepted_kwargs(cls: type[Any], data: JSONObject) -> dict[str, Any]:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: pass everything
        return data
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return data
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in data.items() if k in names}
