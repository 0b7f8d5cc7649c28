"""Helpers that run a :class:`~asyncflow.driver.WorkflowDriver` beside a web app.

* :func:`asyncflow.integrations.fastapi.workflow_lifespan`: a FastAPI/Starlette ``lifespan``.
* :func:`asyncflow.integrations.aiohttp.driver_cleanup_ctx`: an aiohttp ``cleanup_ctx`` entry.

Neither module imports its framework, so importing them costs nothing; install the matching extra
(``asyncflow[fastapi]`` or ``asyncflow[aiohttp]``) for the framework itself.
"""

from __future__ import annotations

__all__: list[str] = []
