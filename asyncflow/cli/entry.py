"""``asyncflow``: the command line (argument parsing, logging set-up, error messages, exit codes).

Exit codes: 0 success; 1 not found, refused by the current state, busy, a database/Redis that cannot
be reached, or an unexpected failure; 2 usage errors and bad input; 130 interrupted; 141 the reader of
the output went away (broken pipe). Every error prints one line on stderr (``asyncflow: error: ...``),
never a traceback (``-vv`` logs it at DEBUG) and never a URL's password.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .._text import inert, inert_lines
from .._urls import scrub_secrets
from ..engine.retention import PURGEABLE_STATUSES
from ..errors import (
    AsyncflowError,
    ConfigError,
    ConfigNotFoundError,
    InstanceNotFoundError,
    InvalidStateError,
    LockFailedError,
    ParamInvalidError,
    StoreError,
    TaskInstanceNotFoundError,
)
from ..status import InstanceStatus
from .backend import DB_ENV, DEFAULT_DB_URL, REDIS_ENV, CLIError, resolve_db_url, resolve_redis_url
from .logjson import JSONFormatter
from .metrics import metrics_address
from .purge import cmd_purge, duration

__all__ = ["build_parser", "main"]

logger = logging.getLogger("asyncflow.cli")

BROKEN_PIPE_EXIT = 141
"""Exit code when the reader of the output goes away, as for a command killed by SIGPIPE (128 + 13)."""

_EPILOG = f"""\
The database is --db URL, else ${DB_ENV}, else {DEFAULT_DB_URL} (a file in the current directory).
The instance lock is Redis with --redis URL (or ${REDIS_ENV}); else, on PostgreSQL, a lock kept in
the database itself (every process on one database shares it: no Redis needed); else (SQLite) local
to the process. Exit codes: 0 ok, 1 not found / refused / unreachable, 2 bad usage or input.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port between 1 and 65535, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``asyncflow`` command."""

    # Options accepted before and after the subcommand: the sub-parser copies default to SUPPRESS so a
    # value given before the subcommand is not overwritten.
    def common(suppress: bool) -> argparse.ArgumentParser:
        parent = argparse.ArgumentParser(add_help=False)
        default = argparse.SUPPRESS if suppress else None
        parent.add_argument("--db", metavar="URL", default=default, help=f"database URL (${DB_ENV})")
        parent.add_argument(
            "--redis", metavar="URL", default=default, help=f"Redis URL for the lock (${REDIS_ENV})"
        )
        parent.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=argparse.SUPPRESS if suppress else 0,
            help="more logging (-v info, -vv debug)",
        )
        return parent

    parser = argparse.ArgumentParser(
        prog="asyncflow",
        description="Run and operate asyncflow workflows.",
        epilog=_EPILOG,
        parents=[common(False)],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    shared = [common(True)]

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=shared)

    demo = add("demo", "run the sample order workflow N times with a live progress line and a summary")
    demo.add_argument("-n", type=_positive_int, default=200, help="instances to run (default 200)")
    demo.add_argument("--concurrency", type=_positive_int, default=64, help="passes at once (default 64)")
    demo.add_argument("--timeout", type=_seconds, default=300.0, help="give up after this many seconds")
    demo.add_argument("--no-progress", action="store_true", help="no progress output, only the summary")

    add("init-db", "create the asyncflow tables or upgrade them to this version (idempotent)")
    add("migrate", "the same as init-db: create the asyncflow tables or upgrade them (idempotent)")

    worker = add("worker", "run a driver on APP's workflows until SIGINT/SIGTERM (then stop gracefully)")
    worker.add_argument("app", metavar="APP", help="module:attribute giving a Registry or WorkflowService")
    worker.add_argument("--concurrency", type=_positive_int, default=64, help="passes at once (default 64)")
    worker.add_argument("--poll-interval", type=_seconds, default=1.0, help="seconds between looks when idle")
    worker.add_argument("--type", action="append", metavar="TYPE", help="only these workflow types")
    worker.add_argument("--grace", type=_seconds, default=10.0, help="seconds in-flight passes get at stop")
    worker.add_argument(
        "--metrics-port",
        type=metrics_address,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (PORT alone: every interface; "
        "needs asyncflow[prometheus])",
    )
    worker.add_argument(
        "--retain",
        type=duration,
        metavar="AGE",
        help="purge finished instances not updated for AGE (30d, 12h, ...) in the background",
    )
    worker.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines as text (default) or JSON"
    )

    ls = add("ls", "list workflow instances, newest first")
    ls.add_argument("--type", action="append", metavar="TYPE", help="workflow type (repeatable)")
    ls.add_argument(
        "--status", action="append", choices=[s.value for s in InstanceStatus], help="status (repeatable)"
    )
    ls.add_argument("--business-id", metavar="ID", help="business id (exact)")
    ls.add_argument("--limit", type=_positive_int, default=20, help="rows per page (default 20)")
    ls.add_argument("--page", type=_positive_int, default=1, help="page number (default 1)")
    ls.add_argument("--oldest-first", action="store_true", help="ascending ids")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")

    show = add("show", "one instance and every node: status, fail count, timestamps, last error")
    show.add_argument("id", type=_positive_int, metavar="ID")
    show.add_argument("--html", metavar="FILE", help="write a self-contained HTML page of the DAG instead")
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    show.add_argument("--context", action="store_true", help="also print every node's context")
    show.add_argument("--app", metavar="APP", help="module:attribute that loads the workflow definitions")

    cancel = add("cancel", "cancel an instance and its unfinished nodes")
    cancel.add_argument("id", type=_positive_int, metavar="ID")

    purge = add(
        "purge", "delete finished instances (and their nodes) last updated longer ago than --older-than"
    )
    purge.add_argument(
        "--older-than", type=duration, required=True, metavar="AGE", help="e.g. 30d, 12h, 90m or seconds"
    )
    purge.add_argument(
        "--status",
        action="append",
        choices=list(PURGEABLE_STATUSES),
        help="status (repeatable; default: all)",
    )
    purge.add_argument("--type", action="append", metavar="TYPE", help="workflow type (repeatable)")
    purge.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    purge.add_argument(
        "--limit", type=_positive_int, metavar="N", help="delete at most N instances (oldest ids first)"
    )

    restart = add("restart", "restart a failed/canceled instance, or one node and its descendants")
    restart.add_argument("id", type=_positive_int, metavar="ID")
    restart.add_argument("--node", metavar="TASK_TYPE", help="restart this node and everything after it")
    restart.add_argument("--force", action="store_true", help="with --node: also when the instance is over")
    restart.add_argument("--context", metavar="JSON", help="new workflow context (a JSON object)")
    restart.add_argument(
        "--clear-event",
        action="store_true",
        help="with --node: drop the node's stored event (it waits for a new one)",
    )
    restart.add_argument(
        "--timeout", type=_seconds, help="with --node: seconds to wait for a busy instance (default 10)"
    )
    restart.add_argument("--app", metavar="APP", help="module:attribute that loads the workflow definitions")

    event = add("event", "store an external event on a node (it wakes the instance)")
    event.add_argument("id", type=_positive_int, metavar="ID")
    event.add_argument("node", metavar="NODE", help="task type of the node")
    event.add_argument("--ts", type=_integer, help="event version (default: now in unix milliseconds)")
    event.add_argument("--content", metavar="JSON", help="event content, any JSON value (default null)")
    event.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for a busy instance")

    graph = add("graph", "draw a workflow type or an instance (Mermaid, Graphviz DOT or text)")
    graph.add_argument("type", nargs="?", metavar="TYPE", help="workflow type")
    graph.add_argument(
        "--instance", type=_positive_int, metavar="ID", help="an instance, nodes coloured by status"
    )
    graph.add_argument(
        "--format", choices=("mermaid", "dot", "text"), default="mermaid", help="default mermaid"
    )
    graph.add_argument("--app", metavar="APP", help="module:attribute that loads the workflow definitions")
    graph.add_argument("--config", metavar="FILE", help="a workflow config JSON file (Go shape) to draw")

    web = add("dashboard", "serve the web dashboard (read-only unless --allow-actions); needs asyncflow[web]")
    web.add_argument("--app", metavar="APP", help="module:attribute that loads the workflow definitions")
    web.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    web.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    web.add_argument(
        "--allow-actions", action="store_true", help="let anyone who reaches it cancel, restart, send events"
    )
    _add_starting(add)
    return parser


def _add_starting(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``start`` and ``schedules`` (asyncflow.cli.starting)."""
    from .starting import duration, moment

    start = add("start", "create a workflow instance (optionally delayed, unique, and waited for)")
    start.add_argument("type", metavar="TYPE", help="workflow type")
    start.add_argument("business_id", metavar="BUSINESS_ID", help="business id")
    start.add_argument(
        "--app", required=True, metavar="APP", help="module:attribute giving a Registry or service"
    )
    start.add_argument("--context", metavar="JSON", help="workflow context (a JSON object)")
    when = start.add_mutually_exclusive_group()
    when.add_argument(
        "--start-in", type=duration, metavar="DURATION", help="start later: 30, 90s, 10m, 2h, 1d"
    )
    when.add_argument(
        "--start-at", type=moment, metavar="ISO", help="start at (ISO 8601 with Z or an offset)"
    )
    start.add_argument(
        "--unique", choices=("active", "always"), help="no new instance if one exists (exit 0)"
    )
    start.add_argument("--wait", action="store_true", help="wait for the end (exit 1 unless completed)")
    start.add_argument("--timeout", type=_seconds, metavar="S", help="with --wait: give up after S seconds")

    schedules = add("schedules", "list APP's cron schedules: next tick and last fired tick")
    schedules.add_argument(
        "--app", required=True, metavar="APP", help="module:attribute giving a Registry or service"
    )


