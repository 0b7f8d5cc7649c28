"""``asyncflow dashboard``: serve the web dashboard (:mod:`asyncflow.web`) with uvicorn.

Read-only unless ``--allow-actions``, which lets everyone who reaches ``--host``/``--port`` cancel,
restart and send events (still confirmed and CSRF-protected): keep it on a trusted interface. To
decide per request who may act, mount :func:`asyncflow.web.dashboard` in your own app with an
``authorize`` function instead. Ctrl-C stops it (exit 130), as uvicorn re-raises the signal.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from ..engine.service import WorkflowService
from ..records import QueryWorkflowInstanceParams
from .app import load_app
from .backend import CLIError, open_service

__all__ = ["run_dashboard"]

logger = logging.getLogger("asyncflow.cli.dashboard")

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@contextlib.asynccontextmanager
async def _service(args: argparse.Namespace) -> AsyncIterator[WorkflowService]:
    if args.app:
        app = await load_app(args.app)
        if isinstance(app, WorkflowService):
            yield app
            return
        registry = app
    else:
        from ..demo.order import make_registry  # so the demo's instances draw whole

        registry = make_registry()
    async with open_service(args.db, args.redis, registry) as svc:
        yield svc


async def run_dashboard(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    try:
        import uvicorn

        from ..web import dashboard
    except ImportError as error:
        raise CLIError(
            f"the dashboard needs the web extra: pip install 'asyncflow[web]' ({error})", 2
        ) from error
    async with _service(args) as svc:
        await svc.count_workflow_instances(QueryWorkflowInstanceParams())  # reachable, tables present
        if args.allow_actions:
            app = dashboard(svc, read_only=False, authorize=lambda request, action: True)
            if args.host not in _LOOPBACK:
                logger.warning(
                    "--allow-actions on %s: anyone who reaches it can cancel and restart", args.host
                )
        else:
            app = dashboard(svc)
        mode = "actions allowed" if args.allow_actions else "read-only"
        print(
            f"asyncflow dashboard on http://{args.host}:{args.port}/ ({mode}); Ctrl-C stops it",
            file=sys.stderr,
        )
        level = "info" if args.verbose else "warning"
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=level, lifespan="off")
        server = uvicorn.Server(config)
        try:
            await server.serve()
        except SystemExit as exit_:  # uvicorn exits (code 3) when it cannot bind: say why, exit 1
            if server.started:
                raise
            cause = exit_.__context__  # the OSError uvicorn caught (and logged) before exiting
            detail = str(cause) if cause is not None else f"uvicorn exited with {exit_.code}"
            raise CLIError(f"cannot listen on {args.host}:{args.port}: {detail}", 1) from None
    return 0
