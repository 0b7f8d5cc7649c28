"""Run a :class:`~asyncflow.driver.WorkflowDriver` beside an aiohttp application.

::

    app = web.Application()
    app.cleanup_ctx.append(open_storage)              # yours: create the schema, close the repo
    app.cleanup_ctx.append(driver_cleanup_ctx(driver))

``cleanup_ctx`` entries start in order and stop in reverse, so append the driver after whatever it
needs. The driver stops with its ``stop_grace`` when the app shuts down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..driver import WorkflowDriver

__all__ = ["driver_cleanup_ctx"]


def driver_cleanup_ctx(driver: WorkflowDriver) -> Callable[[Any], AsyncIterator[None]]:
    """An ``app.cleanup_ctx`` entry that runs ``driver`` in the background while the app runs."""

    async def run_driver(app: Any) -> AsyncIterator[None]:
        async with driver:
            yield

    return run_driver
