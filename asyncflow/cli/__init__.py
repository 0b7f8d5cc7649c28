"""The ``asyncflow`` command line: ``demo``, ``init-db``, ``worker``, ``ls``, ``show``, ``cancel``,
``restart``, ``event``, ``graph``. See ``asyncflow --help`` and docs/cli.md.

``main`` is imported lazily so that importing a helper module of this package stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    from .entry import main as _main

    return _main(argv)
