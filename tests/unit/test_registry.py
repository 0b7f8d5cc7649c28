"""The registry: loading configs, registering workers, lazy cached builds, preload, the default registry."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import asyncflow.registry as registry_module
from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.definition import MissingWorkerError
from asyncflow.errors import (
    ConfigError,
    ConfigNotFoundError,
    ParamInvalidError,
    TaskWorkerAlreadyRegisteredError,
    TaskWorkerNotFoundError,
    is_serious_error,
)
from asyncflow.registry import Registry, default_registry
from asyncflow.worker import BaseTaskWorker, NormalTaskWorker, TaskWorker


class Ok(BaseTaskWorker):
    async def run(self, ctx: JSONContext) -> None:
        return None


def chain(wid: str, *ids: str) -> WorkflowConfig:
    nodes = [
        NodeConfig(node_id, next_nodes=[ids[i + 1]] if i + 1 < len(ids) else [])
        for i, node_id in enumerate(ids)
    ]
    return WorkflowConfig(wid, nodes=nodes)


def ready(wid: str, *ids: str) -> Registry:
    registry = Registry()
    registry.load_workflow_config(chain(wid, *ids))
    for node_id in ids:
        registry.register_workflow_task(wid, node_id, Ok())
    return registry


def test_load_register_and_build() -> None:
    registry = ready("w", "A", "B")
    definition = registry.get_workflow_definition("w")
    assert [n.task_type for n in definition.nodes] == ["root", "A", "B", "end"]
    assert registry.get_workflow_definition("w") is definition
    assert (
        registry.workflow_types() == ["w"] and registry.has_workflow("w") and not registry.has_workflow("x")
    )


def test_load_accepts_dicts_and_json_text() -> None:
    registry = Registry()
    registry.load_workflow_config({"id": "d", "nodes": [{"id": "A"}]})
    registry.load_workflow_config(json.dumps({"id": "s", "nodes": [{"id": "A"}]}))
    registry.load_workflow_config(json.dumps({"id": "b", "nodes": [{"id": "A"}]}).encode())
    assert registry.workflow_types() == ["d", "s", "b"]


@pytest.mark.parametrize("bad", [None, 42, ["A"]])
def test_load_rejects_non_configs(bad: object) -> None:
    with pytest.raises(ParamInvalidError):
        Registry().load_workflow_config(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (WorkflowConfig("w"), "has no nodes"),
        (chain("", "A"), "workflow id is empty"),
        (WorkflowConfig("w", nodes=[NodeConfig("A", next_nodes=["A"])]), "self-loop"),
        (
            WorkflowConfig("w", nodes=[NodeConfig("A", next_nodes=["B"]), NodeConfig("B", next_nodes=["A"])]),
            "cycle",
        ),
        (chain("w", "A", "end"), "reserved"),
        ('{"id": "w", "nodes": [null]}', "is null"),
        ('{"id": "w", "nodes": [{"id": "A", "fail_max_count": true}]}', "must be an integer"),
    ],
)
def test_load_validates_at_once(config: WorkflowConfig | str, pattern: str) -> None:
    registry = Registry()
    with pytest.raises(ConfigError, match=pattern):
        registry.load_workflow_config(config)
    assert registry.workflow_types() == []


def test_unknown_next_node_is_rejected_and_a_fixed_config_loads_13_3() -> None:
    registry = Registry()
    broken = WorkflowConfig("w", nodes=[NodeConfig("A", next_nodes=["X"])])
    with pytest.raises(ConfigError, match=r"unknown next node\(s\): 'A' -> 'X'"):
        registry.load_workflow_config(broken)
    assert not registry.has_workflow("w")
    registry.load_workflow_config(chain("w", "A"))
    registry.register_workflow_task("w", "A", Ok())
    assert registry.get_workflow_definition("w").node("A").next_nodes == ["end"]


def test_missing_worker_is_not_cached_13_4() -> None:
    registry = Registry()
    registry.load_workflow_config(chain("w", "A", "B", "C"))
    registry.register_workflow_task("w", "B", Ok())
    with pytest.raises(MissingWorkerError) as info:
        registry.get_workflow_definition("w")
    assert isinstance(info.value, TaskWorkerNotFoundError) and isinstance(info.value, ConfigError)
    assert info.value.nodes == ("A", "C") and is_serious_error(info.value)
    registry.register_workflow_task("w", "A", Ok())
    with pytest.raises(MissingWorkerError, match=r"node\(s\) 'C'$"):
        registry.get_workflow_definition("w")
    registry.register_workflow_task("w", "C", Ok())
    assert registry.get_workflow_definition("w").nodes_count == 5


def test_unknown_type_raises_config_not_found_and_is_not_cached() -> None:
    registry = Registry()
    with pytest.raises(ConfigNotFoundError, match="workflow config 'nope' not found"):
        registry.get_workflow_definition("nope")
    registry.load_workflow_config(chain("nope", "A"))
    registry.register_workflow_task("nope", "A", Ok())
    assert registry.get_workflow_definition("nope").id == "nope"


def test_second_load_before_build_replaces_the_first_13_8() -> None:
    registry = Registry()
    registry.load_workflow_config(chain("w", "A"))
    registry.load_workflow_config(chain("w", "A", "B"))
    registry.register_workflow_task("w", "A", Ok())
    registry.register_workflow_task("w", "B", Ok())
    assert [n.task_type for n in registry.get_workflow_definition("w").nodes] == ["root", "A", "B", "end"]
    assert registry.workflow_types() == ["w"]


def test_load_after_build_same_config_is_a_no_op_different_is_rejected_13_8() -> None:
    registry = ready("w", "A")
    definition = registry.get_workflow_definition("w")
    registry.load_workflow_config(chain("w", "A"))  # equal: no-op
    registry.load_workflow_config({"id": "w", "nodes": [{"id": "A", "next_nodes": None}]})  # equal too
    assert registry.get_workflow_definition("w") is definition
    with pytest.raises(ConfigError, match="workflow 'w': its definition is already built") as info:
        registry.load_workflow_config(chain("w", "A", "B"))
    assert info.value.workflow_type == "w"
    assert registry.get_workflow_definition("w") is definition


def test_load_after_build_is_rejected_even_after_the_cache_was_dropped() -> None:
    registry = ready("w", "A")
    registry.get_workflow_definition("w")
    registry.register_workflow_task("w", "unrelated", Ok())  # drops the cached definition
    with pytest.raises(ConfigError, match="already built"):
        registry.load_workflow_config(chain("w", "A", "B"))


def test_duplicate_registration_13_9() -> None:
    registry = Registry()
    registry.register_workflow_task("w", "A", Ok())
    with pytest.raises(TaskWorkerAlreadyRegisteredError, match="workflow 'w' task 'A'"):
        registry.register_workflow_task("w", "A", Ok())
    registry.register_workflow_task("w2", "A", Ok())  # keys are (type, key) tuples
    registry.register_workflow_task("a_b", "c", Ok())
    registry.register_workflow_task("a", "b_c", Ok())  # no "a_b_c" collision as in Go


@pytest.mark.parametrize(
    ("worker", "pattern"),
    [
        (None, "is None"),
        (Ok, "is the class Ok; pass an instance"),
        (lambda ctx: None, "does not implement TaskWorker"),
        (object(), "does not implement TaskWorker"),
    ],
    ids=["none", "class", "function", "object"],
)
def test_register_rejects_non_workers_13_9(worker: object, pattern: str) -> None:
    registry = Registry()
    with pytest.raises(ParamInvalidError, match=pattern):
        registry.register_workflow_task("w", "A", worker)  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match=pattern):
        registry.register_public_task("A", worker)  # type: ignore[arg-type]


@pytest.mark.parametrize(("workflow_type", "task_key"), [("", "A"), ("w", ""), (None, "A"), ("w", 3)])
def test_register_rejects_bad_keys(workflow_type: object, task_key: object) -> None:
    with pytest.raises(ParamInvalidError, match="must be a non-empty string"):
        Registry().register_workflow_task(workflow_type, task_key, Ok())  # type: ignore[arg-type]


def test_registering_after_build_rebuilds_with_the_new_worker_13_10() -> None:
    registry = Registry()
    registry.load_workflow_config(chain("w", "A"))
    shared, own = Ok(), Ok()
    registry.register_public_task("A", shared)
    first = registry.get_workflow_definition("w")
    assert first.node("A").worker is shared
    registry.register_workflow_task("w", "A", own)
    second = registry.get_workflow_definition("w")
    assert second is not first and second.node("A").worker is own
    assert first.node("A").worker is shared  # a definition already handed out never changes


def test_public_workers_serve_types_without_their_own() -> None:
    registry = Registry()
    registry.load_workflow_config(chain("x", "notify"))
    registry.load_workflow_config(chain("y", "notify"))
    public, own = Ok(), Ok()
    registry.register_public_task("notify", public)
    registry.register_workflow_task("y", "notify", own)
    assert registry.get_workflow_definition("x").node("notify").worker is public
    assert registry.get_workflow_definition("y").node("notify").worker is own
    with pytest.raises(
        TaskWorkerAlreadyRegisteredError, match="public worker is already registered for 'notify'"
    ):
        registry.register_public_task("notify", Ok())
    with pytest.raises(ParamInvalidError):
        registry.register_public_task("", Ok())


async def test_task_decorator_registers_and_returns_the_function() -> None:
    registry = Registry()
    registry.load_workflow_config(chain("w", "A", "B"))

    async def check(ctx: JSONContext) -> None:
        ctx.set(["checked"], True)

    @registry.task("w", "A", wait_check=check)
    async def run_a(ctx: JSONContext) -> None:
        ctx.set(["a"], 1)

    @registry.task("w", "B")
    def run_b(ctx: JSONContext) -> None:  # a sync function: run in a thread
        ctx.set(["b"], threading.get_ident())

    assert run_a.__name__ == "run_a" and callable(run_b)
    definition = registry.get_workflow_definition("w")
    node_a, node_b = definition.node("A"), definition.node("B")
    assert isinstance(node_a.worker, NormalTaskWorker) and node_a.worker.run_function is run_a
    assert node_a.has_wait_check and not node_b.has_wait_check
    ctx = JSONContext()
    await node_a.worker.run(ctx)
    await node_a.worker.wait_check(ctx)
    await node_b.worker.run(ctx)
    assert ctx.get("a") == (1, True) and ctx.get("checked") == (True, True)
    assert ctx.get_int64("b")[0] != threading.get_ident()
    with pytest.raises(TaskWorkerAlreadyRegisteredError):
        registry.task("w", "A")(run_a)


def test_task_decorator_rejects_bad_arguments() -> None:
    registry = Registry()
    with pytest.raises(ParamInvalidError, match="wait_check must be callable"):
        registry.task("w", "A", wait_check=5)  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match="decorates a function"):
        registry.task("w", "A")(5)  # type: ignore[type-var]
    with pytest.raises(ParamInvalidError, match="task_key"):
        registry.task("w", "")


def test_preload_reports_every_failure_and_caches_the_good_13_11() -> None:
    registry = ready("good", "A")
    registry.load_workflow_config(chain("bad1", "A"))
    registry.load_workflow_config(chain("bad2", "X", "Y"))
    with pytest.raises(
        ExceptionGroup, match=r"2 workflow definition\(s\) failed to build: 'bad1', 'bad2'"
    ) as info:
        registry.preload_workflow_definitions()
    errors = [e for e in info.value.exceptions if isinstance(e, MissingWorkerError)]
    assert len(errors) == len(info.value.exceptions) == 2
    assert [e.workflow_type for e in errors] == ["bad1", "bad2"]
    assert errors[1].nodes == ("X", "Y")
    # the good definition was built and cached: its config can no longer change
    with pytest.raises(ConfigError, match="already built"):
        registry.load_workflow_config(chain("good", "A", "B"))


def test_preload_all_good() -> None:
    registry = ready("w", "A")
    registry.preload_workflow_definitions()  # raises nothing
    assert registry.get_workflow_definition("w") is registry.get_workflow_definition("w")  # cached
    Registry().preload_workflow_definitions()  # nothing loaded: nothing to do


def test_concurrent_first_loads_build_once_13_12() -> None:
    registry = ready("w", *[f"N{i}" for i in range(200)])
    barrier = threading.Barrier(50)

    def load() -> object:
        barrier.wait()
        return registry.get_workflow_definition("w")

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda _: load(), range(50)))
    assert len({id(r) for r in results}) == 1


async def test_concurrent_first_loads_from_tasks_get_one_object() -> None:
    registry = ready("w", "A", "B")

    async def load() -> object:
        await asyncio.sleep(0)
        return registry.get_workflow_definition("w")

    results = await asyncio.gather(*(load() for _ in range(50)))
    assert all(r is results[0] for r in results)


def test_module_functions_use_the_default_registry() -> None:
    wid = f"default-{uuid.uuid4().hex}"
    registry_module.load_workflow_config(chain(wid, "A"))
    worker: TaskWorker = Ok()
    registry_module.register_workflow_task(wid, "A", worker)
    definition = registry_module.get_workflow_definition(wid)
    assert default_registry.has_workflow(wid)
    assert default_registry.get_workflow_definition(wid) is definition
    assert definition.node("A").worker is worker


def test_module_preload_uses_the_default_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    isolated = Registry()
    monkeypatch.setattr(registry_module, "default_registry", isolated)
    registry_module.load_workflow_config(chain("w", "A"))
    with pytest.raises(ExceptionGroup, match="'w'"):
        registry_module.preload_workflow_definitions()
    isolated.register_workflow_task("w", "A", Ok())
    registry_module.preload_workflow_definitions()
    assert isolated.get_workflow_definition("w").nodes_count == 3
