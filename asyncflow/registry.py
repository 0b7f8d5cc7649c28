"""The registry: workflow configs, their workers, and the definitions built from them.

A :class:`Registry` holds configs by workflow type, workers by ``(workflow_type, task_key)`` (plus public
workers by ``task_key`` alone, Go's ``IsPublic``) and caches each built :class:`WorkflowDefinition`.
``default_registry`` is the process-wide one that the module-level functions use; tests and embedders can
make isolated registries.

Rules (see also SEMANTICS.md "Definitions"):

* ``load_workflow_config`` validates the config at once (everything but the workers) and raises
  :class:`ConfigError`. Loading a config equal to the stored one is a no-op. Before the type's definition
  is first built, a different config replaces the stored one (as Go does); once it has been built, a
  different config raises :class:`ConfigError` ("already built").
* Workers may be registered before or after the config. The definition is built lazily, on first use, and
  a missing worker fails the build with :class:`~asyncflow.definition.MissingWorkerError` naming every
  node without one. Failed builds are never cached.
* Registering a worker for a type drops that type's cached definition, so the next use rebuilds it with
  the new worker. (A new public worker can never change a built definition, so it drops nothing.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from asyncflow._text import shown
from asyncflow.config import WorkflowConfig
from asyncflow.definition import WorkflowDefinition, build_definition, validate_config
from asyncflow.errors import (
    ConfigError,
    ConfigNotFoundError,
    ParamInvalidError,
    TaskWorkerAlreadyRegisteredError,
)
from asyncflow.schedules import Schedule
from asyncflow.worker import NormalTaskWorker, TaskWorker, WorkerFunction

__all__ = [
    "Registry",
    "default_registry",
    "get_workflow_definition",
    "load_workflow_config",
    "preload_workflow_definitions",
    "register_workflow_task",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _coerce_config(config: WorkflowConfig | Mapping[str, Any] | str | bytes) -> WorkflowConfig:
    if isinstance(config, WorkflowConfig):
        return config
    if isinstance(config, Mapping):
        return WorkflowConfig.from_dict(config)
    if isinstance(config, str | bytes | bytearray):
        return WorkflowConfig.from_json(config)
    if config is None:
        raise ParamInvalidError("config is None")
    raise ParamInvalidError(
        f"config must be a WorkflowConfig, a mapping or JSON text, got {type(config).__name__}"
    )


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ParamInvalidError(f"{what} must be a non-empty string, got {shown(value)}")
    return value


def _check_worker(worker: object, where: str) -> TaskWorker:
    if worker is None:
        raise ParamInvalidError(f"worker for {where} is None")
    if isinstance(worker, type):
        raise ParamInvalidError(f"worker for {where} is the class {worker.__name__}; pass an instance")
    if not (callable(getattr(worker, "run", None)) and callable(getattr(worker, "wait_check", None))):
        raise ParamInvalidError(
            f"worker for {where} ({type(worker).__name__}) does not implement TaskWorker "
            "(async run(ctx) and wait_check(ctx)); wrap functions in NormalTaskWorker or use Registry.task"
        )
    return worker  # type: ignore[return-value]  # checked structurally above


class Registry:
    """Workflow configs, task workers and the cached definitions built from them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._configs: dict[str, WorkflowConfig] = {}
        self._definitions: dict[str, WorkflowDefinition] = {}
        self._built: set[str] = set()
        self._workers: dict[tuple[str, str], TaskWorker] = {}
        self._public: dict[str, TaskWorker] = {}
        self._schedules: dict[str, Schedule] = {}

    def add_schedule(self, schedule: Schedule) -> None:
        """Add a cron :class:`~asyncflow.schedules.Schedule`; drivers of its workflow type fire it.

        A schedule id added twice raises ``ConfigError``; its workflow type must be loaded when a
        driver starts (``ConfigError`` then).
        """
        if not isinstance(schedule, Schedule):
            raise ConfigError(f"add_schedule needs an af.Schedule, got {type(schedule).__name__}")
        with self._lock:
            if schedule.id in self._schedules:
                raise ConfigError(f"schedule {schedule.id!r} is already added")
            self._schedules[schedule.id] = schedule

    @property
    def schedules(self) -> tuple[Schedule, ...]:
        """The schedules added, in order."""
        with self._lock:
            return tuple(self._schedules.values())

    def load_workflow_config(self, config: WorkflowConfig | Mapping[str, Any] | str | bytes) -> None:
        """Validate and store a workflow config (a :class:`WorkflowConfig`, a Go-shaped dict or JSON).

        Raises :class:`ConfigError` if the config is invalid, or if it differs from the config of a type
        whose definition was already built; ``ParamInvalidError`` for ``None`` or another type. Loading
        an equal config again is a no-op; before the first build a different config replaces the old one.
        """
        cfg = _coerce_config(config)
        validate_config(cfg)
        with self._lock:
            current = self._configs.get(cfg.id)
            if current == cfg:
                return
            if cfg.id in self._built:
                raise ConfigError(
                    f"workflow {cfg.id!r}: its definition is already built; a different config cannot "
                    "replace it",
                    workflow_type=cfg.id,
                )
            if current is not None:
                logger.info("workflow config %s replaced before its first build", cfg.id)
            self._configs[cfg.id] = cfg

    def register_workflow_task(self, workflow_type: str, task_key: str, worker: TaskWorker) -> None:
        """Register the worker of node ``task_key`` of ``workflow_type``.

        Raises ``ParamInvalidError`` for an empty key or something that is not a worker instance, and
        :class:`TaskWorkerAlreadyRegisteredError` if that key has a worker. Drops the type's cached
        definition, so the next use rebuilds it with this worker.
        """
        _check_name(workflow_type, "workflow_type")
        _check_name(task_key, "task_key")
        checked = _check_worker(worker, f"workflow {workflow_type!r} task {task_key!r}")
        with self._lock:
            key = (workflow_type, task_key)
            if key in self._workers:
                raise TaskWorkerAlreadyRegisteredError(
                    f"a worker is already registered for workflow {workflow_type!r} task {task_key!r}"
                )
            self._workers[key] = checked
            if self._definitions.pop(workflow_type, None) is not None:
                logger.debug("workflow definition %s dropped: worker %s registered", workflow_type, task_key)

    def register_public_task(self, task_key: str, worker: TaskWorker) -> None:
        """Register a public worker (Go ``IsPublic``): it serves node ``task_key`` of every workflow type
        that has no worker of its own for that key.

        Raises ``ParamInvalidError`` or :class:`TaskWorkerAlreadyRegisteredError` like
        :meth:`register_workflow_task`.
        """
        _check_name(task_key, "task_key")
        checked = _check_worker(worker, f"public task {task_key!r}")
        with self._lock:
            if task_key in self._public:
                raise TaskWorkerAlreadyRegisteredError(
                    f"a public worker is already registered for {task_key!r}"
                )
            self._public[task_key] = checked

    def task(
        self, workflow_type: str, task_key: str, *, wait_check: WorkerFunction | None = None
    ) -> Callable[[F], F]:
        """Decorator: register ``run`` (``async def run(ctx)`` or a plain function) as a node's worker.

        The decorated function is returned unchanged. ``wait_check``, if given, is the node's wait check;
        without it the node is synchronous. See :class:`~asyncflow.worker.NormalTaskWorker`.
        """
        _check_name(workflow_type, "workflow_type")
        _check_name(task_key, "task_key")
        if wait_check is not None and not callable(wait_check):
            raise ParamInvalidError(f"wait_check must be callable, got {type(wait_check).__name__}")

        def decorator(run: F) -> F:
            if not callable(run):
                raise ParamInvalidError(f"Registry.task decorates a function, got {type(run).__name__}")
            self.register_workflow_task(
                workflow_type, task_key, NormalTaskWorker(run=run, wait_check=wait_check)
            )
            return run

        return decorator

    def _resolve(self, workflow_type: str, task_key: str) -> TaskWorker | None:
        worker = self._workers.get((workflow_type, task_key))
        if worker is None:
            worker = self._public.get(task_key)
        return worker

    def get_workflow_definition(self, workflow_type: str) -> WorkflowDefinition:
        """The definition of ``workflow_type``, built and validated on first use, then cached.

        Raises :class:`ConfigNotFoundError` if no config is loaded for the type, and :class:`ConfigError`
        (:class:`~asyncflow.definition.MissingWorkerError` for missing workers) if it cannot build.
        Concurrent first calls build once and get the same object.
        """
        definition = self._definitions.get(workflow_type)
        if definition is not None:
            return definition
        with self._lock:
            definition = self._definitions.get(workflow_type)
            if definition is not None:
                return definition
            config = self._configs.get(workflow_type)
            if config is None:
                raise ConfigNotFoundError(f"workflow config {workflow_type!r} not found")
            definition = build_definition(config, lambda key: self._resolve(workflow_type, key))
            self._definitions[workflow_type] = definition
            self._built.add(workflow_type)
        logger.debug("workflow definition %s built with %d nodes", workflow_type, definition.nodes_count)
        return definition

    def preload_workflow_definitions(self) -> None:
        """Build every loaded workflow type now.

        Keeps going past failures (the good definitions are cached) and then raises an
        ``ExceptionGroup`` holding every failure, each naming its workflow type.
        """
        failures: list[Exception] = []
        failed: list[str] = []
        for workflow_type in self.workflow_types():
            try:
                self.get_workflow_definition(workflow_type)
            except Exception as exc:
                failures.append(exc)
                failed.append(workflow_type)
        if failures:
            names = ", ".join(repr(name) for name in failed)
            raise ExceptionGroup(f"{len(failures)} workflow definition(s) failed to build: {names}", failures)

    def workflow_types(self) -> list[str]:
        """The loaded workflow types, in load order."""
        with self._lock:
            return list(self._configs)

    def has_workflow(self, workflow_type: str) -> bool:
        """Whether a config is loaded for ``workflow_type``."""
        return workflow_type in self._configs


#: The process-wide registry used by the module-level functions.
default_registry = Registry()


def load_workflow_config(config: WorkflowConfig | Mapping[str, Any] | str | bytes) -> None:
    """:meth:`Registry.load_workflow_config` on :data:`default_registry`."""
    default_registry.load_workflow_config(config)


def register_workflow_task(workflow_type: str, task_key: str, worker: TaskWorker) -> None:
    """:meth:`Registry.register_workflow_task` on :data:`default_registry`."""
    default_registry.register_workflow_task(workflow_type, task_key, worker)


def get_workflow_definition(workflow_type: str) -> WorkflowDefinition:
    """:meth:`Registry.get_workflow_definition` on :data:`default_registry`."""
    return default_registry.get_workflow_definition(workflow_type)


def preload_workflow_definitions() -> None:
    """:meth:`Registry.preload_workflow_definitions` on :data:`default_registry`."""
    default_registry.preload_workflow_definitions()
