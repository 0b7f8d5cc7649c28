"""asyncflow: an embedded, asyncio-native DAG workflow engine on SQL (SQLite or PostgreSQL).

Workflows are DAGs declared as config; workers do the work of each node; a ``WorkflowService`` creates,
runs, cancels and restarts instances whose state lives in SQL; a ``WorkflowDriver`` runs many instances
at once. See the README for a quickstart.
"""

from __future__ import annotations

from .clock import Clock, FakeClock, SystemClock
from .config import NodeConfig, WorkflowConfig
from .context import JSONContext, merge_json_contexts
from .definition import MissingWorkerError, NodeDefinition, WorkflowDefinition
from .driver import DriverConfig, DriverStats, WorkflowDriver
from .engine.observers import WorkflowObserver
from .engine.rules import SchedulePolicy
from .engine.service import WorkflowService
from .errors import (
    AsyncflowError,
    BusinessCriticalError,
    BusinessWarningError,
    ConfigError,
    ConfigNotFoundError,
    DefinitionNotFoundError,
    DuplicateWorkflowError,
    InstanceNotFoundError,
    InvalidStateError,
    LockFailedError,
    ParamInvalidError,
    StoreError,
    TaskFailedContinue,
    TaskFailedTerminate,
    TaskInstanceNotFoundError,
    TaskNotReady,
    TaskWorkerAlreadyRegisteredError,
    TaskWorkerNotFoundError,
    UniqueViolationError,
    WorkerSignal,
    is_serious_error,
)
from .lock.database import DatabaseWorkflowLock
from .lock.local import LocalWorkflowLock
from .lock.postgres import PostgresAdvisoryLock
from .lock.protocol import LockLease, WorkflowLock
from .lock.redis import RedisWorkflowLock
from .records import (
    NodeExternalEvent,
    Pager,
    QueryWorkflowInstanceParams,
    TaskInstanceDetail,
    TaskInstanceRecord,
    WorkflowInstance,
    WorkflowInstanceDetail,
    WorkflowInstanceRecord,
)
from .registry import (
    Registry,
    default_registry,
    get_workflow_definition,
    load_workflow_config,
    preload_workflow_definitions,
    register_workflow_task,
)
from .retry import RetryPolicy
from .schedules import Schedule
from .status import (
    END_NODE,
    NODE_EVENT,
    PRE_NODE_CONTEXT,
    REASON,
    ROOT_NODE,
    SYSTEM,
    WORKFLOW_CONTEXT,
    InstanceStatus,
    TaskStatus,
    instance_status_text,
    is_over_instance_status,
    is_over_task_status,
    task_status_text,
)
from .store.memory import MemoryWorkflowRepo
from .store.protocol import WorkflowRepo
from .store.sqlalchemy import SQLAlchemyWorkflowRepo
from .store.tables import SCHEMA_VERSION, metadata
from .worker import (
    BaseTaskWorker,
    EmptyTaskWorker,
    EndNodeWorker,
    NodeInfo,
    NormalTaskWorker,
    RootNodeWorker,
    TaskWorker,
    choose,
    current_node,
    heartbeat,
    start_child_workflow,
)

__version__ = "0.2.0.dev0"

__all__ = [  # noqa: RUF022 - plain sorted() order, checked by tests/unit/test_public_api.py
    "AsyncflowError",
    "BaseTaskWorker",
    "BusinessCriticalError",
    "BusinessWarningError",
    "Clock",
    "ConfigError",
    "ConfigNotFoundError",
    "DatabaseWorkflowLock",
    "DefinitionNotFoundError",
    "DriverConfig",
    "DriverStats",
    "DuplicateWorkflowError",
    "END_NODE",
    "EmptyTaskWorker",
    "EndNodeWorker",
    "FakeClock",
    "InstanceNotFoundError",
    "InstanceStatus",
    "InvalidStateError",
    "JSONContext",
    "LocalWorkflowLock",
    "LockFailedError",
    "LockLease",
    "MemoryWorkflowRepo",
    "MissingWorkerError",
    "NODE_EVENT",
    "NodeConfig",
    "NodeDefinition",
    "NodeExternalEvent",
    "NodeInfo",
    "NormalTaskWorker",
    "PRE_NODE_CONTEXT",
    "Pager",
    "ParamInvalidError",
    "PostgresAdvisoryLock",
    "QueryWorkflowInstanceParams",
    "REASON",
    "ROOT_NODE",
    "RedisWorkflowLock",
    "Registry",
    "RetryPolicy",
    "RootNodeWorker",
    "SCHEMA_VERSION",
    "SQLAlchemyWorkflowRepo",
    "SYSTEM",
    "Schedule",
    "SchedulePolicy",
    "StoreError",
    "SystemClock",
    "TaskFailedContinue",
    "TaskFailedTerminate",
    "TaskInstanceDetail",
    "TaskInstanceNotFoundError",
    "TaskInstanceRecord",
    "TaskNotReady",
    "TaskStatus",
    "TaskWorker",
    "TaskWorkerAlreadyRegisteredError",
    "TaskWorkerNotFoundError",
    "UniqueViolationError",
    "WORKFLOW_CONTEXT",
    "WorkerSignal",
    "WorkflowConfig",
    "WorkflowDefinition",
    "WorkflowDriver",
    "WorkflowInstance",
    "WorkflowInstanceDetail",
    "WorkflowInstanceRecord",
    "WorkflowLock",
    "WorkflowObserver",
    "WorkflowRepo",
    "WorkflowService",
    "__version__",
    "choose",
    "current_node",
    "default_registry",
    "get_workflow_definition",
    "heartbeat",
    "instance_status_text",
    "is_over_instance_status",
    "is_over_task_status",
    "is_serious_error",
    "load_workflow_config",
    "merge_json_contexts",
    "metadata",
    "preload_workflow_definitions",
    "register_workflow_task",
    "start_child_workflow",
    "task_status_text",
]
