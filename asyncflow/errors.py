"""Every exception asyncflow raises, and the signals workers raise.

The tree::

    Exception
    ├── AsyncflowError
    │   ├── ParamInvalidError (+ ValueError)        bad argument from the caller
    │   ├── ConfigError (+ ValueError)              a workflow config that cannot build
    │   ├── ConfigNotFoundError (+ LookupError)     no config loaded for a workflow type
    │   ├── DefinitionNotFoundError (+ LookupError)
    │   ├── TaskWorkerNotFoundError (+ LookupError)
    │   ├── TaskWorkerAlreadyRegisteredError
    │   ├── InstanceNotFoundError (+ LookupError)
    │   ├── TaskInstanceNotFoundError (+ LookupError)
    │   ├── InvalidStateError                       not allowed in the current status / stale event
    │   ├── LockFailedError                         the instance lock is held elsewhere or unreachable
    │   └── StoreError                              database failure; the driver error is __cause__
    │       └── UniqueViolationError                a unique constraint refused a row
    ├── WorkerSignal                                raised by workers to steer the engine
    │   ├── TaskNotReady                            not yet; poll again later
    │   ├── TaskFailedContinue                      failed, but count the node as completed
    │   └── TaskFailedTerminate                     fail the whole workflow
    ├── BusinessCriticalError                       business alert: needs a human (logged at ERROR)
    └── BusinessWarningError                        business alert: logged at WARN

A signal also counts when it is found in the ``__cause__``/``__context__`` chain of what a worker
raised, like Go's ``errors.Is``: ``raise RuntimeError("x") from TaskNotReady()`` is "not ready".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)

__all__ = [
    "AsyncflowError",
    "BusinessCriticalError",
    "BusinessWarningError",
    "ConfigError",
    "ConfigNotFoundError",
    "DefinitionNotFoundError",
    "InstanceNotFoundError",
    "InvalidStateError",
    "LockFailedError",
    "ParamInvalidError",
    "StoreError",
    "TaskFailedContinue",
    "TaskFailedTerminate",
    "TaskInstanceNotFoundError",
    "TaskNotReady",
    "TaskWorkerAlreadyRegisteredError",
    "TaskWorkerNotFoundError",
    "UniqueViolationError",
    "WorkerSignal",
    "find_in_chain",
    "is_serious_error",
    "iter_exception_chain",
]


class AsyncflowError(Exception):
    """Root of every error asyncflow raises."""


class ParamInvalidError(AsyncflowError, ValueError):
    """An argument is invalid (Go: ``ErrWorkflowParamInvalid``)."""


class ConfigError(AsyncflowError, ValueError):
    """A workflow config cannot be built: cycle, unknown next node, duplicate or reserved id, ..."""

    def __init__(self, message: str, *, workflow_type: str = "", nodes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.workflow_type = workflow_type
        self.nodes = nodes


class ConfigNotFoundError(AsyncflowError, LookupError):
    """No config is loaded for the workflow type (Go: ``ErrWorkflowConfigNotFound``)."""


class DefinitionNotFoundError(AsyncflowError, LookupError):
    """No definition for the workflow type (Go: ``ErrWorkflowDefinitionNotFound``)."""


class TaskWorkerNotFoundError(AsyncflowError, LookupError):
    """No worker is registered for a node (Go: ``ErrWorkflowTaskWorkerNotFound``)."""


class TaskWorkerAlreadyRegisteredError(AsyncflowError):
    """A worker is already registered under that key."""


class InstanceNotFoundError(AsyncflowError, LookupError):
    """No workflow instance has that id."""


class TaskInstanceNotFoundError(AsyncflowError, LookupError):
    """The instance has no row for that node (it was never created)."""


class InvalidStateError(AsyncflowError):
    """The operation is not allowed in the current status, or an event is older than the stored one."""


class DuplicateWorkflowError(InvalidStateError):
    """``create_workflow(unique=..., on_duplicate="raise")`` found an instance with the same key.

    ``instance_id`` is the existing instance's id.
    """

    def __init__(self, message: str, *, instance_id: int) -> None:
        super().__init__(message)
        self.instance_id = instance_id


class LockFailedError(AsyncflowError):
    """The instance lock is held by another runner, was lost, or the lock backend failed."""


class StoreError(AsyncflowError):
    """The database failed; the driver's exception is ``__cause__``."""


class UniqueViolationError(StoreError):
    """A unique constraint refused the row (for example a duplicate node row)."""


class WorkerSignal(Exception):
    """Base of the signals a worker raises to steer the engine."""


class TaskNotReady(WorkerSignal):
    """Not ready yet: keep the node's status and fail count, poll again on a later pass."""


class TaskFailedContinue(WorkerSignal):
    """Failed, but treat the node as completed (its fail count goes up by one)."""


class TaskFailedTerminate(WorkerSignal):
    """Failed, and the whole workflow fails with it."""


class BusinessCriticalError(Exception):
    """For business code: a failure that needs manual intervention (serious, logged at ERROR)."""


class BusinessWarningError(Exception):
    """For business code: a failure worth a warning (not serious, logged at WARN)."""


_SERIOUS: tuple[type[BaseException], ...] = (
    ConfigNotFoundError,
    DefinitionNotFoundError,
    TaskWorkerNotFoundError,
    TaskWorkerAlreadyRegisteredError,
    InstanceNotFoundError,
    TaskInstanceNotFoundError,
    TaskFailedTerminate,
    TaskFailedContinue,
    BusinessCriticalError,
    ConfigError,
)


def iter_exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """Yield ``exc`` and everything reachable through ``__cause__`` and ``__context__`` (each once)."""
    seen: set[int] = set()
    stack = [exc] if exc is not None else []
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        # cause first, so a deliberate ``raise X from Y`` is found before an incidental context
        if current.__context__ is not None:
            stack.append(current.__context__)
        if current.__cause__ is not None:
            stack.append(current.__cause__)


def find_in_chain(exc: BaseException | None, kind: type[E]) -> E | None:
    """Return the first exception of type ``kind`` in the chain of ``exc`` (Go's ``errors.As``)."""
    for item in iter_exception_chain(exc):
        if isinstance(item, kind):
            return item
    return None


def is_serious_error(exc: BaseException | None) -> bool:
    """Go's ``IsSeriousError``: does this error need a human?

    True when the chain holds a "not found" or registration error, a terminating or continuing task
    failure, ``BusinessCriticalError`` or a ``ConfigError``. False for ``None``, ``TaskNotReady``,
    ``ParamInvalidError``, ``LockFailedError``, ``BusinessWarningError`` and plain exceptions.
    """
    return any(isinstance(item, _SERIOUS) for item in iter_exception_chain(exc))
