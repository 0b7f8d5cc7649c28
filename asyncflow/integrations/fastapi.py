"""Run a :class:`~asyncflow.driver.WorkflowDriver` in a FastAPI (or Starlette) app's lifespan.

::

    driver = af.WorkflowDriver(service, concurrency=32)
    app = FastAPI(lifespan=workflow_lifespan(driver))

The driver starts when the app starts serving and stops (``stop()`` with the driver's
``stop_grace``) when it shuts down. Pass your own lifespan as ``lifespan=`` to compose the two: yours
is entered first and exited last (create the schema in it, close the repo after), and whatever it
yields (the lifespan state) is passed through. Or enter ``workflow_lifespan(driver)(app)`` inside
your own lifespan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..driver import WorkflowDriver

__all__ = ["workflow_lifespan"]

AppT = TypeVar("AppT")
Lifespan = Callable[[AppT], AbstractAsyncContextManager[Any]]


def workflow_lifespan(
    driver: WorkflowDriver, *, lifespan: Lifespan[AppT] | None = None
) -> Callable[[AppT], AbstractAsyncContextManager[Any]]:
    """A lifespan that runs ``driver`` in the background while the app serves (``lifespan`` around it)."""

    @asynccontextmanager
    async def run_driver(app: AppT) -> AsyncIterator[Any]:
        if lifespan is None:
            async with driver:
                yield None
            return
        async with lifespan(app) as state, driver:
            yield state

    return run_driver
