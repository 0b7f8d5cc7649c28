"""The leases of ``DatabaseWorkflowLock`` on ``MemoryWorkflowRepo``: a dict, timed by the monotonic clock
(one process, one event loop: nothing else shares it)."""

from __future__ import annotations

import time
from collections.abc import Sequence

__all__ = ["MemoryLeases"]


class MemoryLeases:
    """``key -> (holder, expires_at)``; an expired entry is taken over by the next acquirer."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, holder: str, ttl_ms: int) -> bool:
        now = time.monotonic()
        current = self._held.get(key)
        if current is not None and current[1] > now:
            return False
        self._held[key] = (holder, now + ttl_ms / 1000)
        return True

    def renew(self, held: Sequence[tuple[str, str, int]]) -> list[bool]:
        now = time.monotonic()
        renewed = []
        for key, holder, ttl_ms in held:
            current = self._held.get(key)
            ok = current is not None and current[0] == holder and current[1] > now
            if ok:
                self._held[key] = (holder, now + ttl_ms / 1000)
            renewed.append(ok)
        return renewed

    def release(self, key: str, holder: str) -> bool:
        current = self._held.get(key)
        if current is None or current[0] != holder:
            return False
        del self._held[key]
        return True
