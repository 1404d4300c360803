"""Webhooks over real HTTP: a receiver started by the test (stdlib http.server on loopback)
gets the drift alarm with a signature it verifies; a receiver that fails twice gets the event
exactly once after retries with backoff (same idempotency key on each attempt); the outbox
survives a restart; webhooks from settings and over the API."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlite_utils import Database

from fleet.alert_service import AlertService, deliver_job, evaluate_job
from fleet.app import create_app
from fleet.dashboard.sample_fleet import seed
from fleet.settings import FleetSettings
from fleet.store import Store, connect, migrate
from fleet.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    SignatureError,
    WebhookService,
    backoff,
    sign,
    verify_signature,
)

NOW = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
SECRET = "receiver-secret-0123456789"


@dataclass
class Receiver:
    """A webhook receiver: verifies signatures, answers ``fail_first`` 500s, then 200;
    processes each delivery id once (idempotent), as a real receiver should."""

    secret: str
    fail_first: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    processed: dict[str, dict[str, Any]] = field(default_factory=dict)
    url: str = ""

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        entry = {"headers": headers, "body": body}
        try:
            verify_signature(self.secret, headers[SIGNATURE_HEADER], body, NOW.timestamp())
            entry["verified"] = True
        except (KeyError, SignatureError) as exc:
            entry["verified"] = str(exc)
            self.requests.append(entry)
            return 401
        self.requests.append(entry)
        if len(self.requests) <= self.fail_first:
            return 500
        self.processed.setdefault(headers[DELIVERY_HEADER], json.loads(body))
        return 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(SECRET)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            code = rec.handle({k: v for k, v in self.headers.items()}, body)
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/edgefleet"
    yield rec
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(settings: FleetSettings) -> Iterator[Store]:
    s = Store(settings.db_path)
    with s.connect() as db:
        migrate(db)
    yield s
    s.close()


# --- signatures (pure) ------------------------------------------------------------------------


def test_signature_verifies_and_rejects_changes() -> None:
    body = b'{"event":"alert.opened"}'
    header = sign(SECRET, 1_900_000_000, body)
    assert header.startswith("t=1900000000,v1=")
    assert verify_signature(SECRET, header, body, 1_900_000_010) == 1_900_000_000
    for bad_body, bad_secret, now in [
        (body + b" ", SECRET, 1_900_000_010),
        (body, SECRET + "x", 1_900_000_010),
        (body, SECRET, 1_900_000_000 + 301),  # stale: a replay
    ]:
        with pytest.raises(SignatureError):
            verify_signature(bad_secret, header, bad_body, now)
    with pytest.raises(SignatureError, match="malformed"):
        verify_signature(SECRET, "sha256=abc", body, 1_900_000_000)


def test_backoff_doubles_up_to_an_hour() -> None:
    assert [backoff(n).total_seconds() for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff(30) == timedelta(hours=1)


# --- delivery over real HTTP ------------------------------------------------------------------


def seed_drift(db: Database, settings: FleetSettings) -> None:
    seed(db, settings, NOW, devices=("cam-1", "cam-2", "cam-3"), drifting=("cam-3",))


def test_a_drift_alarm_reaches_the_receiver_signed(
    settings: FleetSettings, store: Store, receiver: Receiver
) -> None:
    with store.connect() as db:
        seed_drift(db, settings)
        WebhookService(db).add(receiver.url, SECRET, "test", NOW)
    result = evaluate_job(store, settings, NOW)
    assert result is not None and len(result.opened) == 2  # cam-3 and fleet-wide
    assert deliver_job(store, settings, NOW) == (2, 0)
    assert all(r["verified"] is True for r in receiver.requests)
    bodies = {b["alert"]["kind"]: b for b in receiver.processed.values()}
    device = bodies["drift_device"]
    assert device["event"] == "alert.opened" and device["alert"]["subject"] == "cam-3"
    assert device["alert"]["details"]["drifted_features"] == ["f0", "f1"]
    assert device["fleet"] == settings.base_url
    assert bodies["drift_fleet"]["alert"]["subject"] == "load-model/1"
    headers = receiver.requests[0]["headers"]
    assert headers[EVENT_HEADER] == "alert.opened"
    assert headers["Content-Type"] == "application/json"
    # nothing is due any more
    assert deliver_job(store, settings, NOW + timedelta(hours=1)) == (0, 0)
    assert len(receiver.requests) == 2


def test_retries_with_backoff_deliver_exactly_once(
    settings: FleetSettings, store: Store, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    with store.connect() as db:
        seed(db, settings, NOW, devices=("cam-1",), drifting=("cam-1",))
        WebhookService(db).add(receiver.url, SECRET, "test", NOW)
        # keep one event: the device alarm only
        AlertService(db, settings).evaluate(NOW)
        db.execute(
            "DELETE FROM webhook_deliveries WHERE alert_id IN "
            "(SELECT id FROM alerts WHERE kind != 'drift_device')"
        )
        db.conn.commit()
    assert deliver_job(store, settings, NOW) == (0, 1)
    # not due before the backoff has passed
    assert deliver_job(store, settings, NOW + timedelta(seconds=4)) == (0, 0)
    assert deliver_job(store, settings, NOW + timedelta(seconds=5)) == (0, 1)
    assert deliver_job(store, settings, NOW + timedelta(seconds=14)) == (0, 0)
    # "restart": a new store on the same file still has the pending delivery
    store.close()
    again = Store(settings.db_path)
    assert deliver_job(again, settings, NOW + timedelta(seconds=15)) == (1, 0)
    assert deliver_job(again, settings, NOW + timedelta(hours=2)) == (0, 0)
    ids = {r["headers"][DELIVERY_HEADER] for r in receiver.requests}
    assert len(receiver.requests) == 3 and len(ids) == 1  # same idempotency key each time
    assert list(receiver.processed) == list(ids)
    with again.connect() as db:
        (d,) = WebhookService(db).deliveries()
    assert d.attempts == 3 and d.delivered_at is not None and d.last_status == 200
    again.close()


def test_gives_up_after_max_attempts(settings: FleetSettings, store: Store) -> None:
    capped = settings.model_copy(
        update={"alerts": settings.alerts.model_copy(update={"max_attempts": 2})}
    )
    with store.connect() as db:
        seed(db, settings, NOW, devices=("cam-1",), drifting=("cam-1",))
        WebhookService(db).add("http://127.0.0.1:9/closed", SECRET, "test", NOW)
        AlertService(db, capped).evaluate(NOW)
        pending = WebhookService(db).pending()
    assert pending >= 1
    deliver_job(store, capped, NOW)
    deliver_job(store, capped, NOW + timedelta(minutes=1))
    with store.connect() as db:
        hooks = WebhookService(db)
        assert hooks.pending() == 0
        assert all(
            d.gave_up_at and "ConnectError" in (d.last_error or "") for d in hooks.deliveries()
        )


def test_webhooks_from_settings_and_the_api(
    settings: FleetSettings, receiver: Receiver, launch: Any, mint: Any
) -> None:
    configured = settings.model_copy(
        update={
            "alerts": settings.alerts.model_validate(
                {"webhooks": [{"url": receiver.url, "secret": SECRET}]}
            )
        }
    )
    app: FastAPI = create_app(configured)
    url = launch(app)
    admin, viewer = mint("admin"), mint("viewer")
    listed = httpx.get(f"{url}/v1/webhooks", headers=admin).json()
    assert [(w["url"], w["source"]) for w in listed] == [(receiver.url, "settings")]
    assert "secret" not in listed[0]
    assert httpx.get(f"{url}/v1/webhooks", headers=viewer).status_code == 403
    r = httpx.delete(f"{url}/v1/webhooks/{listed[0]['id']}", headers=admin)
    assert r.status_code == 409 and "settings" in r.json()["detail"]
    r = httpx.post(f"{url}/v1/webhooks", json={"url": "ftp://x", "secret": SECRET}, headers=admin)
    assert r.status_code == 422 and "http" in r.json()["detail"]
    r = httpx.post(
        f"{url}/v1/webhooks", json={"url": receiver.url, "secret": "short"}, headers=admin
    )
    assert r.status_code == 422
    made = httpx.post(
        f"{url}/v1/webhooks", json={"url": receiver.url + "/2", "secret": SECRET}, headers=admin
    )
    assert made.status_code == 201 and made.json()["source"] == "api"
    gone = httpx.delete(f"{url}/v1/webhooks/{made.json()['id']}", headers=admin).json()
    assert gone["disabled_at"]
    # the jobs are on the app's scheduler
    jobs = {j.id for j in app.state.scheduler.get_jobs()}
    assert {"evaluate_alerts", "deliver_webhooks"} <= jobs
    with closing(connect(configured.db_path)) as db:
        assert (
            db.execute("SELECT count(*) FROM webhooks WHERE disabled_at IS NULL").fetchone()[0] == 1
        )
