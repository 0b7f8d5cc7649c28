"""Validation and canonical JSON shared by every repo, so all backends accept and refuse the same values.

Contexts are stored as canonical compact JSON text (sorted keys, no spaces, UTF-8, no NaN). Whatever a
backend cannot store faithfully is refused with ``ParamInvalidError`` *before* the database is touched:
a NUL character (PostgreSQL ``text``/``jsonb`` cannot hold it), a lone surrogate (not encodable as
UTF-8), NaN/infinity, non-JSON values, and integers outside the signed 64-bit range of the columns.

Besides JSON's own types, a context may hold ``enum.Enum`` members (stored as their value) and
``uuid.UUID`` values (stored as their string); like tuples, they read back as what they were stored as.

Encoding and decoding take orjson's C code when it gives the standard library's document: orjson
encodes a context first, and whatever it cannot encode exactly as :mod:`json` would (a key that is not
a string, an integer beyond 64 bits, a subclass of a JSON type, a document nesting too deep, and any
``null``, which is how orjson writes NaN) goes through :mod:`json`, which decides. Numbers may be
written in another of their shortest forms (orjson 3.9 writes ``1e16`` where 3.13 and :mod:`json`
write ``1e+16``): the same values. Without orjson (a platform without its wheel) :mod:`json` does
all of it.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import uuid
from collections.abc import Iterable
from typing import Any

from .._text import shown
from ..errors import ParamInvalidError
from ..records import Pager, QueryTaskInstanceParams, QueryWorkflowInstanceParams

logger = logging.getLogger(__name__)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

try:
    import orjson
except ImportError:  # pragma: no cover - a dependency; a platform without its wheel uses json alone
    orjson = None  # type: ignore[assignment]


def _more_types(value: object) -> object:
    """What :mod:`json` stores for the types contexts accept beyond JSON's (as orjson does)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    sort_keys=True,
    separators=(",", ":"),
    check_circular=True,
    default=_more_types,
)
_ORJSON_OPTIONS = (
    0
    if orjson is None
    else orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
"""Sorted keys; subclasses of JSON types, datetimes and dataclasses refused (``json`` then decides)."""
_LONG_NUMBER = re.compile(r"\d{19}")
"""Nineteen digits in a row: maybe an integer beyond 64 bits, which orjson would read as a float."""
# ``\u0000`` in JSON text is a NUL only when the backslash itself is not escaped (``\\u0000`` is text).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def check_text(value: object, what: str) -> str:
    """Return ``value`` if it is a ``str`` every backend can store, else raise ``ParamInvalidError``."""
    if not isinstance(value, str):
        raise ParamInvalidError(f"{what} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        raise ParamInvalidError(f"{what} must not contain a NUL character (\\x00): {value!r}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParamInvalidError(f"{what} is not valid Unicode (lone surrogate): {value!r}") from exc
    return value


TEXT_JSON: dict[str, str] = {}
"""Texts :func:`check_text` accepted that are identifiers (node names, statuses: they repeat in every
step), each with its JSON string (``'"name"'``: nothing to escape). A step's values found here, of type
``str``, skip the checks; PostgreSQL's step JSON takes their encoding from here. Bounded by
:data:`TEXT_JSON_MAX` (cleared when full)."""
TEXT_JSON_MAX = 4096


def checked_name(value: object, what: str) -> str:
    """:func:`check_text`, remembering an accepted identifier in :data:`TEXT_JSON`."""
    text = check_text(value, what)
    if type(text) is str and text.isidentifier():
        if len(TEXT_JSON) >= TEXT_JSON_MAX:
            TEXT_JSON.clear()
        TEXT_JSON[text] = f'"{text}"'
    return text


def check_texts(values: Iterable[object], what: str) -> tuple[str, ...]:
    """:func:`check_text` over a sequence (a lone ``str`` is refused: it is not a list of strings)."""
    if isinstance(values, str):
        raise ParamInvalidError(f"{what} must be a sequence of strings, not a string")
    return tuple(check_text(v, what) for v in values)


def check_int(value: object, what: str, *, minimum: int = INT64_MIN) -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) in ``[minimum, 2**63 - 1]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamInvalidError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum or value > INT64_MAX:
        raise ParamInvalidError(f"{what} is out of range [{minimum}, {INT64_MAX}]: {shown(value)}")
    return value


def check_ints(values: Iterable[object], what: str) -> tuple[int, ...]:
    """:func:`check_int` over a sequence."""
    return tuple(check_int(v, what) for v in values)


if orjson is not None:
    orjson_dumps = orjson.dumps
    orjson_loads = orjson.loads
else:  # pragma: no cover - a platform without orjson's wheel

    def orjson_dumps(value: object, option: int = 0) -> bytes:
        """Without orjson: every caller's fast path gives up (as on orjson's own ``JSONEncodeError``,
        a ``TypeError``) and takes :func:`encode_context`."""
        raise TypeError("orjson is not installed")

    orjson_loads = json.loads  # never called: without orjson no text is ``plain``

ORJSON_OPTIONS = _ORJSON_OPTIONS


def dumps_context(value: object, what: str) -> str:
    """Serialize a context ``dict`` to canonical compact JSON, or raise ``ParamInvalidError``."""
    return encode_context(value, what)[0]


def encode_context(value: object, what: str) -> tuple[str, bool]:
    """:func:`dumps_context`, and whether orjson wrote the text: then it holds no integer orjson would
    read back as a float, and ``copy_context(text, plain=True)`` reads it without looking."""
    if not isinstance(value, dict):
        raise ParamInvalidError(f"{what} must be a dict, got {type(value).__name__}")
    if orjson is not None:
        try:
            raw = orjson.dumps(value, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            pass  # json decides (see the module's docstring)
        else:
            text = raw.decode()  # orjson writes UTF-8 only (a lone surrogate fails above)
            # NaN and infinities are ``null`` in orjson: json refuses them (searched in the text:
            # ``bytes in bytes`` first tries the needle as an int, raising and clearing a TypeError)
            if "null" not in text:
                if "\\u0000" in text and _NUL_ESCAPE.search(text):
                    raise ParamInvalidError(
                        f"{what} must not contain a NUL character (\\x00) in a key or string"
                    )
                return text, True
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ParamInvalidError(f"{what} is not JSON-serializable: {exc}") from exc
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise ParamInvalidError(f"{what} must not contain a NUL character (\\x00) in a key or string")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParamInvalidError(f"{what} holds a string that is not valid Unicode: {exc}") from exc
    return text, False


def loads_context(raw: object, column: str, row_id: object) -> dict[str, Any]:
    """Parse a stored context; anything but a JSON object becomes ``{}`` with a WARNING (never raises).

    PostgreSQL's driver hands back decoded ``jsonb`` (already a ``dict``); SQLite hands back text.
    ``NULL`` (a row written by someone else) is an empty context without a warning.
    """
    if isinstance(raw, dict):
        return raw
    if raw is None:
        return {}
    if isinstance(raw, str | bytes | bytearray):
        try:
            parsed = _read_json(raw) if isinstance(raw, str) else json.loads(raw)
        except (ValueError, RecursionError) as exc:
            logger.warning(
                "%s of row %s holds invalid JSON; read as an empty context: %s", column, row_id, exc
            )
            return {}
        if isinstance(parsed, dict):
            return parsed
        raw = parsed
    logger.warning(
        "%s of row %s holds a JSON %s, not an object; read as an empty context",
        column,
        row_id,
        type(raw).__name__,
    )
    return {}


def copy_context(text: str, plain: bool = False) -> dict[str, Any]:
    """A fresh ``dict`` from canonical JSON text (what a read of the stored value would return).

    ``plain``: orjson wrote the text (:func:`encode_context`), so orjson reads it without the search
    for 19-digit runs (which costs more than reading a small context)."""
    if plain and orjson is not None:  # _read_json's orjson path, without its search and its call
        try:
            result: dict[str, Any] = orjson.loads(text)
            return result
        except orjson.JSONDecodeError:
            pass  # not orjson's text after all: json decides
    result = _read_json(text)
    return result


def _read_json(text: str) -> Any:
    """``json.loads(text)``, through orjson where it reads the same: not with a 19-digit run (orjson
    reads an integer beyond 64 bits as a float), and not what orjson refuses (nested deeper than it
    reads, ``NaN``, lone surrogates: ``json`` decides)."""
    if orjson is not None and _LONG_NUMBER.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def page_window(pager: Pager | None) -> tuple[int, int] | None:
    """``(offset, limit)`` of a pager with the defaults applied, or ``None`` for every row."""
    if pager is None:
        return None
    if not isinstance(pager, Pager):
        raise ParamInvalidError(f"page must be a Pager or None, got {type(pager).__name__}")
    page = check_int(pager.page, "Pager.page", minimum=0)
    size = check_int(pager.size, "Pager.size", minimum=0)
    if pager.no_limit:
        return None
    page, size = page or 1, size or 10
    return check_int((page - 1) * size, "Pager offset (page - 1) * size", minimum=0), size


def validate_instance_query(params: QueryWorkflowInstanceParams) -> None:
    """Refuse filters a backend could not evaluate alike (NUL characters, out-of-range ints)."""
    if not isinstance(params, QueryWorkflowInstanceParams):
        raise ParamInvalidError(f"expected QueryWorkflowInstanceParams, got {type(params).__name__}")
    for name in ("workflow_instance_id", "id_greater_than", "task_id"):
        value = getattr(params, name)
        if value is not None:
            check_int(value, name)
    check_texts(params.workflow_type_in, "workflow_type_in")
    check_texts(params.status_in, "status_in")
    if params.business_id is not None:
        check_text(params.business_id, "business_id")
    page_window(params.page)


def validate_task_query(params: QueryTaskInstanceParams) -> None:
    """As :func:`validate_instance_query`, for node queries."""
    if not isinstance(params, QueryTaskInstanceParams):
        raise ParamInvalidError(f"expected QueryTaskInstanceParams, got {type(params).__name__}")
    for name in ("id", "workflow_instance_id", "id_greater_than"):
        value = getattr(params, name)
        if value is not None:
            check_int(value, name)
    if params.task_type is not None:
        check_text(params.task_type, "task_type")
    check_texts(params.status_in, "status_in")
    page_window(params.page)
