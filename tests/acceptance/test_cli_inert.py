"""Issue 13, item 4: terminal and diagram output is inert.

Control and bidi characters in stored ids, business ids, contexts and errors are escaped in ``ls``,
``show``, ``graph --format text`` and the CLI's log lines; a stored status holding a newline cannot
add a Mermaid or DOT statement.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import re

from sqlalchemy import text

from asyncflow.cli.entry import _ScrubbingFormatter, _ScrubbingJSONFormatter
from asyncflow.demo.order import WORKFLOW_TYPE, make_registry, sample_order
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo

from .cli_helpers import call_cli

EVIL = "\x1b[2J\x1b[31mRED\x07\u202egnp.exe\u2066x\r\nFORGED LINE"
BAD_STATUS = 'running"]\n    click n0 href "https://evil.example"\n    n9["'
RAW = ("\x1b", "\x07", "\u202e", "\u2066", "\r")


def _evil_db(tmp_path: pathlib.Path) -> tuple[str, int]:
    url = f"sqlite+aiosqlite:///{tmp_path}/evil.db"

    async def go() -> int:
        repo = SQLAlchemyWorkflowRepo(url)
        try:
            await repo.create_schema()
            svc = WorkflowService(repo, LocalWorkflowLock(), make_registry())
            context = sample_order(1, 3) | {"note": EVIL}
            inst = await svc.create_workflow(WORKFLOW_TYPE, f"ORD-{EVIL}", context=context)
            await svc.run_workflow(inst.id)  # charge_payment fails once: a node with a last error
            async with repo.engine.begin() as conn:
                await conn.execute(
                    text(
                        "UPDATE task_instance SET node_context = json_set(node_context, "
                        "'$.system.last_error', :e) WHERE workflow_instance_id = :i"
                    ),
                    {"e": f"boom {EVIL}", "i": inst.id},
                )
                await conn.execute(
                    text("UPDATE task_instance SET status = :s WHERE task_type = 'validate_order'"),
                    {"s": BAD_STATUS},
                )
            return inst.id
        finally:
            await repo.aclose()

    return url, asyncio.run(go())


def _assert_inert(output: str) -> None:
    for char in RAW:
        assert char not in output, (char, output)
    assert not any(line.lstrip().startswith("FORGED") for line in output.splitlines())  # no new line
    assert "\\u001b" in output and "\\u202e" in output  # escaped, visible


def test_ls_and_show_escape_control_and_bidi_characters(tmp_path: pathlib.Path) -> None:
    db, instance_id = _evil_db(tmp_path)
    listed = call_cli("ls", "--db", db, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    _assert_inert(listed.stdout)
    for extra in ([], ["--context"], ["--json"]):
        shown = call_cli("show", str(instance_id), "--db", db, *extra, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        _assert_inert(shown.stdout)
        assert not any(line.startswith("FORGED") for line in shown.stdout.splitlines())
    listed_json = call_cli("ls", "--db", db, "--json", cwd=tmp_path)
    _assert_inert(listed_json.stdout)


def test_a_stored_status_cannot_add_diagram_statements(tmp_path: pathlib.Path) -> None:
    db, instance_id = _evil_db(tmp_path)
    mermaid = call_cli("graph", "--instance", str(instance_id), "--db", db, cwd=tmp_path)
    assert mermaid.returncode == 0, mermaid.stderr
    node, edge = r'    n\d+(\(\[|\[)".*"(\]\)|\])', r"    n\d+ --> n\d+"
    statement = re.compile(rf"^(flowchart TD|{node}|{edge}|    classDef \w+ .*|    class [n\d,]+ \w+)$")
    for line in mermaid.stdout.splitlines():
        assert statement.match(line), line
    assert "click" not in "".join(
        line for line in mermaid.stdout.splitlines() if not line.startswith("    n")
    )
    dot = call_cli("graph", "--instance", str(instance_id), "--db", db, "--format", "dot", cwd=tmp_path)
    assert dot.returncode == 0, dot.stderr
    body = dot.stdout.splitlines()[3:-1]
    for line in body:  # every line is one node or one edge statement; quotes balance
        assert re.fullmatch(r'    "(?:[^"\\]|\\.)*"( -> "(?:[^"\\]|\\.)*"| \[.*\]);', line), line
    plain = call_cli("graph", "--instance", str(instance_id), "--db", db, "--format", "text", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert not any(line.lstrip().startswith("click") for line in plain.stdout.splitlines())


def test_log_lines_are_one_line_and_inert() -> None:
    formatter = _ScrubbingFormatter("%(levelname)s %(message)s", ["redis://:pw123@h/0"])
    record = logging.LogRecord(
        "asyncflow.engine", logging.WARNING, __file__, 1, "node %s failed: %s", ("A", EVIL), None
    )
    line = formatter.format(record)
    assert "\n" not in line and all(char not in line for char in RAW), line
    assert line.startswith("WARNING node A failed: \\u001b[2J")
    try:
        raise RuntimeError(f"worker error {EVIL} near redis://:pw123@h/0")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    with_traceback = formatter.format(record)
    assert "Traceback" in with_traceback and "\x1b" not in with_traceback and "pw123" not in with_traceback


def test_json_log_lines_hide_a_password_that_json_escapes() -> None:
    """``--log-format json`` escapes ``"`` and ``\\`` (and control characters) in a password: the
    redaction must find the secret in its escaped form too, in the message and in a traceback."""
    for password in ('pa"ss9word', "pa\\ss9word", "pa\tss9word"):
        url = f"redis://:{password}@h:6379/0"
        formatter = _ScrubbingJSONFormatter([url])
        record = logging.LogRecord(
            "asyncflow.lock", logging.ERROR, __file__, 1, "cannot reach %s", (url,), None
        )
        try:
            raise ConnectionError(f"connect failed: {url}")
        except ConnectionError:
            import sys

            record.exc_info = sys.exc_info()
        line = formatter.format(record)
        entry = json.loads(line)
        for shown in (line, entry["message"], entry["exception"]):
            assert "ss9word" not in shown, (password, shown)
        assert entry["message"] == "cannot reach redis://:***@h:6379/0"
