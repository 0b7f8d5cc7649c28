"""The benchmark scenarios as pytest tests, with a small N, plus self-tests of the harness.

The scenario tests are marked ``benchmark``, which the default test run deselects (and the default
``testpaths`` does not even reach this folder): run them with ``python -m pytest benchmarks -m benchmark``.
The harness self-tests at the bottom are unmarked and fast (``python -m pytest benchmarks``).
They check what the benchmark reports, never how fast anything is.
"""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report
from benchmarks.databases import PgAdmin, sqlite_file
from benchmarks.harness import (
    LatencySampler,
    ResourceProbe,
    RunMeasurement,
    SqlCommitCounter,
    percentile,
    summarize,
)
from benchmarks.isolated import RunFailedError, run_module
from benchmarks.reference_dbos import dbos_version, run_dbos_once
from benchmarks.reference_floor import COMMITS_PER_WORKFLOW, run_floor_postgres, run_floor_sqlite
from benchmarks.runner import (
    ALL_SCENARIOS,
    BenchOptions,
    _plan,
    asyncflow_unavailable,
    describe_error,
    parse_list,
    scenario_unavailable,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
N = 20
C = 4


def _needs_asyncflow(mode: str) -> None:
    reason = asyncflow_unavailable(mode)
    if reason:
        pytest.skip(reason)


def _check_measurement(m: RunMeasurement, n: int) -> None:
    assert m.n == n
    assert m.elapsed_s > 0
    assert m.cpu_s > 0
    assert m.peak_rss_bytes > 10 * 2**20
    assert len(m.latencies_s) == n  # stride 1 below MAX_LATENCY_SAMPLES
    assert all(latency > 0 for latency in m.latencies_s)


async def _asyncflow(
    scenario: str, mode: str, backend: str, lock: str = "local", **kw: Any
) -> RunMeasurement:
    from benchmarks.asyncflow_runs import AsyncflowRun, run_asyncflow_once

    run = AsyncflowRun(scenario=scenario, mode=mode, backend=backend, lock=lock, n=N, concurrency=C)
    return await run_asyncflow_once(run, **kw)


# -- the scenarios -----------------------------------------------------------------------------------


@pytest.mark.benchmark
@pytest.mark.parametrize("mode", ["direct", "driver"])
@pytest.mark.parametrize("scenario", ALL_SCENARIOS)
async def test_scenario_sqlite(scenario: str, mode: str) -> None:
    _needs_asyncflow(mode)
    m = await _asyncflow(scenario, mode, "sqlite")
    _check_measurement(m, N)
    assert m.commits is not None and m.write_commits is not None
    # at least the instance insert and one write per node, and never a write without a commit
    assert m.write_commits >= N * 2
    assert m.commits >= m.write_commits


@pytest.mark.benchmark
@pytest.mark.parametrize("mode", ["direct", "driver"])
@pytest.mark.parametrize("scenario", ALL_SCENARIOS)
async def test_scenario_memory(scenario: str, mode: str) -> None:
    _needs_asyncflow(mode)
    m = await _asyncflow(scenario, mode, "memory")
    _check_measurement(m, N)
    assert m.commits is None


@pytest.mark.parametrize("create", ["bulk", "service"])
@pytest.mark.parametrize("mode", ["direct", "driver"])
async def test_a_backlog_is_loaded_before_the_timed_part(mode: str, create: str) -> None:
    import asyncflow as af
    from benchmarks.asyncflow_runs import AsyncflowRun, preload_backlog, run_asyncflow_once

    _needs_asyncflow(mode)
    run = AsyncflowRun(scenario="linear3", mode=mode, backend="memory", lock="local", n=N, concurrency=C,
                       backlog=3 * N, backlog_create=create)  # fmt: skip
    m = await run_asyncflow_once(run)
    assert m.n == N and m.elapsed_s > 0 and m.extra["backlog_s"] >= 0
    if mode == "driver":  # n completions out of the queue: no latency (it would be time spent queued)
        assert m.latencies_s == [] and m.extra["driver_stats"]["completed"] >= N
    else:
        assert len(m.latencies_s) == N
    from benchmarks.scenarios import BenchHooks, build_registry, get_scenario

    repo = af.MemoryWorkflowRepo()
    registry = build_registry(get_scenario("linear3"), BenchHooks())
    svc = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=registry)
    await preload_backlog(svc, repo, "bench_linear3", 5, 2, bulk=create == "bulk")
    queued = await repo.claim_due_instances(now_ms=2**60, limit=10, lease_ms=1)
    assert len(queued) == 5


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_backlog_created_through_the_service_is_not_in_the_runs_commits(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """The backlog's creates are group-committed: counting them unit by unit and subtracting that from
    the database's own figure made a run's commits negative (-193 per workflow with 1,000,000 queued)."""
    from benchmarks.asyncflow_runs import AsyncflowRun, run_asyncflow_once

    kw: dict[str, Any] = {}
    if backend == "postgres":
        kw["pg_admin"] = PgAdmin(request.getfixturevalue("postgres_url"))
    run = AsyncflowRun(scenario="linear3", mode="driver", backend=backend, lock="local", n=N,
                       concurrency=C, backlog=10 * N, backlog_create="service")  # fmt: skip
    m = await run_asyncflow_once(run, **kw)
    assert m.extra["driver_stats"]["completed"] >= N
    assert m.commits is not None and m.write_commits is not None
    # the timed part's own: at least one commit per few completions, no more than the drive could make
    # (its claims, three steps and reads per instance it ran; the backlog's 200 creates are not in it)
    completed = m.extra["driver_stats"]["completed"]
    assert 0 < m.commits <= 6 * completed
    assert 0 < m.write_commits <= 5 * completed


@pytest.mark.postgres
async def test_flushed_statistics_count_every_commit_of_an_open_repo(postgres_url: str) -> None:
    """Mid-run, the server's commit count lags what the repo's open sessions committed (a session
    publishes its counters at most once a second, or 10 s after going idle); flushed, it does not:
    closing the repo, which commits nothing, then adds nothing."""
    import asyncflow as af
    from benchmarks.backends import flush_pg_statistics
    from benchmarks.scenarios import BenchHooks, build_registry, get_scenario

    admin = PgAdmin(postgres_url)
    if await admin.server_version_num() < 150000:
        pytest.skip("pg_stat_force_next_flush() needs PostgreSQL 15")
    async with admin.fresh_database("flush") as db:
        repo = af.SQLAlchemyWorkflowRepo(db.sqlalchemy_url)
        await repo.create_schema()
        before = await admin.xact_commit(db.name, wait_idle=False)
        registry = build_registry(get_scenario("linear3"), BenchHooks())
        svc = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=registry)
        try:
            for i in range(5):  # several commits per session within a second
                await svc.create_workflow("bench_linear3", f"flush-{i}", run=True)
            await flush_pg_statistics(repo)
            flushed = await admin.xact_commit(db.name, wait_idle=False)
            await flush_pg_statistics(
                repo
            )  # again: the same sessions, nothing of a table pending but its own
            again = await admin.xact_commit(db.name, wait_idle=False)
        finally:
            await repo.aclose()
        closed = await admin.xact_commit(db.name)
    assert flushed - before >= 5  # the creates and steps, grouped or not
    assert again > flushed  # the second flush published its own commits
    assert again == closed


