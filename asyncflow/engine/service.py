"""``WorkflowService``: create, run, cancel, restart and query workflow instances.

Every mutating operation on an existing instance takes the instance lock
(``workflow_instance_execute_<id>``), except ``cancel_workflow_instance``, which must succeed while a
pass runs: it is one transaction, and the running pass stops at its next (compare-and-set) write.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal, TypeVar

from .._json_depth import MAX_JSON_DEPTH, check_json_depth
from .._numbers import finite
from .._text import shown, too_long
from ..clock import SYSTEM_CLOCK, Clock
from ..config import count_problem
from ..context import INT64_MAX, INT64_MIN, JSONContext
from ..definition import WorkflowDefinition
from ..errors import (
    AsyncflowError,
    DuplicateWorkflowError,
    InstanceNotFoundError,
    InvalidStateError,
    LockFailedError,
    ParamInvalidError,
    TaskInstanceNotFoundError,
    UniqueViolationError,
)
from ..lock.local import Handoffs, LocalWorkflowLock
from ..lock.protocol import WorkflowLock
from ..records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    NodeExternalEvent,
    QueryWorkflowInstanceParams,
    Step,
    TaskFields,
    TaskInstanceDetail,
    TaskInstanceRecord,
    TaskUpdate,
    TaskWhere,
    WorkflowInstance,
    WorkflowInstanceDetail,
    WorkflowInstanceRecord,
)
from ..registry import Registry, default_registry
from ..retry import RetryPolicy
from ..status import (
    NODE_EVENT,
    RUNNABLE_INSTANCE_STATUSES,
    SYSTEM,
    InstanceStatus,
    TaskStatus,
    is_over_instance_status,
    is_over_task_status,
)
from ..store._session import call_after_commit
from ..store.protocol import WorkflowRepo
from ._starting import UniqueFlights, check_unique, session_scope, start_ms
from .inflight import Watchtower
from .observers import ObserverSet, WorkflowObserver
from .retention import PURGEABLE_STATUSES, purge_request
from .rules import SchedulePolicy
from .runner import RETRY_AT, PassRunner, StallWarnings, active_passes
from .waiting import Waiters

__all__ = ["WorkflowService", "lock_key"]

logger = logging.getLogger("asyncflow.engine")

_T = TypeVar("_T")

_NON_TERMINAL_TASK = (
    TaskStatus.INIT.value,
    TaskStatus.RESTARTING.value,
    TaskStatus.RUNNING.value,
    TaskStatus.PENDING.value,
    TaskStatus.FINISHING.value,
)
_ACTIVE = RUNNABLE_INSTANCE_STATUSES
_FAILED = InstanceStatus.FAILED.value  # read once: an enum's .value is a Python-level property
_MAX_WAIT_INTERVAL = 1e15
"""The longest ``run_pass(wait_interval=)``: its due time in unix ms still fits in int64."""


_CLAIM_AND_READ = ("claim_due_states", "claim_due_instances", "load_instance_state")
"""What a driver's handed-over claim replaces: a repo class that hands over lists these three methods
as it defines them in ``_HANDS_OVER_WITH`` (see ``WorkflowService._claims_rows``)."""


def lock_key(instance_id: int) -> str:
    """The lock key of an instance, as in Go."""
    return f"workflow_instance_execute_{instance_id}"


def _check_id(instance_id: object, name: str = "instance_id") -> int:
    if isinstance(instance_id, bool) or not isinstance(instance_id, int) or not 0 < instance_id <= INT64_MAX:
        # beyond int64 no row has it (the repo refuses it), and the lock key could not write it out
        raise ParamInvalidError(f"{name} must be a positive int64, got {shown(instance_id)}")
    return instance_id


def _check_timeout(timeout: object) -> None:
    """A ``timeout=``: seconds >= 0 (``inf`` too) or ``None``. NaN, a negative value and an int beyond
    a float's range (its deadline would raise a raw ``OverflowError``) raise ``ParamInvalidError``."""
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not timeout >= 0
        or (isinstance(timeout, int) and timeout > sys.float_info.max)  # asyncio.timeout: a float
    ):
        raise ParamInvalidError(f"timeout must be a number of seconds >= 0 or None, got {shown(timeout)}")


def _context_dict(context: object, name: str) -> dict[str, Any]:
    if context is None:
        return {}
    if isinstance(context, JSONContext):
        check_json_depth(context.to_map(), name)  # before the (recursive) copy
        return context.clone().to_map()
    if type(context) is dict or isinstance(context, Mapping):  # a dict before the ABC's (slower) check
        check_json_depth(context, name)
        return dict(context)
    raise ParamInvalidError(f"{name} must be a mapping or JSONContext, got {type(context).__name__}")


