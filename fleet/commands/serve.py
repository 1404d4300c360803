"""``fleet serve``: run the fleet manager's HTTP API (uvicorn) with structured JSON logs, over
HTTPS when ``tls.certfile``/``tls.keyfile`` are set."""

from __future__ import annotations

import argparse
import logging

from fleet.cli_support import add_config_flag, settings_from

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the fleet manager API",
        description="Run the fleet manager API. The database is created and migrated on start; "
        "API docs are served at /docs.",
    )
    add_config_flag(parser)
    parser.add_argument("--host", help="bind address (default: settings host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="bind port (default: settings port, 8080)")
    parser.set_defaults(handler=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fleet.app import create_app
    from fleet.logs import configure_logging

    settings = settings_from(args, host=args.host, port=args.port)
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings)
    tls = settings.tls
    log.info(
        "serving on %s://%s:%d (docs at /docs)",
        "https" if tls.certfile else "http",
        settings.host,
        settings.port,
        extra={"environment": settings.environment, "data_dir": str(settings.data_dir)},
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our JSON handler
        access_log=False,  # fleet.metrics logs one structured line per request
        server_header=False,
        ssl_certfile=str(tls.certfile) if tls.certfile else None,
        ssl_keyfile=str(tls.keyfile) if tls.keyfile else None,
    )
    return 0