def test_backlog_rows_are_labelled_and_matched_apart() -> None:
    key = report.RowKey("asyncflow", "linear3", "driver", "postgres", "local", 100, 8, 3, backlog=1000)
    assert "backlog=1000" in key.label()
    assert report.RowKey("floor", "linear3", "raw", "postgres", None, 100, 8, 3).backlog == 0


@pytest.mark.benchmark
@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["direct", "driver"])
@pytest.mark.parametrize("scenario", ALL_SCENARIOS)
async def test_scenario_postgres(postgres_url: str, scenario: str, mode: str) -> None:
    _needs_asyncflow(mode)
    m = await _asyncflow(scenario, mode, "postgres", pg_admin=PgAdmin(postgres_url))
    _check_measurement(m, N)
    assert m.commits is not None and m.write_commits is not None
    assert m.write_commits >= N * 2
    # the database's own count; the repo may group several instances' steps into one transaction
    assert m.commits > 0


@pytest.mark.benchmark
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("mode", ["direct", "driver"])
async def test_scenario_redis_lock(postgres_url: str, redis_url: str, mode: str) -> None:
    _needs_asyncflow(mode)
    m = await _asyncflow(
        "diamond", mode, "postgres", "redis", pg_admin=PgAdmin(postgres_url), redis_url=redis_url
    )
    _check_measurement(m, N)


