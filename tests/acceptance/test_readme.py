"""The README is executable: every ```python block runs (in order, each in its own namespace, in a fresh
subprocess with a temporary cwd), its set-up commands are the decided ones, its CLI commands exist, and
its Go table names every exported Go identifier."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GO_NAMES = pathlib.Path(__file__).resolve().parent / "data" / "go_api_names.txt"

DEMO_COMMAND = "python3 -m pip install -e . && python3 -m asyncflow demo"
TEST_COMMAND = 'python3 -m pip install -e ".[test]" && python3 -m pytest -n 3 --dist loadfile'
PG_PLACEHOLDER = "postgresql+asyncpg://app:secret@db.example.internal:5432/app"
REDIS_PLACEHOLDER = "redis://cache.example.internal:6379/0"

# Runs the blocks given as a JSON list; after a block that defines a FastAPI ``app`` it also starts
# the app's lifespan and calls its first POST route through httpx (no server, no network).
RUNNER = textwrap.dedent(
    """
    import asyncio, json, sys

    def exercise(app):
        import httpx
        from fastapi.routing import APIRoute

        route = next(r for r in app.routes if isinstance(r, APIRoute) and "POST" in r.methods)
        path = route.path.replace("{user_id}", "readme-user")

        async def go():
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://readme") as client:
                    response = await client.post(path)
                    print("FASTAPI", response.status_code, json.dumps(response.json()))

        asyncio.run(go())

    blocks = json.load(open(sys.argv[1], encoding="utf-8"))
    for number, code in enumerate(blocks, 1):
        namespace = {"__name__": f"readme_block_{number}"}
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)
        app = namespace.get("app")
        if app is not None and type(app).__name__ == "FastAPI":
            exercise(app)
        print(f"BLOCK {number} OK", flush=True)
    """
)


def _blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def _run_blocks(blocks: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    payload = cwd / "blocks.json"
    payload.write_text(json.dumps(blocks), encoding="utf-8")
    runner = cwd / "run_blocks.py"
    runner.write_text(RUNNER, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(runner), str(payload)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )


def test_python_blocks_run(tmp_path: pathlib.Path) -> None:
    blocks = [b for b in _blocks("python") if PG_PLACEHOLDER not in b]
    assert len(blocks) >= 3  # quickstart, FastAPI, testing
    result = _run_blocks(blocks, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "completed HELLO, ADA!" in result.stdout  # the quickstart's printed result
    assert re.search(r'FASTAPI 200 \{"instance_id": \d+\}', result.stdout), result.stdout
    assert f"BLOCK {len(blocks)} OK" in result.stdout
    assert (tmp_path / "quickstart.db").exists()


@pytest.mark.postgres
@pytest.mark.redis
def test_postgres_and_redis_block_runs(tmp_path: pathlib.Path, postgres_url: str, redis_url: str) -> None:
    from tests.acceptance.cli_helpers import scratch_database

    blocks = [b for b in _blocks("python") if PG_PLACEHOLDER in b]
    assert len(blocks) == 1
    assert REDIS_PLACEHOLDER in blocks[0]
    with scratch_database(postgres_url, f"readme_{uuid.uuid4().hex[:10]}") as url:
        code = blocks[0].replace(PG_PLACEHOLDER, url).replace(REDIS_PLACEHOLDER, redis_url)
        result = _run_blocks([code], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0 instances" in result.stdout


def test_setup_commands_are_the_decided_ones() -> None:
    bash = [b.strip() for b in _blocks("bash")]
    assert DEMO_COMMAND in bash
    assert TEST_COMMAND in bash
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_last = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")][-1]
    # .ci/run may add pip's -q; otherwise it runs the README's test command
    assert ci_last.replace(" -q ", " ") == TEST_COMMAND


def test_cli_commands_in_readme_exist() -> None:
    from asyncflow.cli.entry import build_parser

    parser = build_parser()
    used = set()
    for block in _blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["asyncflow"] and len(words) > 1:
                used.add(words[1])
                parser.parse_args([w for w in words[1:] if w != "&"])  # every command line parses
    assert {"init-db", "worker", "ls", "show", "event", "restart", "cancel", "graph"} <= used


def _go_names() -> set[str]:
    """The Go API's exported names, kept in the repository (tests read nothing outside it)."""
    lines = GO_NAMES.read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_go_table_maps_every_go_name() -> None:
    names = _go_names()
    assert len(names) >= 120
    assert {"NewWorkflowService", "AddNodeExternalEvent", "ErrWorkflowParamInvalid", "ToRawMessage"} <= names
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Coming from simple-workflow (Go)") :]
    go_cells = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+)", row.split("|")[1])
    }
    missing = sorted(names - go_cells)
    assert missing == []