class _ScrubbingFormatter(logging.Formatter):
    """Log lines (tracebacks included) with the passwords of the command's URLs hidden and control and
    bidi characters escaped (worker logs quote ids, business ids and workers' errors)."""

    def __init__(self, fmt: str, urls: Sequence[str | None]) -> None:
        super().__init__(fmt)
        self._urls = [u for u in urls if u]

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = inert(record.message)  # one record, one line: stored text cannot add lines
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return inert_lines(super().formatException(ei))

    def format(self, record: logging.LogRecord) -> str:
        return scrub_secrets(super().format(record), *self._urls)


def _urls(args: argparse.Namespace) -> list[str | None]:
    return [resolve_db_url(getattr(args, "db", None)), resolve_redis_url(getattr(args, "redis", None))]


class _ScrubbingJSONFormatter(JSONFormatter):
    """``--log-format json`` lines with the same redaction and escaping (``\\uXXXX`` is valid JSON).

    The line is JSON text, where a ``"``, a ``\\`` or a control character of a password appears
    escaped: each URL is scrubbed in its JSON-escaped form as well as raw."""

    def __init__(self, urls: Sequence[str | None]) -> None:
        super().__init__()
        raw = [u for u in urls if u]
        escaped = [json.dumps(u, ensure_ascii=False)[1:-1] for u in raw]
        self._urls = raw + [e for e, u in zip(escaped, raw, strict=True) if e != u]

    def format(self, record: logging.LogRecord) -> str:
        return inert(scrub_secrets(super().format(record), *self._urls))