@pytest.mark.benchmark
@pytest.mark.parametrize("mode", ["direct", "driver"])
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_scenario_database_lock(backend: str, mode: str, request: pytest.FixtureRequest) -> None:
    """``--lock database``: ``DatabaseWorkflowLock`` on the run's own repo (no Redis)."""
    _needs_asyncflow(mode)
    kw: dict[str, Any] = {}
    if backend == "postgres":
        kw["pg_admin"] = PgAdmin(request.getfixturevalue("postgres_url"))
    m = await _asyncflow("diamond", mode, backend, "database", **kw)
    _check_measurement(m, N)


# -- the reference rows ------------------------------------------------------------------------------


@pytest.mark.benchmark
@pytest.mark.postgres
async def test_floor_postgres_commits_exactly_four_per_workflow(postgres_url: str) -> None:
    admin = PgAdmin(postgres_url)
    async with admin.fresh_database("floor_test") as db:
        m = await run_floor_postgres(db.dsn, N, C, admin=admin, database=db.name)
    _check_measurement(m, N)
    # counted by PostgreSQL itself, so this also checks the commit counting of every PostgreSQL row
    assert m.commits == N * COMMITS_PER_WORKFLOW


@pytest.mark.benchmark
async def test_floor_sqlite() -> None:
    with sqlite_file("floor_test") as path:
        m = await run_floor_sqlite(path, N, C)
    _check_measurement(m, N)
    assert m.commits == N * COMMITS_PER_WORKFLOW


@pytest.mark.benchmark
@pytest.mark.postgres
@pytest.mark.parametrize("shape", ["linear3", "diamond", "approval", "branch", "fanout-children"])
async def test_dbos_reference(postgres_url: str, shape: str) -> None:
    if dbos_version() is None:
        pytest.skip("dbos is not installed: pip install 'asyncflow[bench]'")
    n = 4 if shape == "fanout-children" else N  # 20 child workflows each
    m = await run_dbos_once(shape, n, C, admin=PgAdmin(postgres_url))
    _check_measurement(m, n)
    steps = {"diamond": 6, "fanout-children": 20 * 3}.get(shape, 3)
    assert m.commits is not None and m.commits >= n * steps  # DBOS checkpoints every step


@pytest.mark.benchmark
@pytest.mark.postgres
async def test_dbos_approval_on_a_queue(postgres_url: str) -> None:
    # queue launch: sender tasks approve each workflow as it reports waiting in its recv
    if dbos_version() is None:
        pytest.skip("dbos is not installed: pip install 'asyncflow[bench]'")
    m = await run_dbos_once("approval", N, C, admin=PgAdmin(postgres_url), launch="queue")
    _check_measurement(m, N)
    assert m.extra["launch"] == "queue"
    assert m.commits is not None and m.commits >= N * 3