class WorkflowService:
    """The engine's operations on workflow instances.

    ``repo`` stores instances and nodes; ``lock`` keeps one runner per instance (leases of
    ``lock_ttl`` seconds, renewed while held). ``schedule`` decides when the driver looks at an instance
    again after a pass; ``retry`` is the back-off of retryable failures (a node's own ``retry``
    replaces it) and ``default_fail_max_count`` the ``fail_max_count`` of nodes whose config leaves it
    unset (``None``: no limit); ``branch_concurrency`` bounds the nodes of one instance run at once in a pass.
    ``observers`` (:class:`~asyncflow.engine.observers.WorkflowObserver`) are told about instances and
    node attempts; :meth:`aclose` waits for their async calls still running.
    ``visible_after`` (seconds, ``None``: off) makes a node whose ``run`` lasts longer visible while
    it runs: its row is stored as ``running`` with its ``started_at`` (one extra write per slow node,
    none for quick ones); :func:`~asyncflow.heartbeat` adds progress.
    """

    def __init__(
        self,
        repo: WorkflowRepo,
        lock: WorkflowLock,
        registry: Registry = default_registry,
        *,
        lock_ttl: float = 30.0,
        schedule: SchedulePolicy | None = None,
        retry: RetryPolicy | None = None,
        default_fail_max_count: int | None = None,
        branch_concurrency: int = 16,
        clock: Clock | None = None,
        observers: Iterable[WorkflowObserver] = (),
        visible_after: float | None = None,
    ) -> None:
        if visible_after is not None and (
            isinstance(visible_after, bool)
            or not isinstance(visible_after, int | float)
            or not finite(visible_after)
            or visible_after < 0
        ):
            raise ParamInvalidError(
                f"visible_after must be a finite number of seconds >= 0 or None, got {shown(visible_after)}"
            )
        if (
            not isinstance(lock_ttl, int | float)
            or isinstance(lock_ttl, bool)
            or not finite(lock_ttl)
            or lock_ttl < 0.001
        ):
            raise ParamInvalidError(
                f"lock_ttl must be a finite number of seconds >= 0.001, got {shown(lock_ttl)}"
            )
        if isinstance(branch_concurrency, bool) or not isinstance(branch_concurrency, int):
            raise ParamInvalidError(f"branch_concurrency must be an int, got {shown(branch_concurrency)}")
        if branch_concurrency < 1:
            raise ParamInvalidError(f"branch_concurrency must be at least 1, got {shown(branch_concurrency)}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ParamInvalidError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        problem = count_problem(default_fail_max_count, "default_fail_max_count")
        if problem is not None:
            raise ParamInvalidError(problem)
        self.repo = repo
        self.lock = lock
        self.registry = registry
        self.lock_ttl = float(lock_ttl)
        self.schedule = schedule or SchedulePolicy()
        self.retry = retry or self.schedule.legacy_retry or RetryPolicy()
        self.default_fail_max_count = default_fail_max_count
        self.branch_concurrency = branch_concurrency
        self.visible_after = None if visible_after is None else float(visible_after)
        self._watchtower = None if self.visible_after is None else Watchtower(self.visible_after)
        self.clock: Clock = clock or SYSTEM_CLOCK
        self._due_listeners: list[Callable[[int], None]] = []
        self._stalls = StallWarnings()
        self._observers = ObserverSet(observers)
        self._waiters = Waiters(repo)
        self._unique_flights = UniqueFlights()

    def add_observer(self, observer: WorkflowObserver) -> None:
        """Tell ``observer`` too, from the next operation on (``ParamInvalidError`` if it has no hook)."""
        self._observers.add(observer)

    async def aclose(self) -> None:
        """Wait briefly for async observer calls still running, then cancel them (the repo and lock
        stay open: they are the caller's); stop the ``visible_after`` watchtower; end the LISTEN of
        ``wait_for_workflow`` (waiters still waiting, and later ones, poll)."""
        try:
            await self._observers.aclose()
            if self._watchtower is not None:
                await self._watchtower.aclose()
        finally:
            await self._waiters.aclose()

    def add_due_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(instance_id)`` whenever this service makes an instance due now.

        That is after ``create_workflow(run=False)`` (with ``session=``, once the caller commits), an
        external event and a restart without ``run``.
        A driver in the same process uses it to wake at once. Callbacks must not block or raise.
        """
        self._due_listeners.append(callback)

    def remove_due_listener(self, callback: Callable[[int], None]) -> None:
        """Undo :meth:`add_due_listener` (no error if it was not added)."""
        with contextlib.suppress(ValueError):
            self._due_listeners.remove(callback)

    def _announce_due(self, instance_id: int) -> None:
        for callback in list(self._due_listeners):
            try:
                callback(instance_id)
            except Exception:  # a listener must never break the operation that made work due
                logger.exception("due listener %r failed", callback)

    def _now_ms(self) -> int:
        return int(self.clock.time() * 1000)

    # ------------------------------------------------------------------ create and run

    async def create_workflow(
        self,
        workflow_type: str,
        business_id: str,
        *,
        context: Mapping[str, Any] | JSONContext | None = None,
        run: bool = False,
        task_id: int = 0,
        start_at: datetime | None = None,
        start_in: float | timedelta | None = None,
        unique: Literal["active", "always"] | None = None,
        on_duplicate: Literal["return", "raise"] = "return",
        session: object | None = None,
    ) -> WorkflowInstance:
        """Create an instance (status ``init``); with ``run=True`` return it after its first pass.

        ``start_at`` (a timezone-aware ``datetime``) or ``start_in`` (seconds or a ``timedelta``), not
        both: the instance is stored now, but no driver runs it before that time (an explicit
        ``run_workflow`` runs it at once). The definition must build (``ConfigNotFoundError``/
        ``ConfigError`` otherwise, nothing written). A context that is not a JSON object, a naive
        ``start_at`` or ``run=True`` with a start in the future raise ``ParamInvalidError``. If the
        first pass fails (lock or store error), the error is raised with the new id in
        ``exc.instance_id``.

        ``unique="active"``: no row is inserted if an ``init``/``running`` instance of this type and
        business id, created with ``unique`` set, exists; ``unique="always"``: the same for such an
        instance in any status. Then ``on_duplicate="return"`` returns the existing instance (it is not
        run) and ``"raise"`` raises ``DuplicateWorkflowError`` (``.instance_id`` is the existing id).
        The database's unique indexes decide, so concurrent creates leave exactly one instance.

        ``session``: an SQLAlchemy ``AsyncSession`` or ``AsyncConnection`` in an open transaction on
        the repo's database: the instance is inserted in that transaction (drivers see it once the
        caller commits; a rollback undoes it). Observers and due listeners are told once the caller
        commits it, never if it is undone (a rollback, of a savepoint it was made in too, or a close
        without commit). Not with ``run=True``, nor on a repo without SQL (``ParamInvalidError``).
        """
        if not isinstance(workflow_type, str) or not workflow_type:
            raise ParamInvalidError(f"workflow_type must be a non-empty str, got {shown(workflow_type)}")
        if not isinstance(business_id, str):
            raise ParamInvalidError(f"business_id must be a str, got {shown(business_id)}")
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise ParamInvalidError(f"task_id must be an int, got {shown(task_id)}")
        # the defaults (no unique, no session, no delay) skip their checks' calls: every create
        mode = None if unique is None and on_duplicate == "return" else check_unique(unique, on_duplicate)
        in_session = None if session is None else session_scope(self.repo, session, run)
        now_ms = self._now_ms()
        observers = self._observers if self._observers.active else None
        start = None if start_at is None and start_in is None else start_ms(start_at, start_in, now_ms)
        if run and start is not None and start > now_ms:
            raise ParamInvalidError("run=True cannot run an instance whose start is in the future")
        definition = self.registry.get_workflow_definition(workflow_type)
        # with run=True this call runs the first pass itself: keep drivers away for one lease
        next_run_at = now_ms + int(self.lock_ttl * 1000) if run else now_ms if start is None else start
        new = NewWorkflowInstance(
            workflow_type=workflow_type,
            business_id=business_id,
            workflow_context={} if context is None else _context_dict(context, "context"),
            task_id=task_id,
            next_run_at=next_run_at,
            unique=mode,
            trace_context=None if observers is None else observers.trace_context(),
            lease_epoch=1 if run else 0,  # run=True: this call's first pass holds the instance's first epoch
        )
        if in_session is None:  # on its own: no context manager to enter
            try:
                if mode is None:
                    record = await self.repo.create_workflow_instance(new)
                else:
                    record = await self._unique_flights.create(new, self.repo.create_workflow_instance)
            except DuplicateWorkflowError as duplicate:
                if on_duplicate == "raise":
                    raise
                return WorkflowInstance.from_record(await self._get(duplicate.instance_id), definition)
        else:
            async with in_session:
                try:
                    record = await self.repo.create_workflow_instance(new)
                except DuplicateWorkflowError as duplicate:
                    if on_duplicate == "raise":
                        raise
                    return WorkflowInstance.from_record(await self._get(duplicate.instance_id), definition)
        if logger.isEnabledFor(logging.DEBUG):  # the extra fields are not built for nothing
            logger.debug(
                "created workflow instance %s (%s)",
                record.id,
                workflow_type,
                extra={"instance_id": record.id, "workflow_type": workflow_type, "status": record.status},
            )
        if session is not None:  # told once the caller commits it: until then it may never exist
            call_after_commit(session, partial(self._committed, record, definition, observers))
            return WorkflowInstance.from_record(record, definition)
        if observers is not None:
            observers.instance_created(WorkflowInstance.from_record(record, definition))
        if not run:
            self._announce_due(record.id)  # a delayed one too: an idle driver learns its due time
            return WorkflowInstance.from_record(record, definition)
        try:
            return await self._run(record.id, known=(record, []), definition=definition)
        except AsyncflowError as exc:
            exc.instance_id = record.id  # type: ignore[attr-defined]
            exc.add_note(f"workflow instance {record.id} was created; its first pass failed")
            raise

    def _committed(
        self, record: WorkflowInstanceRecord, definition: WorkflowDefinition, observers: ObserverSet | None
    ) -> None:
        """A create in a caller's session, once the caller's transaction committed it: told as any."""
        if observers is not None:
            observers.instance_created(WorkflowInstance.from_record(record, definition))
        self._announce_due(record.id)

    async def wait_for_workflow(
        self,
        instance_id: int,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - API.md: seconds to wait at most
    ) -> WorkflowInstance:
        """The instance once it is ``completed``, ``failed`` or ``canceled`` (at once if it is).

        ``TimeoutError`` after ``timeout`` seconds, which bound the whole call, its first read
        included (a slow database does not stretch it); ``timeout=0`` makes that one read and no
        wait: the instance if it has ended, else ``TimeoutError``. ``InstanceNotFoundError`` for an
        unknown id; ``InvalidStateError`` inside a pass of the instance (a worker's ``run()`` that
        waits for its own instance, which cannot end while that node waits). An instance that ends
        through this service (a pass or a cancel of it) wakes the waiter at once; on PostgreSQL one
        that ends elsewhere (another process, or another service of this one) wakes it through
        LISTEN/NOTIFY (one connection for every waiter of this service); otherwise it is polled about
        once a second.
        """
        _check_id(instance_id)
        _check_timeout(timeout)
        if instance_id in active_passes.get():  # tasks a node starts inherit it: see the README
            raise InvalidStateError(
                f"workflow instance {instance_id} is being run by this very task: a node cannot wait for "
                "its own instance to end (it would wait forever)"
            )
        if timeout == 0:
            record = await self._get(instance_id)  # the one read: an ended instance is returned
            if not is_over_instance_status(record.status):
                raise TimeoutError(f"workflow instance {instance_id} is {record.status} (timeout=0)")
        else:
            async with asyncio.timeout(timeout):  # the first read too
                record = await self._get(instance_id)
                if not is_over_instance_status(record.status):
                    record = await self._waiters.wait(instance_id, self.repo.get_workflow_instance)
        return WorkflowInstance.from_record(record, self._definition_or_none(record))

    async def run_workflow(self, instance_id: int) -> WorkflowInstance:
        """One pass: run every ready node as far as it goes now; return the instance after it.

        A terminal instance is returned unchanged. Raises ``ParamInvalidError``,
        ``InstanceNotFoundError``, definition errors, ``LockFailedError`` and ``StoreError`` only;
        worker failures are recorded on their nodes.
        """
        return await self._run(_check_id(instance_id))

    async def run_pass(self, instance_id: int, *, wait_interval: float | None = None) -> WorkflowInstance:
        """``run_workflow`` with the driver's poll interval for nodes that are not ready.

        ``wait_interval``: seconds (finite, >= 0) before a node that is not ready is looked at again;
        ``None`` takes the service's ``schedule.poll_interval``."""
        _check_id(instance_id)
        if wait_interval is not None and (
            isinstance(wait_interval, bool)
            or not isinstance(wait_interval, int | float)
            or not 0 <= wait_interval <= _MAX_WAIT_INTERVAL  # NaN too; the due time must fit in int64 ms
        ):
            raise ParamInvalidError(
                f"wait_interval must be seconds in [0, {_MAX_WAIT_INTERVAL:g}] or None, "
                f"got {shown(wait_interval)}"
            )
        return await self._run(instance_id, wait_interval=wait_interval)

    def _handoffs(self) -> Handoffs | None:
        """Where a driver's claim hands this service's passes the rows it read: the in-process lock's
        (``LocalWorkflowLock.handoffs``, whose every holder is in this process), else ``None`` (another
        process may run an instance between its claim and its pass: each pass reads it)."""
        lock = self.lock
        return lock.handoffs if type(lock) is LocalWorkflowLock else None

    def _claims_rows(self) -> Callable[..., Awaitable[Any]] | None:
        """The repo's ``claim_due_states``, for a driver whose claims hand rows over (where
        :meth:`_handoffs` is not ``None``), or ``None``: only where the repo is asyncflow's as written
        (the claim, the pass's read and the handing claim all of one class, nothing patched on the
        object), so that a subclass or a patch that changes how instances are claimed or read is called
        as before."""
        repo = self.repo
        cls = type(repo)
        pristine = getattr(cls, "_HANDS_OVER_WITH", None)  # the methods as the repo's class defined them
        if pristine is None:
            return None
        patched = getattr(repo, "__dict__", {})
        for name, method in zip(_CLAIM_AND_READ, pristine, strict=True):
            if name in patched or getattr(cls, name, None) is not method:
                return None
        return repo.claim_due_states  # type: ignore[attr-defined, no-any-return]  # (not in the protocol)

    def _driver_pass(self, instance_id: int, wait_interval: float) -> Coroutine[Any, Any, WorkflowInstance]:
        """:meth:`run_pass` for a driver, in a task the driver made for this pass alone (with a context
        of its own): the pass drives its first node in that task (``PassRunner(drive_here=True)``).

        Not a coroutine function: it returns :meth:`_run`'s coroutine, so that the pass's task resumes
        through one coroutine fewer at each of its steps. ``instance_id`` is one the driver claimed
        (a stored id, never checked again)."""
        return self._driver_passes(wait_interval)(instance_id)

    def _driver_passes(self, wait_interval: float) -> Callable[[int], Coroutine[Any, Any, WorkflowInstance]]:
        """:meth:`_driver_pass` with ``wait_interval`` bound, for a driver to call once per pass: a
        function that returns :meth:`_run`'s coroutine at once (not a ``functools.partial``: one with
        keywords copies its dict and builds a tuple and a dict of arguments per call, which cost more
        than this function's frame)."""
        run = self._run

        def driver_pass(instance_id: int) -> Coroutine[Any, Any, WorkflowInstance]:
            return run(instance_id, wait_interval=wait_interval, drive_here=True, due_only=True)

        return driver_pass

    async def _run(
        self,
        instance_id: int,
        *,
        known: tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None = None,
        wait_interval: float | None = None,
        drive_here: bool = False,
        due_only: bool = False,
        definition: WorkflowDefinition | None = None,
    ) -> WorkflowInstance:
        """One pass under the instance's lock. ``known``: the instance's rows if they were just read
        (see below); ``definition``: its workflow type's, if the caller just looked it up."""
        if instance_id in active_passes.get():
            raise LockFailedError(
                f"workflow instance {instance_id} is being run by this very task (a worker cannot run "
                "its own instance)"
            )
        key = lock_key(instance_id)
        async with self.lock.hold(key, self.lock_ttl) as lease:
            if known is None and due_only:
                # a driver's pass: the row its claim read, if no other holder of the key ran since
                # (LocalWorkflowLock.handoffs): an instance nobody had run, which the claim took to epoch 1
                handoffs = self._handoffs()
                record = None if handoffs is None else handoffs.take(key, self.repo)
                if record is not None:
                    known = (record, [])
            if known is None:
                # the pass's first read takes its lease epoch; only the first pass of an instance nobody
                # has run yet runs on what its create returned (create_workflow(run=True): epoch 1) or a
                # driver's claim handed over (the claim took epoch 1); every other pass takes a new one
                known = await self.repo.load_instance_state(instance_id, lease=True)
                if known is None:
                    raise InstanceNotFoundError(f"workflow instance {instance_id} not found")
            instance, rows = known
            if instance.status not in _ACTIVE:  # terminal, or a status this engine does not know
                return WorkflowInstance.from_record(instance, self._definition_or_none(instance))
            if definition is None:
                definition = self.registry.get_workflow_definition(instance.workflow_type)
            runner = PassRunner(  # positionally: keywords would cost the type call a dict (8K instructions)
                self.repo,
                self.clock,
                lease,
                instance,
                definition,
                rows,
                self.retry,
                self.default_fail_max_count,
                self.schedule.poll_interval if wait_interval is None else wait_interval,  # wait_interval
                self.branch_concurrency,
                self._stalls,
                self._observers if self._observers.active else None,  # observers
                self.visible_after,
                self._watchtower,
                self._start_child,
                drive_here,
                due_only,
            )
            after = await runner.run()
        failed = after.status == _FAILED
        unused = [*runner.dropped, *runner.continued]
        if failed or unused:  # children no node will use any more
            await self._cancel_children(instance_id, nodes=None if failed else unused)
        if is_over_instance_status(after.status):
            self._waiters.finished(instance_id)
            if instance.parent_id is not None:
                await self._wake_parent(instance, after.status)
        elif runner.wake_again:
            await self._wake(instance_id)
        return after

    # ------------------------------------------------------------------ children

    async def _start_child(
        self,
        parent: WorkflowInstanceRecord,
        task_type: str,
        workflow_type: str,
        key: str,
        context: Mapping[str, Any] | JSONContext | None,
    ) -> WorkflowInstance:
        """``af.start_child_workflow`` inside ``parent``'s node ``task_type``: create the child once."""
        definition = self.registry.get_workflow_definition(workflow_type)
        observers = self._observers if self._observers.active else None
        business_id = f"{parent.business_id}/{task_type}/{key}"
        problem = too_long(business_id)
        if problem is not None:  # the repo would refuse it too, naming a business id the node never gave
            raise ParamInvalidError(
                f"start_child_workflow(): the child's business id (<parent business id>/{task_type}/<key>) "
                f"{problem}, got {len(business_id)} characters: use a shorter key (or parent business id)"
            )
        new = NewWorkflowInstance(
            workflow_type=workflow_type,
            business_id=business_id,
            workflow_context=_context_dict(context, "context"),
            next_run_at=self._now_ms(),
            trace_context=parent.trace_context,
        )
        record, created = await self.repo.create_child_instance(
            new, parent_id=parent.id, parent_node=task_type, child_key=key
        )
        if record.workflow_type != workflow_type:
            raise ParamInvalidError(
                f"start_child_workflow(): key {key!r} of node {task_type!r} already names a child of type "
                f"{record.workflow_type!r} (instance {record.id}), not {workflow_type!r}"
            )
        child = WorkflowInstance.from_record(record, definition)
        if created and observers is not None:  # inserted: told even if it is canceled at once below
            observers.instance_created(child)
        now = await self.repo.get_workflow_instance(parent.id)
        if now is None or now.status not in _ACTIVE:
            # canceled (or failed) since the pass began, and the cancel did not see this child: no
            # node will wait for it
            await self._cancel_late_child(record, parent.id)
            raise InvalidStateError(
                f"workflow instance {parent.id} is {now.status if now else 'gone'}: node {task_type!r} "
                f"starts no child workflow (child {key!r}, instance {record.id}, is canceled)"
            )
        if created:
            logger.debug(
                "created child workflow instance %s (%s) of instance %s node %s",
                record.id,
                workflow_type,
                parent.id,
                task_type,
                extra={"instance_id": record.id, "workflow_type": workflow_type, "status": record.status},
            )
            self._announce_due(record.id)
        return child

    async def _cancel_late_child(self, child: WorkflowInstanceRecord, parent_id: int) -> None:
        """A child whose parent is no longer active: cancel it (and its descendants) unless it ended."""
        canceled: list[WorkflowInstanceRecord] = []
        if not is_over_instance_status(child.status):
            async with self.repo.transaction():
                canceled = await self._cancel_tree(child)
        canceled += await self._cancel_late(canceled)
        self._canceled(canceled)
        if canceled:
            logger.warning(
                "workflow instance %s is no longer running: canceled child workflow instance %s that a "
                "pass of it started meanwhile",
                parent_id,
                child.id,
                extra={"instance_id": parent_id},
            )

    async def _cancel_late(self, canceled: list[WorkflowInstanceRecord]) -> list[WorkflowInstanceRecord]:
        """After a cancel of ``canceled`` is committed: cancel the children a pass of one of them inserted
        while the cancel ran (committed after the cancel read the children, before it committed, so
        neither the cancel nor the insert's own look at its parent in :meth:`_start_child` saw the
        other); an insert committed later sees its parent canceled. The instances canceled here.

        A store failure is logged: such a child then runs (cancel it by hand)."""
        more: list[WorkflowInstanceRecord] = []
        todo = canceled
        try:
            while todo:
                late: list[WorkflowInstanceRecord] = []
                for one in todo:
                    for child in await self.repo.query_child_instances(one.id):
                        if not is_over_instance_status(child.status):
                            late.append(child)
                if not late:
                    break
                todo = []
                async with self.repo.transaction():
                    for child in late:
                        todo += await self._cancel_tree(child)
                more += todo
        except AsyncflowError:
            logger.warning(
                "could not look for child workflows started while instances were canceled (%s)",
                ", ".join(str(one.id) for one in canceled),
                exc_info=True,
            )
        return more

    async def _wake(self, instance_id: int) -> None:
        """Make an active instance due now (not fencing a pass of it) and tell this process's driver.

        On PostgreSQL the new due time NOTIFYs the drivers of other processes too. A failure is logged:
        the instance is then found by its own next due time (a poll)."""
        try:
            await self.repo.apply_step(Step(instance_id=instance_id, next_run_at=self._now_ms()))
        except AsyncflowError:
            logger.warning(
                "could not wake workflow instance %s; it runs at its next due time",
                instance_id,
                exc_info=True,
                extra={"instance_id": instance_id},
            )
            return
        self._announce_due(instance_id)

    async def _wake_parent(self, child: WorkflowInstanceRecord, status: str) -> None:
        """A child ended (its end committed): its parent's node looks again now if it was the last of
        the node's children to end, or if it failed or was canceled (which fails the node at once).

        Each child looks at its siblings after its own end is committed, so of children ending at the
        same time at least the last to commit sees them all ended and wakes the parent."""
        parent_id = child.parent_id
        if parent_id is None:
            return
        if status == InstanceStatus.COMPLETED.value:
            try:
                siblings = await self.repo.query_child_instances(parent_id)
            except AsyncflowError:
                siblings = []  # wake it anyway
            if any(
                s.parent_node == child.parent_node
                and s.id != child.id
                and not is_over_instance_status(s.status)
                for s in siblings
            ):
                return
        await self._wake(parent_id)

    async def get_child_workflows(self, instance_id: int) -> list[WorkflowInstanceRecord]:
        """The child instances an instance's nodes started (``af.start_child_workflow``), by id; each
        record names its ``parent_node`` and ``child_key``."""
        return await self.repo.query_child_instances(_check_id(instance_id))

    def _definition_or_none(self, instance: WorkflowInstanceRecord) -> WorkflowDefinition | None:
        try:
            return self.registry.get_workflow_definition(instance.workflow_type)
        except AsyncflowError:
            return None

    async def _get(self, instance_id: int) -> WorkflowInstanceRecord:
        record = await self.repo.get_workflow_instance(instance_id)
        if record is None:
            raise InstanceNotFoundError(f"workflow instance {instance_id} not found")
        return record

    # ------------------------------------------------------------------ cancel

    async def cancel_workflow_instance(self, instance_id: int) -> None:
        """Cancel the instance and every non-terminal node, in one transaction.

        A terminal instance is left as it is (no error). Works while a pass runs: that pass stops at
        its next write. The instance's child workflows (``af.start_child_workflow``) that are not
        terminal are canceled in the same transaction, theirs too; a canceled child wakes its parent
        (whose waiting node then fails).
        """
        _check_id(instance_id)
        async with self.repo.transaction():
            record = await self._get(instance_id)
            if is_over_instance_status(record.status):
                return
            canceled = await self._cancel_tree(record)
        canceled += await self._cancel_late(canceled)
        self._canceled(canceled)
        if canceled and record.parent_id is not None:
            await self._wake_parent(record, InstanceStatus.CANCELED.value)

    async def _cancel_children(self, instance_id: int, *, nodes: Sequence[str] | None = None) -> None:
        """An instance that ended ``failed`` (or, with ``nodes``, the nodes of it a ``first`` join
        canceled or whose ``run()`` failed and continued): the child workflows they started that still
        run are canceled (theirs too), as when
        the parent is canceled; no child outlives the node that would have used it.

        After the parent's write is committed, in a transaction of its own: a crash in between leaves
        the children running (cancel them, or the parent, by hand). A failure is logged."""
        try:
            children = await self.repo.query_child_instances(instance_id)
            running = [
                child
                for child in children
                if not is_over_instance_status(child.status) and (nodes is None or child.parent_node in nodes)
            ]
            if not running:
                return
            canceled: list[WorkflowInstanceRecord] = []
            async with self.repo.transaction():
                for child in running:
                    canceled += await self._cancel_tree(child)
            canceled += await self._cancel_late(canceled)
        except AsyncflowError:
            logger.warning(
                "could not cancel the child workflows of instance %s",
                instance_id,
                exc_info=True,
                extra={"instance_id": instance_id},
            )
            return
        self._canceled(canceled)

    def _canceled(self, canceled: list[WorkflowInstanceRecord]) -> None:
        """What follows a committed cancel of these instances: waiters, observers, a log line each (a
        driver's claimed rows of them were withdrawn by :meth:`_cancel_tree`)."""
        for one in canceled:
            self._waiters.finished(one.id)
            if self._observers.active:
                done = dataclasses.replace(one, status=InstanceStatus.CANCELED.value)
                self._observers.instance_finished(
                    WorkflowInstance.from_record(done, self._definition_or_none(one))
                )
            logger.info(
                "workflow instance %s canceled",
                one.id,
                extra={"instance_id": one.id, "status": InstanceStatus.CANCELED.value},
            )

    async def _cancel_tree(self, record: WorkflowInstanceRecord) -> list[WorkflowInstanceRecord]:
        """Cancel an active instance, its non-terminal nodes and its active descendants (in the caller's
        transaction); the instances canceled."""
        changed = await self.repo.update_workflow_instances(
            InstanceWhere(ids=(record.id,), status_in=_ACTIVE),
            InstanceFields(status=InstanceStatus.CANCELED.value),
        )
        if changed == 0:  # became terminal meanwhile; nothing to cancel
            return []
        handoffs = self._handoffs()
        if handoffs is not None:  # a driver's claimed row of it is stale now (a cancel holds no key):
            handoffs.released(lock_key(record.id))  # withdrawn, and not offered by a claim still out
        await self.repo.update_task_instances(
            TaskWhere(workflow_instance_id=record.id, status_in=_NON_TERMINAL_TASK),
            TaskFields(status=TaskStatus.CANCELED.value),
        )
        canceled = [record]
        for child in await self.repo.query_child_instances(record.id):
            if not is_over_instance_status(child.status):
                canceled += await self._cancel_tree(child)
        return canceled

    # ------------------------------------------------------------------ events

    async def add_node_external_event(
        self,
        instance_id: int,
        task_type: str,
        event: NodeExternalEvent,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - API.md: seconds to wait for the instance lock
    ) -> None:
        """Store ``event`` under the node's ``node_event`` and wake the instance.

        ``event_ts`` is the version: an older one raises ``InvalidStateError`` (an equal one
        overwrites). The node must exist (``TaskInstanceNotFoundError``) and neither it nor the instance
        may be terminal (``InvalidStateError``). While a pass holds the instance lock this raises
        ``LockFailedError`` (nothing is written), unless ``timeout`` gives seconds to wait for it.
        """
        _check_id(instance_id)
        if not isinstance(task_type, str) or not task_type:
            raise ParamInvalidError(f"task_type must be a non-empty str, got {shown(task_type)}")
        if not isinstance(event, NodeExternalEvent):
            raise ParamInvalidError(f"event must be a NodeExternalEvent, got {type(event).__name__}")
        if isinstance(event.event_ts, bool) or not isinstance(event.event_ts, int):
            raise ParamInvalidError(f"event_ts must be an int, got {shown(event.event_ts)}")
        if not INT64_MIN <= event.event_ts <= INT64_MAX:  # the stored version is read back as an int64
            raise ParamInvalidError(f"event_ts must fit in 64 bits (signed), got {shown(event.event_ts)}")
        check_json_depth(event.event_content, "event_content", limit=MAX_JSON_DEPTH)
        _check_timeout(timeout)
        await self._holding(instance_id, timeout, lambda: self._store_event(instance_id, task_type, event))
        self._announce_due(instance_id)

    async def _holding(
        self,
        instance_id: int,
        timeout: float | None,  # noqa: ASYNC109 - seconds to wait for the instance lock
        operation: Callable[[], Awaitable[_T]],
    ) -> _T:
        """``operation()`` under the instance lock; a busy lock is retried until ``timeout`` runs out."""
        deadline = None if timeout is None else self.clock.monotonic() + max(0.0, float(timeout))
        delay = 0.005
        while True:
            try:
                async with self.lock.hold(lock_key(instance_id), self.lock_ttl):
                    return await operation()
            except LockFailedError:
                if deadline is None or self.clock.monotonic() >= deadline:
                    raise
            await asyncio.sleep(min(delay, max(0.0, deadline - self.clock.monotonic())))
            delay = min(delay * 2, 0.1)

    async def _store_event(self, instance_id: int, task_type: str, event: NodeExternalEvent) -> None:
        """One read and one atomic step: the node's context and the instance's due time, together."""
        state = await self.repo.load_instance_state(instance_id)
        if state is None:
            raise InstanceNotFoundError(f"workflow instance {instance_id} not found")
        record, rows = state
        if is_over_instance_status(record.status):
            raise InvalidStateError(f"workflow instance {instance_id} is {record.status}")
        row = next((r for r in rows if r.task_type == task_type), None)
        if row is None:
            raise TaskInstanceNotFoundError(
                f"workflow instance {instance_id} has no node {task_type!r} yet (not created)"
            )
        if is_over_task_status(row.status):
            raise InvalidStateError(f"node {task_type!r} of instance {instance_id} is {row.status}")
        context = JSONContext(row.node_context)
        stored_ts, _ = context.get_int64(NODE_EVENT, "event_ts")
        if event.event_ts < stored_ts:
            raise InvalidStateError(
                f"event_ts {event.event_ts} is older than the stored event_ts {stored_ts} of node "
                f"{task_type!r} (instance {instance_id})"
            )
        current = context.get(NODE_EVENT)[0]
        node_event = dict(current) if isinstance(current, dict) else {}
        node_event["event_ts"] = event.event_ts
        node_event["event_content"] = event.event_content
        context.set([NODE_EVENT], node_event)
        context.delete(SYSTEM, RETRY_AT)  # the node's retry back-off ends: the event is for it
        step = Step(
            instance_id=instance_id,
            instance_status_in=(record.status,),  # as read: a cancel since then refuses the event
            next_run_at=self._now_ms(),  # wake it
            updates=(TaskUpdate(id=row.id, expected_version=row.version, node_context=context.to_map()),),
        )
        if not (await self.repo.apply_step(step)).applied:
            raise InvalidStateError(
                f"node {task_type!r} of instance {instance_id}, or the instance's status, changed since "
                "the event read them: send it again"
            )

    # ------------------------------------------------------------------ restarts

    async def _reopen(self, where: InstanceWhere, fields: InstanceFields) -> int:
        """The restart's instance update; a unique instance whose key has another active instance now
        cannot run again (``InvalidStateError``: the unique index refused it)."""
        try:
            return await self.repo.update_workflow_instances(where, fields)
        except UniqueViolationError as exc:
            raise InvalidStateError(
                f"workflow instance {where.ids[0]} cannot run again: it was created unique and another "
                "instance of its type and business id is active now"
            ) from exc

    async def restart_workflow_node(
        self,
        instance_id: int,
        task_type: str,
        *,
        force: bool = False,
        run: bool = False,
        workflow_context: Mapping[str, Any] | JSONContext | None = None,
        clear_event: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - API.md: seconds to wait for the instance lock
    ) -> WorkflowInstance:
        """Reset the node and every descendant that has a row to ``restarting`` (one transaction).

        Fail counts go to 0 and timeout clocks restart. A terminal instance needs ``force=True`` (it
        becomes ``running``, and nodes its failure or cancel had canceled are restarted too), else
        ``InvalidStateError``. ``workflow_context``, if given, replaces the instance's workflow context
        in the same transaction (restarted nodes rebuild their contexts from it); ``clear_event=True``
        drops the node's stored ``node_event`` so it waits for a new one. A busy instance lock raises
        ``LockFailedError`` unless ``timeout`` gives seconds to wait for it. ``run=True`` runs a pass
        before returning.
        """
        _check_id(instance_id)
        if not isinstance(task_type, str) or not task_type:
            raise ParamInvalidError(f"task_type must be a non-empty str, got {shown(task_type)}")
        new_context = None
        if workflow_context is not None:
            new_context = _context_dict(workflow_context, "workflow_context")
        _check_timeout(timeout)
        definition = await self._holding(
            instance_id,
            timeout,
            lambda: self._restart_node(instance_id, task_type, force, new_context, clear_event),
        )
        logger.info(
            "restarted node %s of workflow instance %s",
            task_type,
            instance_id,
            extra={"instance_id": instance_id, "task_type": task_type, "status": "restarting"},
        )
        if run:
            return await self._run(instance_id)
        self._announce_due(instance_id)
        return WorkflowInstance.from_record(await self._get(instance_id), definition)

    async def _restart_node(
        self,
        instance_id: int,
        task_type: str,
        force: bool,
        new_context: dict[str, Any] | None,
        clear_event: bool,
    ) -> WorkflowDefinition:
        state = await self.repo.load_instance_state(instance_id)
        if state is None:
            raise InstanceNotFoundError(f"workflow instance {instance_id} not found")
        record, rows = state
        definition = self.registry.get_workflow_definition(record.workflow_type)
        if definition.get_node(task_type) is None:
            raise ParamInvalidError(f"workflow type {record.workflow_type!r} has no node {task_type!r}")
        over = is_over_instance_status(record.status)
        if over and not force:
            raise InvalidStateError(
                f"workflow instance {instance_id} is {record.status}; pass force=True to restart it"
            )
        reset = (task_type, *definition.descendants(task_type))
        restart = TaskFields(
            status=TaskStatus.RESTARTING.value, fail_count=0, started_at=int(self.clock.time())
        )
        row = next((r for r in rows if r.task_type == task_type), None)
        async with self.repo.transaction():
            fields = InstanceFields(
                status=InstanceStatus.RUNNING.value if over else None,
                workflow_context=new_context,
                next_run_at=self._now_ms(),
            )
            changed = await self._reopen(
                InstanceWhere(ids=(instance_id,), status_in=(record.status,)), fields
            )
            if changed == 0:
                raise InvalidStateError(f"workflow instance {instance_id} changed meanwhile")
            await self.repo.update_task_instances(
                TaskWhere(workflow_instance_id=instance_id, task_type_in=reset), restart
            )
            if over:
                await self.repo.update_task_instances(
                    TaskWhere(workflow_instance_id=instance_id, status_in=(TaskStatus.CANCELED.value,)),
                    restart,
                )
            if clear_event and row is not None and NODE_EVENT in row.node_context:
                kept = {k: v for k, v in row.node_context.items() if k != NODE_EVENT}
                await self.repo.update_task_instances(
                    TaskWhere(workflow_instance_id=instance_id, task_type_in=(task_type,)),
                    TaskFields(node_context=kept),
                )
        return definition

    async def restart_workflow_instance(
        self, instance_id: int, *, context: Mapping[str, Any] | JSONContext | None = None, run: bool = False
    ) -> WorkflowInstance:
        """Restart a ``failed`` or ``canceled`` instance: its failed and canceled nodes restart.

        ``completed`` raises ``InvalidStateError``; ``init``/``running`` is a no-op. ``context``, if
        given, replaces the workflow context that restarted nodes see. One transaction.
        """
        _check_id(instance_id)
        new_context = None if context is None else _context_dict(context, "context")
        async with self.lock.hold(lock_key(instance_id), self.lock_ttl):
            record = await self._get(instance_id)
            definition = self.registry.get_workflow_definition(record.workflow_type)
            if record.status == InstanceStatus.COMPLETED.value:
                raise InvalidStateError(f"workflow instance {instance_id} is completed; it cannot restart")
            if record.status in _ACTIVE:
                return WorkflowInstance.from_record(record, definition)
            now = int(self.clock.time())
            async with self.repo.transaction():
                changed = await self._reopen(
                    InstanceWhere(ids=(instance_id,), status_in=(record.status,)),
                    InstanceFields(
                        status=InstanceStatus.RUNNING.value,
                        workflow_context=new_context,
                        next_run_at=self._now_ms(),
                    ),
                )
                if changed == 0:
                    raise InvalidStateError(f"workflow instance {instance_id} changed meanwhile")
                await self.repo.update_task_instances(
                    TaskWhere(
                        workflow_instance_id=instance_id,
                        status_in=(TaskStatus.FAILED.value, TaskStatus.CANCELED.value),
                    ),
                    TaskFields(status=TaskStatus.RESTARTING.value, fail_count=0, started_at=now),
                )
            logger.info(
                "restarted workflow instance %s",
                instance_id,
                extra={"instance_id": instance_id, "status": InstanceStatus.RUNNING.value},
            )
            if run:
                return await self._run(instance_id)
            self._announce_due(instance_id)
            return WorkflowInstance.from_record(await self._get(instance_id), definition)

    # ------------------------------------------------------------------ retention

    async def purge_workflow_instances(
        self,
        *,
        older_than: float | timedelta,
        statuses: Iterable[str] = PURGEABLE_STATUSES,
        workflow_types: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete terminal instances last updated more than ``older_than`` (seconds or ``timedelta``)
        ago, with all their node rows; returns how many. ``statuses`` may only name terminal ones
        (else ``ParamInvalidError``); ``workflow_types`` narrows it, ``limit`` caps the count. Rows go
        in batches of 500, one short transaction each."""
        request = purge_request(self.clock.time(), older_than, statuses, workflow_types, limit)
        deleted = await self.repo.purge_workflow_instances(
            updated_before=request.updated_before,
            statuses=request.statuses,
            workflow_types=request.workflow_types,
            limit=request.limit,
        )
        if deleted:
            logger.info("purged %s workflow instance(s)", deleted, extra={"count": deleted})
        return deleted

    # ------------------------------------------------------------------ queries

    async def count_workflow_instances(self, params: QueryWorkflowInstanceParams | None = None) -> int:
        """How many instances match (paging ignored)."""
        return await self.repo.count_workflow_instances(_params(params))

    async def query_workflow_instances(
        self, params: QueryWorkflowInstanceParams | None = None
    ) -> list[WorkflowInstanceRecord]:
        """The matching instance records, paged (defaults: page 1, size 10; stable id order)."""
        return await self.repo.query_workflow_instances(_params(params))

    async def get_workflow_instance(self, instance_id: int) -> WorkflowInstance:
        """One instance (``InstanceNotFoundError`` if there is none)."""
        record = await self._get(_check_id(instance_id))
        return WorkflowInstance.from_record(record, self._definition_or_none(record))

    async def query_workflow_instance_detail(
        self, params: QueryWorkflowInstanceParams | None = None
    ) -> list[WorkflowInstanceDetail]:
        """Instances with one entry per definition node, in definition order (``uncreated`` if no row).

        An instance whose definition is not loaded in this process is still returned, with one entry
        per existing row (task name = task type, no pre/next keys).
        """
        records = await self.repo.query_workflow_instances(_params(params))
        details = []
        for record in records:
            rows = await self.repo.load_task_instances(record.id)
            details.append(_detail(record, rows, self._definition_or_none(record)))
        return details


def _params(params: QueryWorkflowInstanceParams | None) -> QueryWorkflowInstanceParams:
    if params is None:
        return QueryWorkflowInstanceParams()
    if not isinstance(params, QueryWorkflowInstanceParams):
        raise ParamInvalidError(f"params must be QueryWorkflowInstanceParams, got {type(params).__name__}")
    return params


def _detail(
    record: WorkflowInstanceRecord, rows: list[TaskInstanceRecord], definition: WorkflowDefinition | None
) -> WorkflowInstanceDetail:
    by_type = {row.task_type: row for row in rows}
    entries: list[TaskInstanceDetail] = []
    if definition is None:
        entries = [_entry(record.id, row.task_type, row.task_type, row, [], []) for row in rows]
    else:
        for node in definition.nodes:
            row = by_type.get(node.task_type)
            entries.append(
                _entry(
                    record.id,
                    node.task_type,
                    node.task_name,
                    row,
                    list(node.pre_nodes),
                    list(node.next_nodes),
                )
            )
    return WorkflowInstanceDetail(
        id=record.id,
        workflow_type=record.workflow_type,
        business_id=record.business_id,
        status=record.status,
        workflow_context=record.workflow_context,
        task_id=record.task_id,
        created_at=record.created_at,
        updated_at=record.updated_at,
        task_instances=tuple(entries),
        parent_id=record.parent_id,
    )


def _entry(
    instance_id: int,
    task_type: str,
    task_name: str,
    row: TaskInstanceRecord | None,
    pre: list[str],
    nxt: list[str],
) -> TaskInstanceDetail:
    """One detail entry: from the node's row, or ``uncreated`` (id 0, no context) when it has none."""
    return TaskInstanceDetail(
        id=row.id if row else 0,
        workflow_instance_id=instance_id,
        task_type=task_type,
        task_name=task_name,
        status=row.status if row else TaskStatus.UNCREATED.value,
        node_context=row.node_context if row else None,
        fail_count=row.fail_count if row else 0,
        created_at=row.created_at if row else 0,
        updated_at=row.updated_at if row else 0,
        started_at=row.started_at if row and row.started_at else None,
        pre_nodes_keys=pre,
        next_nodes_keys=nxt,
    )
