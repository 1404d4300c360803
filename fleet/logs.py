"""Structured logs: one JSON object per line (``ts``, ``level``, ``logger``, ``msg``, extras).

Fields passed with ``log.info("...", extra={"device_id": ...})`` become top-level keys, so log
shippers can index them without parsing messages. :func:`configure_logging` routes uvicorn's
loggers through the same handler. The CLI's short-lived commands keep the plain text format;
``fleet serve`` switches to JSON (``log_json = false`` keeps text for a terminal).

This module formats and installs handlers; it decides nothing about what gets logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

# attributes every LogRecord has; anything else on a record came in through ``extra=``
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# uvicorn's ANSI-coloured duplicate of ``msg``
_DROPPED = frozenset({"color_message"})
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if (
                key not in _STANDARD
                and key not in _DROPPED
                and not key.startswith("_")
                and key not in doc
            ):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure_logging(
    level: str = "INFO", json_lines: bool = True, stream: TextIO | None = None
) -> None:
    """Replace the root handlers with one that writes JSON lines (or text) to ``stream``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
