"""Text made inert for terminals, logs and diagrams: control characters (C0, DEL, C1), line and
paragraph separators and the bidirectional-text controls become visible ``\\uXXXX`` escapes, so a stored
id, business id, context or error cannot move the cursor, recolour the terminal, hide text, reorder a
line (Trojan Source) or start a new line of a diagram or a log.

The escapes are also valid JSON string escapes: JSON text stays valid JSON after :func:`inert`.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "MAX_ID_BYTES",
    "SHORT_ID",
    "dot_text",
    "inert",
    "inert_lines",
    "mermaid_text",
    "shown",
    "too_long",
    "unstorable",
]

_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}]")
_UNSAFE_KEEP_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029{_BIDI}]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def inert(text: str) -> str:
    """``text`` with every control, separator and bidi character written as ``\\uXXXX`` (newlines too)."""
    return _UNSAFE.sub(_escape, text)


def inert_lines(text: str) -> str:
    """:func:`inert`, but ``\\n`` kept (for multi-line text such as a traceback)."""
    return _UNSAFE_KEEP_NEWLINE.sub(_escape, text)


def mermaid_text(text: str) -> str:
    """``text`` for a quoted Mermaid label: on one line, inert, ``#"<>`` as Mermaid entity codes."""
    text = inert(" ".join(text.splitlines()))
    for raw, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):  # '#' first
        text = text.replace(raw, code)
    return text


def dot_text(text: str) -> str:
    """``text`` as a quoted Graphviz DOT string (inert; a newline is DOT's ``\\n``)."""
    escaped = inert_lines(text.replace("\r", "")).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


_LONG_INT_BITS = 256
"""Ints of more bits (78 digits or more) are written as their number of digits by :func:`shown`."""


def shown(value: object) -> str:
    """``repr(value)`` for an error message, an int of over 256 bits written as ``an int of N digits``.

    Python refuses to write an int of over 4,300 digits as text (``sys.get_int_max_str_digits()``):
    ``f"{value}"`` raised ``ValueError`` while the message of the intended typed error was being built.
    A value that still cannot be written (such an int inside a list) is named by its type.
    """
    if isinstance(value, int) and value.bit_length() > _LONG_INT_BITS:
        size = abs(value)
        digits = int(math.log10(size))  # may be one too many just below a power of ten
        if size < 10**digits:
            digits -= 1
        return f"{'a negative' if value < 0 else 'an'} int of {digits + 1} digits"
    try:
        return repr(value)
    except ValueError:
        return f"a {type(value).__name__} too long to write"


def unstorable(text: str) -> str | None:
    """Why a database cannot store ``text`` (a NUL, a lone surrogate), or ``None``."""
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (not valid Unicode text)"
    return None


MAX_ID_BYTES = 1024
"""The most bytes (UTF-8) of a business id, a workflow type, a node id or a schedule's business ids.

PostgreSQL refuses a btree index entry of over about 2,700 bytes: a longer business id failed there
alone (SQLite and the memory repo stored it). The unique indexes hold a type and a business id
together, the child index a node id and a key: 1,024 bytes each keeps every entry below the limit."""

SHORT_ID = MAX_ID_BYTES // 4
"""Ids of at most this many characters fit whatever they hold (UTF-8 takes at most 4 bytes a character)."""


def too_long(text: str) -> str | None:
    """Why ``text`` cannot be an id (over :data:`MAX_ID_BYTES` bytes of UTF-8), or ``None``.

    Encodes only a non-ASCII text of more than :data:`SHORT_ID` characters (a length check otherwise).
    """
    size = len(text)
    if size <= SHORT_ID:
        return None
    if size > MAX_ID_BYTES or (
        not text.isascii() and len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES
    ):
        return f"must be at most {MAX_ID_BYTES} bytes of UTF-8 (the longest id asyncflow stores)"
    return None
