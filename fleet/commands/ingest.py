"""``fleet ingest``: run one MQTT ingestion worker on its own (no HTTP API).

``fleet serve`` runs the ingester itself when ``ingest.enabled`` is set; this command runs
extra workers (each with its own ``--worker`` id; they split the load through the shared
subscription) or ingestion without the API. SIGTERM/SIGINT stop it cleanly: what was received
is stored and acknowledged first.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from fleet.cli_support import add_config_flag, database, settings_from

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="run an MQTT telemetry ingestion worker",
        description="Subscribe to device reports and store them in the fleet database. The "
        "client id is {mqtt.client_id}-ingest-{worker}: keep the worker id stable across restarts.",
    )
    add_config_flag(parser)
    parser.add_argument("--worker", help="worker id (default: settings ingest.worker, 0)")
    parser.set_defaults(handler=ingest)


def ingest(args: argparse.Namespace) -> int:
    from fleet.ingest import IngestConfig, Ingester
    from fleet.logs import configure_logging
    from fleet.store import Store

    settings = settings_from(args)
    if args.worker:
        settings = settings.model_copy(
            update={"ingest": settings.ingest.model_copy(update={"worker": args.worker})}
        )
    configure_logging(settings.log_level, settings.log_json)
    with database(settings):  # created and migrated before the first batch
        pass
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ingester = Ingester(
        IngestConfig.from_settings(settings),
        Store(settings.db_path, settings.db_busy_timeout_ms),
    )
    ingester.start()
    stop.wait()
    log.info("stopping the ingester")
    ingester.stop()
    return 0