def _configure_logging(
    verbose: int, command: str, urls: Sequence[str | None] = (), log_format: str = "text"
) -> None:
    base = logging.INFO if command in ("worker",) else logging.WARNING
    level = {0: base, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_ScrubbingJSONFormatter(urls))
    else:
        handler.setFormatter(_ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", urls))
    logging.basicConfig(level=level, handlers=[handler])


def _stdout_gone() -> int:
    """The reader of our output went away (``asyncflow show 7 | head -1``): say so once, quietly exit."""
    try:  # later writes (and the interpreter's final flush) go nowhere instead of failing again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests capture it): nothing to redirect
        pass
    with contextlib.suppress(OSError):
        print("asyncflow: error: output closed early (broken pipe)", file=sys.stderr)
    return BROKEN_PIPE_EXIT


def _error_code(error: BaseException) -> tuple[int, str]:
    """Exit code and message for an expected error (``(0, "")`` if it is not one)."""
    if isinstance(error, CLIError):
        return error.code, error.message
    if isinstance(error, ParamInvalidError | ConfigError):
        return 2, str(error)
    if isinstance(error, InstanceNotFoundError | TaskInstanceNotFoundError | ConfigNotFoundError):
        return 1, str(error)
    if isinstance(error, LockFailedError):
        return 1, f"{error} (the instance is busy: try again, or raise --timeout)"
    if isinstance(error, InvalidStateError | StoreError | AsyncflowError):
        return 1, str(error)
    if isinstance(error, ExceptionGroup):
        parts = [_error_code(e) for e in error.exceptions]
        if all(code for code, _ in parts):
            return max(code for code, _ in parts), "; ".join([str(error.message), *(m for _, m in parts)])
    return 0, ""


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from ..demo.runner import run_demo_command

        return await run_demo_command(args)
    if args.command == "worker":
        from .worker import run_worker

        return await run_worker(args)
    if args.command == "dashboard":
        from .dashboard import run_dashboard

        return await run_dashboard(args)
    if args.command in ("start", "schedules"):
        from .starting import cmd_schedules, cmd_start

        return await (cmd_start if args.command == "start" else cmd_schedules)(args)
    if args.command == "purge":
        return await cmd_purge(args)
    from .commands import COMMANDS

    return await COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"asyncflow {__version__}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    urls = _urls(args)
    _configure_logging(args.verbose, args.command, urls, getattr(args, "log_format", "text"))
    try:
        return asyncio.run(_dispatch(args))
    except KeyboardInterrupt:
        print("asyncflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_gone()
    except Exception as error:
        code, message = _error_code(error)
        if not code:  # a bug or a failure nobody foresaw: still one line (the traceback with -vv)
            code = 1
            detail = str(error) or "no details"
            message = f"unexpected {type(error).__name__}: {detail} (run with -vv for the traceback)"
            logger.debug("unexpected error, details", exc_info=True)
        else:
            logger.debug("expected error, details", exc_info=True)
        print(f"asyncflow: error: {inert(scrub_secrets(message, *urls))}", file=sys.stderr)
        return code
