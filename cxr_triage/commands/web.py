"""``cxr-triage web``: serve the worklist page and its JSON API with uvicorn (``cxr_triage.web``).

It is a process of its own, not part of ``serve``: the page can be restarted, upgraded or put behind a TLS proxy
without touching the DICOM listener, a burst of browser requests never competes with a C-STORE, and it may run
on another host that reads the same PostgreSQL database. It needs the database ``serve`` created.
"""

from __future__ import annotations

import argparse
import logging

from cxr_triage.core.bootstrap import CURRENT, Context, run_command

logger = logging.getLogger("cxr_triage.webcli")  # its name before it was commands.web


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML); [web] has the address")
    parser.add_argument("--host", default=None, help="interface to bind (default: [web] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: [web] port, 8080)")


def _web(args: argparse.Namespace, context: Context) -> int:
    import uvicorn

    from cxr_triage.web.app import create_app

    web = context.settings.web
    host, port = args.host or web.host, args.port if args.port is not None else web.port
    app = create_app(context.settings, context.db)
    logger.info("worklist on http://%s:%d/ (API under /api/, documented at /docs)", host, port)
    level = (getattr(args, "log_level", None) or context.settings.logging.level).lower()
    uvicorn.run(app, host=host, port=port, log_level=level, access_log=False, server_header=False)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_command(args, "web", lambda context: _web(args, context), database=CURRENT, service=True)