@pytest.mark.benchmark
@pytest.mark.postgres
def test_cli_writes_json_and_skips_a_missing_service(tmp_path: Path, postgres_url: str) -> None:
    out = tmp_path / "out.json"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_START}\nold\n{report.README_END}\ntail\n", encoding="utf-8")
    cmd = [
        sys.executable, "-m", "benchmarks", "run", "--scenario", "linear3", "--backend", "postgres,sqlite",
        "--reference", "floor", "--pg-url", "postgresql+asyncpg://postgres@127.0.0.1:9/none", "-n", "10",
        "-c", "2", "--repeat", "3", "--json", str(out), "--readme", str(readme),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=100, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "skipped every postgres row" in proc.stdout
    payload = json.loads(out.read_text(encoding="utf-8"))
    kinds = {(row["kind"], row["backend"]) for row in payload["results"]}
    assert ("floor", "sqlite") in kinds
    assert not any(row["backend"] == "postgres" for row in payload["results"])
    floor = next(row for row in payload["results"] if row["kind"] == "floor")
    assert floor["repeats"] == 3
    assert floor["commits_per_workflow"] == 4.0
    for name in ("workflows_per_s", "node_steps_per_s", "latency_ms", "cpu_ms_per_workflow", "peak_rss_mib"):
        assert floor[name] is not None
    assert payload["environment"]["versions"]["python"]
    if asyncflow_unavailable("direct") is None:  # the asyncflow row ran in its own subprocess
        mine = next(row for row in payload["results"] if row["kind"] == "asyncflow")
        assert (mine["backend"], mine["mode"], mine["failed_runs"]) == ("sqlite", "direct", 0)
        assert mine["fraction_of_floor"] is not None and mine["writes_per_workflow"] >= 2
    text = readme.read_text(encoding="utf-8")
    assert "old" not in text and "| floor | linear3 | raw | sqlite |" in text and text.endswith("tail\n")


# -- harness self-tests (unmarked: fast, no services) ------------------------------------------------


def test_percentile_interpolates_and_summarize_spreads() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    spread = summarize([3.0, 1.0, 2.0])
    assert (spread.median, spread.min, spread.max) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_latency_sampler_keeps_a_bounded_stride_sample() -> None:
    sampler = LatencySampler(100_000, max_samples=1000)
    assert sampler.stride == 100
    kept = [i for i in range(100_000) if sampler.wants(i)]
    assert len(kept) == 1000
    sampler.started(7, 1.0)
    sampler.completed(8, 5.0)  # not sampled: ignored
    sampler.completed(7, 1.25)
    sampler.completed(7, 9.0)  # a second report of the same instance is ignored
    assert sampler.latencies() == [0.25]
    assert sampler.open_count == 0


def test_resource_probe_sees_cpu_and_a_fresh_peak() -> None:
    # touch 64 MiB of a mapping of its own, unmapped at the end (freed memory the allocator kept
    # would still count in the RSS the next probe starts from)
    with ResourceProbe() as probe, mmap.mmap(-1, 64 * 2**20) as block:
        for i in range(0, len(block), 4096):
            block[i] = 1
    assert probe.cpu_s > 0
    assert probe.peak_rss_bytes >= 64 * 2**20
    if probe.rss_scope == "block":
        with ResourceProbe() as small:
            sum(range(1000))
        if small.rss_scope == "block":  # a peak of its own: not the 64 MiB block's
            assert small.peak_rss_bytes < probe.peak_rss_bytes
        else:  # the reset did not take: the process's lifetime peak, at least the block's
            assert small.peak_rss_bytes >= probe.peak_rss_bytes


@pytest.mark.postgres
async def test_hot_path_reports_the_local_servers_cpu(postgres_url: str, tmp_path: Path) -> None:
    from benchmarks import hot_path

    url = postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    # 1,000 workflows: with 200 the floor's 8 backends used so little CPU each on a fast machine that
    # /proc showed none of it in about one run of five
    args = hot_path.parse(["--backend", "postgres", "--rows", "floor,direct", "-n", "1000", "-c", "8"])
    args.pg_url, args.repeat, args.json = url, 1, str(tmp_path / "hot.json")
    await hot_path.main(args)
    summary = json.loads((tmp_path / "hot.json").read_text())["summary"]
    assert set(summary) == {"postgres/floor", "postgres/direct"}
    local = hot_path._postgres_cpu_s() is not None  # the server runs on this machine (CI: it does)
    for row in summary.values():
        assert row["median"] > 0 and row["cpu_ms"] > 0
        assert (row["server_cpu_ms"] is not None and row["server_cpu_ms"] > 0) == local


@pytest.mark.postgres
async def test_step_server_replays_linear3_steps_and_reports_the_backends_cpu(postgres_url: str) -> None:
    from benchmarks import hot_path, step_server

    if hot_path._postgres_cpu_s() is None:
        pytest.skip("the PostgreSQL server is not on this machine: step_server reads its CPU from /proc")
    url = postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    args = step_server.parse(["-n", "300", "--repeat", "2", "--due-trigger", "--pg-url", url])
    figures = await step_server.main(args)  # raises unless every instance completed with 5 node rows
    assert len(figures) == 2 and all(f > 0 for f in figures)


@pytest.mark.postgres
async def test_create_trigger_inserts_under_each_set_up_and_reports_server_cpu(postgres_url: str) -> None:
    from benchmarks import create_trigger, hot_path

    if hot_path._postgres_cpu_s() is None:
        pytest.skip("the PostgreSQL server is not on this machine: create_trigger reads its CPU from /proc")
    url = postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    args = create_trigger.parse(["-n", "3000", "--repeat", "1", "--pg-url", url])
    figures = await create_trigger.main(args)  # raises unless every round created all its instances
    assert sorted(figures) == sorted(create_trigger.SETUPS)
    assert all(len(values) == 1 and values[0] > 0 for values in figures.values())


@pytest.mark.postgres
async def test_hot_path_analyze_gives_the_driver_rows_backlog_statistics(
    postgres_url: str, tmp_path: Path
) -> None:
    from sqlalchemy import text

    from benchmarks import hot_path

    analyzed: list[int] = []
    real = hot_path._analyze

    async def analyze(repo: Any) -> None:  # the real ANALYZE, then what it left in pg_class
        await real(repo)
        async with repo.engine.connect() as conn:
            query = "SELECT reltuples FROM pg_class WHERE oid = 'workflow_instance'::regclass"
            analyzed.append(int((await conn.execute(text(query))).scalar_one()))

    url = postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    args = hot_path.parse(["--backend", "postgres", "--rows", "driver", "-n", "300", "-c", "8", "--analyze"])
    args.pg_url, args.repeat, args.json = url, 1, str(tmp_path / "hot.json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hot_path, "_analyze", analyze)
        await hot_path.main(args)
    assert analyzed == [300 + 50]  # the backlog and the warm-up's instances, counted before the drive
    assert json.loads((tmp_path / "hot.json").read_text())["summary"]["postgres/driver"]["median"] > 0


@pytest.mark.postgres
async def test_claim_cost_claims_every_instance_every_way_and_reports_server_cpu(postgres_url: str) -> None:
    from benchmarks import claim_cost, hot_path

    if hot_path._postgres_cpu_s() is None:
        pytest.skip("the PostgreSQL server is not on this machine: claim_cost reads its CPU from /proc")
    url = postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    args = claim_cost.parse(["-n", "2000", "--batch", "7", "--repeat", "1", "--pg-url", url])
    figures = await claim_cost.main(args)  # raises unless each way claimed every instance
    assert sorted(figures) == sorted(claim_cost.WAYS)
    assert all(len(values) == 1 and values[0] > 0 for values in figures.values())


async def test_sql_commit_counter_counts_transactions_and_autocommit_statements(tmp_path: Path) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/c.db")
    counter = SqlCommitCounter()
    counter.attach(engine)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
        assert (counter.commits, counter.write_commits) == (1, 0)  # DDL is not a row write
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t VALUES (1)"))
            await conn.execute(text("INSERT INTO t VALUES (2)"))
        assert (counter.commits, counter.write_commits) == (2, 1)
        async with engine.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.execute(text("INSERT INTO t VALUES (3)"))
            await auto.execute(text("UPDATE t SET x = x + 1"))
            await auto.execute(text("SELECT count(*) FROM t"))
        assert (counter.commits, counter.write_commits) == (5, 3)
        async with engine.connect() as conn:
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
            await conn.exec_driver_sql("DELETE FROM t WHERE x = 2")
            await conn.exec_driver_sql("COMMIT")
        assert (counter.commits, counter.write_commits) == (6, 4)
    finally:
        counter.detach()
        await engine.dispose()


def test_report_ratios_and_readme(tmp_path: Path) -> None:
    def row(kind: str, scenario: str, wfs: float) -> dict[str, Any]:
        key = report.RowKey(kind, scenario, "direct", "postgres", None, 100, 32, 3)
        m = RunMeasurement(
            n=100, elapsed_s=100 / wfs, cpu_s=0.5, peak_rss_bytes=50 * 2**20, latencies_s=[0.01]
        )
        return report.aggregate(key, [m, m, m])

    rows = [
        row("asyncflow", "linear3", 1000.0),
        row("dbos", "linear3", 100.0),
        row("floor", "linear3", 2500.0),
    ]
    report.attach_ratios(rows)
    assert rows[0]["ratio_vs_dbos"] == 10.0
    assert rows[0]["fraction_of_floor"] == 0.4
    assert rows[1]["ratio_vs_dbos"] is None
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.README_START}\n{report.README_END}\nb\n", encoding="utf-8")
    payload = {
        "generated_at": "now",
        "command": "python -m benchmarks run",
        "environment": report.environment(postgres="15", redis=None),
        "results": rows,
        "skipped": [{"row": "x", "reason": "y"}],
    }
    report.update_readme(readme, payload)
    text = readme.read_text(encoding="utf-8")
    assert "| asyncflow | linear3 | direct | postgres |" in text and "10.0x" in text and "40%" in text
    assert "- x: y" in text
    table = report.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("asyncflow")
    second = dict(payload, command="python -m benchmarks run --backend sqlite", skipped=[])
    report.update_readme(readme, [payload, second])  # one section per run, each with its command
    text = readme.read_text(encoding="utf-8")
    assert text.count("Command: `python -m benchmarks run") == 2 and "--backend sqlite`" in text
    assert text.startswith("a\n") and text.endswith("\nb\n") and text.count(report.README_START) == 1


async def test_isolated_run_is_killed_past_its_deadline_and_needs_a_result() -> None:
    with pytest.raises(RunFailedError, match="did not finish within 1 s"):
        await run_module("http.server", ["--bind", "127.0.0.1", "0"], timeout_s=1.0)
    with pytest.raises(RunFailedError, match="failed"):
        await run_module("this", [], timeout_s=30.0)  # exits 0 without a result line


def test_describe_error_names_the_leaves_of_a_group() -> None:
    try:
        raise KeyError("k") from OSError("disk")
    except KeyError as exc:
        keyed = exc
    group = ExceptionGroup("x", [ValueError("a"), ExceptionGroup("y", [ValueError("a"), keyed])])
    assert describe_error(group) == "ValueError: a | KeyError: 'k' (from OSError: disk)"


def test_parse_list() -> None:
    assert parse_list("all", ("a", "b"), "x") == ("a", "b")
    assert parse_list("none", ("a", "b"), "x") == ()
    assert parse_list("b,a", ("a", "b"), "x") == ("b", "a")
    with pytest.raises(ValueError, match="unknown x: c"):
        parse_list("a,c", ("a", "b"), "x")
    # the slow scenario is named only, never part of "all"
    assert "slow2" not in parse_list("all", (*ALL_SCENARIOS, "slow2"), "scenario")
    assert parse_list("slow2", (*ALL_SCENARIOS, "slow2"), "scenario") == ("slow2",)


def test_visible_after_option() -> None:
    from benchmarks.__main__ import _visible_after

    assert _visible_after("none,1") == ("none", "1") and _visible_after("") == ("none",)
    for bad in ("-1", "soon"):
        with pytest.raises(ValueError, match="--visible-after needs none or seconds"):
            _visible_after(bad)


def test_benchmarks_are_not_in_the_default_test_run() -> None:
    import tomllib

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"][
        "ini_options"
    ]
    assert "benchmarks" in config["testpaths"]  # the harness's quick checks run with the tests
    assert "not benchmark" in config["addopts"]  # the measured scenarios do not


