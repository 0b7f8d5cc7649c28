"""Commits per workflow (issue 5): a linear workflow of k synchronous nodes takes at most k + 2 commits
from create to completed; with wait checks at most 2 per node plus 2."""

from __future__ import annotations

import os
from typing import Any

import pytest

from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.store.commit_counter import CommitCounter
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.worker import choose
from tests.conftest import POSTGRES_URL_ENV, isolated_pg_engine

from .engine_helpers import Calls, config, recording_worker, registry_with


@pytest.fixture(params=["sqlite", "postgres"])
async def sql_repo(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "sqlite":
        repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/commits.db")
        await repo.create_schema()
        yield repo
        await repo.aclose()
        return
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set (.ci/run sets it)")
    async with isolated_pg_engine(url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        yield repo


def linear(k: int) -> dict[str, list[str]]:
    names = [f"N{i}" for i in range(k)]
    return {name: ([names[i + 1]] if i + 1 < k else []) for i, name in enumerate(names)}


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("wait_check", [False, True])
async def test_linear_commit_budget(sql_repo: Any, k: int, wait_check: bool) -> None:
    calls = Calls()
    cfg = config(f"lin{k}", linear(k))
    workers = {n: recording_worker(calls, with_check=wait_check) for n in linear(k)}
    svc = WorkflowService(sql_repo, LocalWorkflowLock(), registry_with(cfg, calls, workers))
    await svc.create_workflow(cfg.id, "warm-up", run=True)  # connections and caches warm
    with CommitCounter(sql_repo.engine) as counter:
        inst = await svc.create_workflow(cfg.id, "b", run=True)
    assert inst.status == "completed"
    budget = 2 * k + 2 if wait_check else k + 2
    print(f"linear{k} wait_check={wait_check}: {counter.commits} commits (budget {budget})")
    assert 1 <= counter.commits <= budget, (counter.commits, budget)


async def test_diamond_commits(sql_repo: Any) -> None:
    calls = Calls()
    cfg = config("dia", {"A": ["B", "C", "D", "E"], "B": ["F"], "C": ["F"], "D": ["F"], "E": ["F"], "F": []})
    svc = WorkflowService(sql_repo, LocalWorkflowLock(), registry_with(cfg, calls))
    with CommitCounter(sql_repo.engine) as counter:
        inst = await svc.create_workflow("dia", "b", run=True)
    assert inst.status == "completed"
    assert counter.commits <= 6 + 2


async def test_counter_sees_explicit_and_autocommit_writes(sql_repo: Any) -> None:
    calls = Calls()
    svc = WorkflowService(sql_repo, LocalWorkflowLock(), registry_with(config("one", {"A": []}), calls))
    with CommitCounter(sql_repo.engine) as counter:
        await svc.create_workflow("one", "b")  # one autocommit INSERT
        assert counter.commits == 1
        await svc.count_workflow_instances()  # a read is no commit
        assert counter.commits == 1
        async with sql_repo.transaction():
            await svc.create_workflow("one", "c")
        assert counter.commits == 2


def _choose(*task_types: str) -> Any:
    def run(ctx: Any) -> None:
        choose(*task_types)

    return run


async def _measure(repo: Any, edges: dict[str, list[str]], name: str, **options: Any) -> tuple[int, int, str]:
    """Commits and ``apply_step`` calls of one instance (after a warm-up one), and its final status."""
    calls = Calls()
    cfg = config(name, edges, **options)
    workers = {"A": recording_worker(calls, _choose("B"))} if "C" in edges else {}
    svc = WorkflowService(repo, LocalWorkflowLock(), registry_with(cfg, calls, workers))
    await svc.create_workflow(name, "warm-up", run=True)
    steps = 0
    apply_step = repo.apply_step

    async def counted(step: Any) -> Any:
        nonlocal steps
        steps += 1
        return await apply_step(step)

    repo.apply_step = counted  # the real store underneath: this only counts the calls
    try:
        with CommitCounter(repo.engine) as counter:
            inst = await svc.create_workflow(name, "b", run=True)
    finally:
        del repo.apply_step
    return counter.commits, steps, inst.status


@pytest.mark.parametrize(
    "branch",
    [
        {"A": ["B", "C"], "B": ["D"], "C": ["D"], "D": []},  # C skipped
        {"A": ["B", "C"], "B": ["D"], "C": ["E"], "E": ["F"], "F": ["D"], "D": []},  # C, E, F skipped
    ],
    ids=["one-skipped", "three-skipped"],
)
async def test_skips_cost_no_more_writes_than_completions(
    sql_repo: Any, branch: dict[str, list[str]]
) -> None:
    """A -> choose(B) of [B, C] -> D (join any) commits no more than the linear A -> B -> D: the skipped
    rows ride in the step that completes A."""
    linear_commits, linear_steps, linear_status = await _measure(
        sql_repo, {"A": ["B"], "B": ["D"], "D": []}, "lin-abd"
    )
    commits, steps, status = await _measure(sql_repo, branch, f"branch-{len(branch)}", D={"join": "any"})
    assert linear_status == status == "completed"
    print(f"branch: {commits} commits, {steps} steps; linear A-B-D: {linear_commits}, {linear_steps}")
    assert linear_commits >= 1 and linear_steps >= 1
    assert commits <= linear_commits, (commits, linear_commits)
    assert steps <= linear_steps, (steps, linear_steps)
