"""The public surface: API.md names are importable from ``asyncflow``; ``__all__`` is sorted and true;
imports between layers point one way (STYLE.md)."""

from __future__ import annotations

import ast
import pathlib

import asyncflow as af

API_NAMES = """
NodeConfig WorkflowConfig Registry default_registry load_workflow_config register_workflow_task
get_workflow_definition preload_workflow_definitions TaskWorker BaseTaskWorker EmptyTaskWorker
NormalTaskWorker RootNodeWorker EndNodeWorker current_node TaskNotReady TaskFailedContinue
TaskFailedTerminate JSONContext merge_json_contexts InstanceStatus TaskStatus is_over_instance_status
is_over_task_status instance_status_text task_status_text NODE_EVENT SYSTEM PRE_NODE_CONTEXT
WORKFLOW_CONTEXT REASON ROOT_NODE END_NODE AsyncflowError ParamInvalidError ConfigError
ConfigNotFoundError DefinitionNotFoundError TaskWorkerNotFoundError TaskWorkerAlreadyRegisteredError
InstanceNotFoundError TaskInstanceNotFoundError InvalidStateError LockFailedError StoreError
BusinessCriticalError BusinessWarningError is_serious_error SQLAlchemyWorkflowRepo MemoryWorkflowRepo
WorkflowRepo LocalWorkflowLock RedisWorkflowLock WorkflowLock WorkflowService NodeExternalEvent WorkflowDriver
QueryWorkflowInstanceParams Pager WorkflowInstance WorkflowInstanceRecord WorkflowInstanceDetail
TaskInstanceDetail WorkflowDefinition NodeDefinition WorkflowObserver
""".split()  # noqa: SIM905

PACKAGE = pathlib.Path(af.__file__).parent

# module (relative to the package) -> the layer it belongs to; lower layers never import higher ones
LAYERS = {
    "errors": 0,
    "status": 0,
    "clock": 0,
    "_json_depth": 0,
    "_text": 0,
    "records": 1,
    "_urls": 1,
    "context": 1,
    "config": 2,
    "worker": 2,
    "definition": 3,
    "registry": 4,
    "store": 5,
    "lock": 5,
    "engine": 6,
    "driver": 7,
    "integrations": 8,
    "cli": 8,
    "web": 8,
    "demo": 8,
    "__main__": 9,
}


def test_api_names_are_exported() -> None:
    missing = [name for name in API_NAMES if not hasattr(af, name)]
    assert missing == []
    assert set(API_NAMES) <= set(af.__all__)


def test_all_is_sorted_and_resolvable() -> None:
    assert af.__all__ == sorted(af.__all__)
    assert len(set(af.__all__)) == len(af.__all__)
    for name in af.__all__:
        assert hasattr(af, name), name


def _layer(module: str) -> int | None:
    head = module.split(".")[0]
    return LAYERS.get(head)


def test_imports_point_one_way() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.name == "__init__" and rel.parent == pathlib.Path("."):
            continue
        own = _layer(".".join(rel.parts))
        if own is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = list(rel.parts[: len(rel.parts) - node.level])
                    target = ".".join([*parts, base] if base else parts)
                elif base.startswith("asyncflow."):
                    target = base[len("asyncflow.") :]
                else:
                    continue
                targets.append(target)
            for target in targets:
                layer = _layer(target)
                if layer is not None and layer > own:
                    violations.append(f"{'.'.join(rel.parts)} imports {target}")
    assert violations == []


def test_errors_subclass_the_root_and_builtins() -> None:
    assert issubclass(af.InstanceNotFoundError, LookupError)
    assert issubclass(af.ParamInvalidError, ValueError)
    for name in ("ConfigError", "StoreError", "LockFailedError", "InvalidStateError"):
        assert issubclass(getattr(af, name), af.AsyncflowError)


def test_the_version_is_pyproject_s() -> None:
    """``asyncflow.__version__`` (``asyncflow --version``) and ``pyproject.toml`` say the same."""
    import re
    import tomllib

    checkout = pathlib.Path(__file__).parents[2]
    pyproject = tomllib.loads((checkout / "pyproject.toml").read_text(encoding="utf-8"))
    assert af.__version__ == pyproject["project"]["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", af.__version__)