def test_scenarios_build() -> None:
    pytest.importorskip("asyncflow")
    if asyncflow_unavailable("direct"):
        pytest.skip("asyncflow engine not available")
    from benchmarks.scenarios import SCENARIOS, build_registry

    for spec in SCENARIOS.values():
        definition = build_registry(spec).get_workflow_definition(spec.workflow_type)
        assert [node.task_type for node in definition.nodes][1:-1] == [node for node, _ in spec.nodes]


async def test_branch_scenario_takes_one_branch_and_skips_the_other() -> None:
    """The ``branch`` workflow runs A, one of B/C (by instance id parity) and D; the other ends skipped."""
    import asyncflow as af
    from benchmarks.scenarios import build_registry, get_scenario

    spec = get_scenario("branch")
    assert spec.node_count == 3 and dict(spec.joins) == {"D": "any"}
    svc = af.WorkflowService(af.MemoryWorkflowRepo(), af.LocalWorkflowLock(), build_registry(spec))
    skipped = []
    for k in range(4):
        inst = await svc.create_workflow(spec.workflow_type, f"b-{k}", run=True)
        assert inst.status == "completed"
        [detail] = await svc.query_workflow_instance_detail(
            af.QueryWorkflowInstanceParams(workflow_instance_id=inst.id)
        )
        st = {t: detail.node(t).status for t in ("A", "B", "C", "D")}
        assert st["A"] == st["D"] == "completed"
        assert sorted((st["B"], st["C"])) == ["completed", "skipped"]
        skipped.append("B" if st["B"] == "skipped" else "C")
        assert skipped[-1] == ("C" if inst.id % 2 == 0 else "B")
    assert set(skipped) == {"B", "C"}


