"""``RedisWorkflowLock``: the lock shared by every process that talks to one Redis (``redis.asyncio``).

- Acquire: ``SET <prefix><key> <token> NX PX <ttl ms>`` with a random token (``secrets.token_hex``).
- Release: a Lua compare-and-delete (the key is deleted only if it still holds this lease's token), run
  in ``finally``; if a second cancellation interrupts it, it is finished in a background task (the
  compare-and-delete is idempotent), so it survives any cancellation, as if shielded, without paying
  for a task on every release.
- Renewal: one timer per lock object, not one task per hold (``_renewal.Renewer``). While anything is
  held, a round runs about every ``ttl / 3`` and extends, in one Lua call per batch, every lease that
  is due. A renewal that fails, times out or finds the key gone or taken marks the lease lost at once
  (``lease.lost``, ``lease.lost_event``); the holder learns it from ``lease.raise_if_lost()``, which
  the engine calls before every write. A lease whose renewal stopped also counts as lost as soon as
  its validity (last renewal sent + TTL) runs out.
- Every Redis operation is bounded by ``op_timeout`` seconds (checked every ``op_timeout / 4``): an
  unreachable or slow Redis gives ``LockFailedError`` with the Redis error (or ``TimeoutError``) as
  ``__cause__``.

The renewal script touches several keys at once, so this lock needs one Redis (or a Sentinel-managed
primary), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from asyncflow._text import shown
from asyncflow._urls import redact_url, scrub_secrets
from asyncflow.errors import LockFailedError, ParamInvalidError
from asyncflow.lock._deadline import Deadlines, check_op_timeout
from asyncflow.lock._reentrant import ReentrantLock
from asyncflow.lock._renewal import RenewableLease, Renewer

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["DEFAULT_PREFIX", "RedisLease", "RedisWorkflowLock"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "asyncflow:lock:"

_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

_RENEW_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[2 * i - 1] then
    redis.call('pexpire', key, ARGV[2 * i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


class RedisLease(RenewableLease):
    """A lease on a :class:`RedisWorkflowLock` key."""

    __slots__ = ("_ms", "_name", "_token")

    def __init__(
        self, renewer: Renewer[RedisLease], key: str, ttl: float, name: str, token: str, sent: float
    ) -> None:
        super().__init__(key, ttl, renewer, sent)
        self._name = name
        self._token = token
        self._ms = max(1, int(ttl * 1000))

    @property
    def redis_key(self) -> str:
        """The Redis key: ``<prefix><key>``."""
        return self._name


class RedisWorkflowLock(ReentrantLock[RedisLease]):
    """A non-blocking, re-entrant, renewing lock per key on Redis, shared by all processes using it.

    ``client_or_url`` is a ``redis.asyncio.Redis`` client (never closed by the lock) or a URL such as
    ``"redis://127.0.0.1:6379/0"`` (the lock creates the client with socket timeouts of ``op_timeout``
    and closes it in ``aclose()``). Keys are ``<prefix><key>``. ``op_timeout`` bounds every Redis
    operation; past it the operation fails with ``LockFailedError`` (acquire) or a lost lease (renewal).
    Use it as ``async with RedisWorkflowLock(url) as lock:`` or call ``await lock.aclose()``.
    """

    def __init__(
        self, client_or_url: Redis | str, *, prefix: str = DEFAULT_PREFIX, op_timeout: float = 2.0
    ) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.exceptions import NoScriptError, RedisError
        except ImportError as exc:
            raise ImportError(
                "RedisWorkflowLock needs the 'redis' package: pip install 'asyncflow[redis]'"
            ) from exc
        check_op_timeout(op_timeout)
        if not isinstance(prefix, str):
            raise ParamInvalidError(f"prefix must be a string, got {shown(prefix)}")
        super().__init__()
        self._prefix = prefix
        self._op_timeout = float(op_timeout)
        self._deadline = Deadlines(self._op_timeout)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._no_script: type[BaseException] = NoScriptError
        if isinstance(client_or_url, str):
            try:
                self._client: Redis = aioredis.Redis.from_url(
                    client_or_url, socket_timeout=self._op_timeout, socket_connect_timeout=self._op_timeout
                )
            except (ValueError, TypeError) as exc:  # the message never carries the password
                message = f"bad Redis URL {redact_url(client_or_url)!r}: {exc}"
                raise ParamInvalidError(scrub_secrets(message, client_or_url)) from None
            self._owns_client = True
        else:
            self._client = client_or_url
            self._owns_client = False
        self._execute: Callable[..., Awaitable[Any]] = self._client.execute_command
        self._release_sha = hashlib.sha1(_RELEASE_LUA.encode()).hexdigest()
        self._renew_sha = hashlib.sha1(_RENEW_LUA.encode()).hexdigest()
        self._renewer: Renewer[RedisLease] = Renewer(
            self._renew, name=f"asyncflow-redis-lock-renewer-{self._lock_id}"
        )
        self._background: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> Redis:
        """The ``redis.asyncio`` client the lock talks through."""
        return self._client

    @property
    def prefix(self) -> str:
        """What goes in front of every key in Redis."""
        return self._prefix

    async def _acquire(self, key: str, ttl: float) -> RedisLease:
        self._check_open(key)
        name = self._prefix + key
        token = secrets.token_hex(16)
        ms = max(1, int(ttl * 1000))
        sent = time.monotonic()
        try:
            with self._deadline():
                # execute_command, not client.set(): redis-py 8's set() spends several microseconds
                # of Python per call on argument checks (measured with benchmarks/bench_lock.py)
                acquired = await self._execute("SET", name, token, "PX", ms, "NX")
        except asyncio.CancelledError:
            self._spawn_delete(name, token)  # the SET may have landed: do not leave the key behind
            raise
        except self._errors as exc:
            if isinstance(exc, TimeoutError):
                self._spawn_delete(name, token)
                raise LockFailedError(
                    f"lock {key!r}: Redis did not answer within {self._op_timeout} s"
                ) from exc
            raise LockFailedError(f"lock {key!r}: Redis failed: {exc}") from exc
        if not acquired:
            raise LockFailedError(f"lock {key!r} is held by another holder")
        lease = RedisLease(self._renewer, key, ttl, name, token, sent)
        self._renewer.track(lease)
        return lease

    async def _release(self, lease: RedisLease) -> None:
        if lease._released:
            return
        lease._released = True
        self._renewer.untrack(lease)
        if self._closed:  # aclose() already released what was held
            return
        try:
            await self._delete(lease._name, lease._token)
        except asyncio.CancelledError:
            # Cancelled again during the release: finish it in the background (compare-and-delete is
            # idempotent), so the release survives any cancellation, as if shielded.
            self._spawn_delete(lease._name, lease._token)
            raise

    async def _delete(self, name: str, token: str) -> None:
        """Compare-and-delete ``name`` if it still holds ``token``; failures are logged, never raised."""
        try:
            with self._deadline():
                try:
                    deleted = await self._client.evalsha(self._release_sha, 1, name, token)
                except self._no_script:  # a restarted or flushed Redis: EVAL loads the script again
                    deleted = await self._client.eval(_RELEASE_LUA, 1, name, token)
        except self._errors as exc:
            logger.warning("lock release of %r failed (the key expires on its own): %r", name, exc)
        else:
            if not deleted:
                logger.debug("lock %r had expired or changed hands before its release", name)

    async def _eval(self, sha: str, script: str, *keys_then_args: str | int, nkeys: int = 1) -> Any:
        """``EVALSHA``, falling back to ``EVAL`` on ``NOSCRIPT`` (a restarted or flushed Redis)."""
        try:
            return await self._client.evalsha(sha, nkeys, *keys_then_args)
        except self._no_script:
            return await self._client.eval(script, nkeys, *keys_then_args)

    def _spawn_delete(self, name: str, token: str) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(
            self._delete(name, token), name=f"asyncflow-redis-lock-cleanup-{name}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _renew(self, batch: list[RedisLease]) -> None:
        """Extend every lease of ``batch`` that still holds its token, in one script call."""
        sent = time.monotonic()
        budget = min(self._op_timeout, min(lease._valid_until for lease in batch) - sent)
        args: list[str | int] = []
        for lease in batch:
            args += (lease._token, lease._ms)
        try:
            if budget <= 0:
                raise TimeoutError("the leases' validity ran out before the renewal could be sent")
            async with asyncio.timeout(budget):
                results = await self._eval(
                    self._renew_sha, _RENEW_LUA, *(lease._name for lease in batch), *args, nkeys=len(batch)
                )
        except self._errors as exc:
            for lease in batch:
                self._renewer.lose(lease, f"renewal failed: {exc!r}", exc)
            return
        for lease, renewed in zip(batch, results, strict=True):
            if renewed == 1:
                self._renewer.renewed(lease, sent)
            else:
                self._renewer.lose(lease, "renewal found the key expired or taken by another holder")

    async def aclose(self) -> None:
        """Stop renewing, release the leases still held (they become lost), close an owned client.

        Blocks that end after ``aclose()`` leave their keys to expire.
        """
        if self._closed:
            return
        await super().aclose()
        try:
            held = await self._renewer.aclose()
            for lease in held:
                lease._mark_lost("the lock was closed")
            if held:
                await asyncio.gather(*(self._delete(lease._name, lease._token) for lease in held))
            if self._background:
                await asyncio.wait(self._background)
        finally:
            self._deadline.close()
            if self._owns_client:
                await self._client.aclose()
