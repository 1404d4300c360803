"""The desired-document outbox: retained payloads waiting for the broker's acknowledgement.

Services put a device's new retained payload (a signed desired document, or ``b""`` to clear
the retained document) into the ``desired_outbox`` table with :func:`enqueue`, *inside* the
transaction that records the change, so a committed assignment is never without its pending
publish. After the commit they call :meth:`DesiredOutbox.flush` for those devices; the retry job
calls it for every device. A row is deleted once the broker acknowledged exactly that payload;
a failed publish stays queued (attempts and last error recorded) and is retried, never lost.

Only the newest payload per device is kept (a newer one replaces the row), and one lock
serialises flushes in this process, so a device's retained topic never goes back to an older
document: every publish reads the row under the lock and publishes what is newest then. (Two
fleet processes publishing for the same devices are not ordered against each other.)

This module does not sign documents or decide what a device should run
(:mod:`fleet.desired_state`) and holds no broker connection (:mod:`fleet.mqtt_publisher`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlite_utils import Database

from fleet.mqtt_publisher import Publisher, PublishFailedError
from fleet.store import Store, immediate, iso
from protocol.topics import desired_topic

log = logging.getLogger(__name__)

TABLE = "desired_outbox"


@dataclass(frozen=True)
class FlushResult:
    """What one flush did: devices published, devices still pending, the first error."""

    published: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    error: str | None = None


def enqueue(
    db: Database, device_id: str, payload: bytes, serial: int | None, now: datetime
) -> None:
    """Queue ``payload`` as ``device_id``'s retained desired payload, replacing an older one.
    Call inside the transaction that records the change."""
    # delete + insert: the row gets a new id, so a publish of the older payload in flight
    # cannot delete this one
    db.execute(f"DELETE FROM {TABLE} WHERE device_id = ?", [device_id])
    db.execute(
        f"INSERT INTO {TABLE} (device_id, serial, payload, queued_at) VALUES (?, ?, ?, ?)",
        [device_id, serial, payload, iso(now)],
    )


def pending_devices(db: Database) -> list[str]:
    return [r[0] for r in db.execute(f"SELECT device_id FROM {TABLE} ORDER BY id")]


class DesiredOutbox:
    """Publishes queued payloads (app-scoped: one per process, shared by requests and jobs)."""

    def __init__(self, store: Store, publisher: Publisher) -> None:
        self.store = store
        self.publisher = publisher
        self._lock = threading.Lock()

    def flush(self, now: datetime, device_ids: Iterable[str] | None = None) -> FlushResult:
        """Publish the queued payloads of ``device_ids`` (default: all), oldest first. Stops at
        the first broker failure (the rest stay queued for the retry job)."""
        published: list[str] = []
        with self._lock, self.store.connect() as db:
            wanted = pending_devices(db)
            if device_ids is not None:
                chosen = set(device_ids)
                wanted = [d for d in wanted if d in chosen]
            for n, device_id in enumerate(wanted):
                row = db.execute(
                    f"SELECT id, serial, payload FROM {TABLE} WHERE device_id = ?", [device_id]
                ).fetchone()
                if row is None:
                    continue
                row_id, serial, payload = int(row[0]), row[1], bytes(row[2])
                try:
                    self.publisher.publish(desired_topic(device_id), payload, retain=True)
                except PublishFailedError as exc:
                    with immediate(db):
                        db.execute(
                            f"UPDATE {TABLE} SET attempts = attempts + 1, last_error = ? "
                            "WHERE id = ?",
                            [str(exc), row_id],
                        )
                    log.warning(
                        "desired document for %s not published: %s",
                        device_id,
                        exc,
                        extra={"device_id": device_id},
                    )
                    return FlushResult(tuple(published), tuple(wanted[n:]), str(exc))
                with immediate(db):
                    db.execute(f"DELETE FROM {TABLE} WHERE id = ?", [row_id])
                    if serial is not None:
                        db.execute(
                            "UPDATE assignments SET published_at = ? WHERE device_id = ? "
                            "AND serial = ? AND published_at IS NULL",
                            [iso(now), device_id, serial],
                        )
                published.append(device_id)
                log.info(
                    "published the retained desired %s for %s",
                    f"document #{serial}" if serial is not None else "clear",
                    device_id,
                    extra={"device_id": device_id},
                )
        return FlushResult(tuple(published))