def test_fanout_children_runs_only_when_named_and_in_driver_mode() -> None:
    from benchmarks.__main__ import _options, _parser

    def scenarios(value: str) -> tuple[str, ...]:
        return _options(_parser().parse_args(["run", "--scenario", value])).scenarios

    assert "fanout-children" not in scenarios("all")
    assert scenarios("linear3,fanout-children") == ("linear3", "fanout-children")
    assert scenario_unavailable("fanout-children", "driver") is None
    reason = scenario_unavailable("fanout-children", "direct")
    assert reason is not None and "driver" in reason
    assert scenario_unavailable("fanout-children", "driver", backlog=100) is not None
    assert scenario_unavailable("branch") is None


def test_scenario_approval_plans_the_dbos_approval_row_beside_asyncflows() -> None:
    if dbos_version() is None:
        pytest.skip("dbos is not installed: pip install 'asyncflow[bench]'")
    options = BenchOptions(scenarios=("approval",), references=("dbos",), n=10, concurrencies=(4,))
    skipped: dict[str, str] = {}
    rows = _plan(options, PgAdmin("postgresql+asyncpg://postgres@127.0.0.1:9/none"), {}, skipped)
    labels = [row.key.label() for row in rows]
    assert labels == [
        "dbos approval bounded postgres n=10 c=4",
        "asyncflow approval direct postgres/local n=10 c=4",
    ], skipped
    everything = BenchOptions(scenarios=ALL_SCENARIOS, references=("dbos",))
    shapes = [
        row.key.scenario
        for row in _plan(everything, PgAdmin(options.pg_url), {}, {})
        if row.key.kind == "dbos"
    ]
    assert shapes == ["linear3", "diamond", "approval", "branch"]  # fanout-children only when named


