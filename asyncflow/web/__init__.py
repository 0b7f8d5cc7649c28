"""The asyncflow dashboard (extra ``web``): instances, one instance's DAG, schedules, a JSON API.

::

    from asyncflow.web import dashboard
    app.mount("/workflows", dashboard(svc))                      # FastAPI / Starlette
    mount_on_aiohttp(aiohttp_app, "/workflows", dashboard(svc))  # aiohttp (a bridge, no extra deps)

or ``asyncflow dashboard --db URL`` (uvicorn). See docs/dashboard.md.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError("the asyncflow dashboard needs Starlette: pip install 'asyncflow[web]'") from error

from .aiohttp import mount_on_aiohttp
from .app import dashboard

__all__ = ["dashboard", "mount_on_aiohttp"]
