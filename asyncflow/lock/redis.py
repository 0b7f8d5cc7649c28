"""``RedisWorkflowLock``: the lock shared by every process that talks to one Redis (``redis.asyncio``).

- Acquire: ``SET <prefix><key> <token> NX PX <ttl ms>`` with a random token (``secrets.token_hex``).
- Release: a Lua compare-and-delete (the key is deleted only if it still holds this lease's token), run
  shielded in ``finally`` so a second cancellation cannot interrupt it.
- Renewal: one timer per lock object, not one task per hold. While anything is held, a renewal round
  runs about every ``ttl / 3`` and extends, in one Lua call per batch, every lease that is due (a lease
  is renewed at most ``ttl / 3`` after its last renewal). A renewal that fails, times out or finds the
  key gone or taken marks the lease lost at once (``lease.lost``, ``lease.lost_event``); the holder
  learns it from ``lease.raise_if_lost()``, which the engine calls before every write. A lease whose
  renewal stopped also counts as lost as soon as its validity (last renewal sent + TTL) runs out.
- Every Redis operation is bounded by ``op_timeout`` seconds: an unreachable or slow Redis gives
  ``LockFailedError`` with the Redis error (or ``TimeoutError``) as ``__cause__``.

The renewal script touches several keys at once, so this lock needs one Redis (or a Sentinel-managed
primary), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Any

from asyncflow.errors import LockFailedError, ParamInvalidError
from asyncflow.lock._deadline import Deadlines
from asyncflow.lock._reentrant import Lease, ReentrantLock

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["DEFAULT_PREFIX", "RedisLease", "RedisWorkflowLock"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "asyncflow:lock:"
_RENEW_BATCH = 500

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


class RedisLease(Lease):
    """A lease on a :class:`RedisWorkflowLock` key."""

    __slots__ = ("_due", "_expiry_handle", "_interval", "_lock", "_ms", "_name", "_token", "_valid_until")

    def __init__(
        self, lock: RedisWorkflowLock, key: str, ttl: float, name: str, token: str, sent: float
    ) -> None:
        super().__init__(key, ttl)
        self._lock = lock
        self._name = name
        self._token = token
        self._ms = max(1, int(ttl * 1000))
        self._interval = ttl / 3
        self._due = sent + self._interval  # next renewal
        self._valid_until = sent + ttl  # the key cannot outlive this without a renewal
        self._expiry_handle: asyncio.TimerHandle | None = None

    @property
    def redis_key(self) -> str:
        """The Redis key: ``<prefix><key>``."""
        return self._name

    def _suspend_renewal(self) -> None:
        self._lock._suspend(self)

    def _validity_ran_out(self) -> bool:
        return time.monotonic() >= self._valid_until


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
        except ImportError as exc:  # pragma: no cover - the test environment has redis
            raise ImportError(
                "RedisWorkflowLock needs the 'redis' package: pip install 'asyncflow[redis]'"
            ) from exc
        if not isinstance(op_timeout, int | float) or not math.isfinite(op_timeout) or op_timeout <= 0:
            raise ParamInvalidError(f"op_timeout must be a positive number of seconds, got {op_timeout!r}")
        if not isinstance(prefix, str):
            raise ParamInvalidError(f"prefix must be a string, got {prefix!r}")
        super().__init__()
        self._prefix = prefix
        self._op_timeout = float(op_timeout)
        self._deadline = Deadlines(self._op_timeout)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        if isinstance(client_or_url, str):
            self._client: Redis = aioredis.Redis.from_url(
                client_or_url, socket_timeout=self._op_timeout, socket_connect_timeout=self._op_timeout
            )
            self._owns_client = True
        else:
            self._client = client_or_url
            self._owns_client = False
        self._release_sha = hashlib.sha1(_RELEASE_LUA.encode()).hexdigest()
        self._renew_sha = hashlib.sha1(_RENEW_LUA.encode()).hexdigest()
        self._no_script: type[BaseException] = NoScriptError
        self._renewing: dict[RedisLease, None] = {}  # insertion-ordered set of the leases to renew
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._round: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> Redis:
        """The ``redis.asyncio`` client the lock talks through."""
        return self._client

    @property
    def prefix(self) -> str:
        """What goes in front of every key in Redis."""
        return self._prefix

    # -- acquire and release -------------------------------------------------------------------------

    async def _acquire(self, key: str, ttl: float) -> RedisLease:
        self._check_open(key)
        name = self._prefix + key
        token = secrets.token_hex(16)
        sent = time.monotonic()
        try:
            with self._deadline():
                acquired = await self._client.set(name, token, nx=True, px=max(1, int(ttl * 1000)))
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
        lease = RedisLease(self, key, ttl, name, token, sent)
        self._track(lease)
        return lease

    async def _release(self, lease: RedisLease) -> None:
        if lease._released:
            return
        lease._released = True
        self._untrack(lease)
        if lease._expiry_handle is not None:
            lease._expiry_handle.cancel()
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
                deleted = await self._eval(self._release_sha, _RELEASE_LUA, name, token)
        except self._errors as exc:
            logger.warning("lock release of %r failed (the key expires on its own): %r", name, exc)
        else:
            if not deleted:
                logger.debug("lock %r had expired or changed hands before its release", name)

    async def _eval(self, sha: str, script: str, *keys_then_args: str | int, nkeys: int = 1) -> Any:
        """``EVALSHA``, loading the script on ``NOSCRIPT`` (a restarted or flushed Redis)."""
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

    # -- renewal -------------------------------------------------------------------------------------

    def _track(self, lease: RedisLease) -> None:
        self._renewing[lease] = None
        # A timer that fires with nothing due costs one no-op callback, so it is left to lapse rather
        # than cancelled on release: the hot path (one hold per pass) creates no timer or task.
        if self._round is None and lease._due < self._timer_due:
            self._schedule(lease._due)

    def _schedule(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = math.inf
        if self._closed or self._round is not None or not self._renewing:
            return
        horizon = time.monotonic()
        if not any(lease._due - lease._interval / 2 <= horizon for lease in self._renewing):
            self._schedule(min(lease._due for lease in self._renewing))
            return
        self._round = asyncio.get_running_loop().create_task(
            self._renew_round(), name=f"asyncflow-redis-lock-renewer-{self._lock_id}"
        )

    async def _renew_round(self) -> None:
        try:
            # renew every lease within half an interval of its due time, to share the round trip
            horizon = time.monotonic()
            due = [lease for lease in self._renewing if lease._due - lease._interval / 2 <= horizon]
            for start in range(0, len(due), _RENEW_BATCH):
                await self._renew(due[start : start + _RENEW_BATCH])
        finally:
            self._round = None
            if not self._closed and self._renewing:
                self._schedule(min(lease._due for lease in self._renewing))

    async def _renew(self, batch: list[RedisLease]) -> None:
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
        except Exception as exc:
            if not isinstance(exc, self._errors):  # a bug or an odd reply: never keep an unrenewed key
                logger.exception("lock renewal failed unexpectedly")
            for lease in batch:
                if self._untrack(lease):
                    lease._mark_lost(f"renewal failed: {exc!r}", exc)
            return
        for lease, renewed in zip(batch, results, strict=True):
            if lease not in self._renewing:  # released or suspended while the renewal was in flight
                continue
            if renewed == 1:
                lease._valid_until = sent + lease._ttl
                lease._due = sent + lease._interval
            else:
                self._untrack(lease)
                lease._mark_lost("renewal found the key expired or taken by another holder")

    def _suspend(self, lease: RedisLease) -> None:
        """Stop renewing ``lease`` (the test hook behind ``lease._suspend_renewal()``)."""
        if lease._released or not self._untrack(lease):
            return
        delay = max(0.0, lease._valid_until - time.monotonic())
        lease._expiry_handle = asyncio.get_running_loop().call_later(delay, self._expire, lease)

    @staticmethod
    def _expire(lease: RedisLease) -> None:
        """Mark a lease whose renewal stopped as lost once its validity ran out (sets ``lost_event``)."""
        if not lease._released and lease.lost:
            logger.debug("lock %r: an unrenewed lease expired", lease.key)

    def _untrack(self, lease: RedisLease) -> bool:
        """Stop renewing ``lease``; False if it was not being renewed."""
        if lease in self._renewing:
            del self._renewing[lease]
            return True
        return False

    # -- lifecycle -----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop renewing, release the leases still held (they become lost), close an owned client.

        Blocks that end after ``aclose()`` leave their keys to expire.
        """
        if self._closed:
            return
        await super().aclose()
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._round is not None:
                self._round.cancel()
                await asyncio.wait([self._round])
            held = list(self._renewing)
            self._renewing.clear()
            for lease in held:
                lease._mark_lost("the lock was closed")
            if held:
                await asyncio.gather(*(self._delete(lease._name, lease._token) for lease in held))
            if self._background:
                await asyncio.wait(self._background)
        finally:
            if self._owns_client:
                await self._client.aclose()