@pytest.mark.benchmark
async def test_dbos_reference_on_sqlite() -> None:
    if dbos_version() is None:
        pytest.skip("dbos is not installed: pip install 'asyncflow[bench]'")
    with sqlite_file("dbos_test") as path:
        m = await run_dbos_once("branch", N, C, sqlite_path=path)
    _check_measurement(m, N)
    assert m.commits is None  # counted on PostgreSQL only


async def test_fanout_children_scenario_completes_parents_after_their_20_children() -> None:
    import asyncflow as af
    from benchmarks.asyncflow_runs import run_driver
    from benchmarks.scenarios import FANOUT_CHILDREN, BenchHooks, build_registry, get_scenario

    spec = get_scenario("fanout-children")
    hooks = BenchHooks()
    svc = af.WorkflowService(af.MemoryWorkflowRepo(), af.LocalWorkflowLock(), build_registry(spec, hooks))
    try:
        _, _, stats = await run_driver(
            svc, spec.workflow_type, 3, 8, hooks=hooks, workflow_types=spec.workflow_types
        )
        parents = await svc.query_workflow_instances(
            af.QueryWorkflowInstanceParams(
                workflow_type_in=(spec.workflow_type,), page=af.Pager(no_limit=True)
            )
        )
        children = await svc.query_workflow_instances(
            af.QueryWorkflowInstanceParams(
                workflow_type_in=spec.workflow_types[1:], page=af.Pager(no_limit=True)
            )
        )
    finally:
        await svc.aclose()
    assert [p.status for p in parents] == ["completed"] * 3
    assert len(children) == 3 * FANOUT_CHILDREN
    assert {c.status for c in children} == {"completed"}
    assert {c.parent_id for c in children} == {p.id for p in parents}
    assert stats.completed >= 3 * (FANOUT_CHILDREN + 1)


@pytest.mark.parametrize("observer", ["none", "noop", "prometheus", "otel"])
async def test_each_observer_set_runs_and_sees_every_node(observer: str, monkeypatch: Any) -> None:
    from benchmarks import asyncflow_runs
    from benchmarks.observers import make_observers, observers_unavailable

    assert observers_unavailable(observer) is None  # the bench extra has them all
    made: list[Any] = []

    def recording(name: str) -> Any:
        observers = make_observers(name)
        made.extend(observers)
        return observers

    monkeypatch.setattr(asyncflow_runs, "make_observers", recording)
    run = asyncflow_runs.AsyncflowRun(
        scenario="linear3",
        mode="direct",
        backend="memory",
        lock="local",
        n=N,
        concurrency=C,
        observer=observer,
    )
    m = await asyncflow_runs.run_asyncflow_once(run)
    _check_measurement(m, N)
    assert len(made) == (0 if observer == "none" else 1)
    if observer == "prometheus":
        total = sum(
            sample.value
            for metric in made[0].node_attempts.collect()
            for sample in metric.samples
            if sample.name == "asyncflow_node_attempts_total" and sample.labels["outcome"] == "completed"
        )
        assert total == 3 * (N + C)  # linear3: three nodes per workflow (the warm-up's C workflows too)
    with pytest.raises(ValueError, match="unknown observer"):
        make_observers("statsd")


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_counting_steps_keeps_the_repos_held_steps(backend: str, tmp_path: Path) -> None:
    """The step counter of a run keeps the measured path: steps awaited inline, no task per step."""
    import asyncio

    import asyncflow as af
    from asyncflow._held import is_held
    from benchmarks.asyncflow_runs import _count_steps
    from benchmarks.scenarios import BenchHooks, build_registry, get_scenario

    if backend == "memory":
        repo: Any = af.MemoryWorkflowRepo()
    else:
        repo = af.SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path / 'steps.db'}")
        await repo.create_schema()
    try:
        assert is_held(repo.apply_step)
        steps = _count_steps(repo)
        assert is_held(repo.apply_step)
        spec = get_scenario("linear3")
        svc = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=build_registry(spec, BenchHooks()))
        await svc.create_workflow(spec.workflow_type, "warm", run=True)  # the repo's lazily started tasks
        loop = asyncio.get_running_loop()
        made: list[str] = []
        create_task = loop.create_task

        def counted(coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            made.append(getattr(coro, "__qualname__", type(coro).__name__))
            return create_task(coro, **kwargs)

        loop.create_task = counted  # type: ignore[method-assign]
        try:
            done = await svc.create_workflow(spec.workflow_type, "one", run=True)
        finally:
            del loop.create_task
        assert done.status == "completed"
        assert steps[0] == 6  # three nodes, twice
        # no task per step, and none per pass: a linear pass drives its nodes in the caller's task
        # (runner._InContext); a counted step that made a task would show here
        assert [n for n in made if "PassRunner" in n or "_started_later" in n or "counted" in n] == []
    finally:
        await repo.aclose()
    unheld = af.MemoryWorkflowRepo()

    async def plain(step: Any) -> Any:
        return await af.MemoryWorkflowRepo.apply_step(unheld, step)

    unheld.apply_step = plain  # type: ignore[method-assign]
    _count_steps(unheld)
    assert not is_held(unheld.apply_step)  # a repo that does not hold is not made to


def test_bytecodes_counts_the_engines_work_per_workflow() -> None:
    """``benchmarks.bytecodes`` on the memory repo: a count per workflow, most of it the engine's."""
    from benchmarks import bytecodes

    result = bytecodes.main(
        ["--backend", "memory", "--rows", "direct", "-n", "60", "--base", "20", "--top", "5"]
    )
    direct = result["direct"]
    assert 2_000 < direct["total"] < 100_000  # about 13,000 bytecodes per linear3 workflow in 2026
    runner = direct["files"]["asyncflow/engine/runner.py"]
    assert runner / direct["total"] > 0.1  # the pass runner's own code
    assert len(direct["functions"]) == 5
