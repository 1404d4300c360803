"""Webhooks: the registered receivers, the signed JSON POST, and the durable delivery outbox.

Every alert event is written to ``webhook_deliveries`` (one row per webhook) in the same
transaction that opens or resolves the alert (:mod:`fleet.alert_service`), so a restart loses
nothing; :meth:`WebhookService.deliver_due` (the ``deliver_webhooks`` job) POSTs the due rows
and retries failures with exponential backoff until ``max_attempts``.

Each attempt is a JSON ``POST`` with these headers:

* ``X-Edgefleet-Event``: ``alert.opened`` or ``alert.resolved``
* ``X-Edgefleet-Delivery``: the delivery id, the same on every retry (the idempotency key:
  a receiver that already processed it answers 2xx and does nothing)
* ``X-Edgefleet-Signature``: ``t=<unix seconds>,v1=<hex>`` where ``hex`` is
  HMAC-SHA256(secret, ``"<t>." + body``); :func:`verify_signature` is the receiver's check
  (reject a stale ``t`` to stop replays)

Any 2xx ends the delivery; anything else (or no answer) is retried. Redirects are not
followed. The body bytes are fixed when the event is written, so every attempt sends the same.

Signing and verifying are pure; the HTTP client is httpx.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlite_utils import Database

from fleet.errors import ConflictError, InvalidInputError, NotFoundError
from fleet.settings import WebhookSettings
from fleet.store import from_iso, immediate, iso

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Edgefleet-Signature"
DELIVERY_HEADER = "X-Edgefleet-Delivery"
EVENT_HEADER = "X-Edgefleet-Event"
SIGNATURE_VERSION = "v1"
BACKOFF_BASE = timedelta(seconds=5)
BACKOFF_CAP = timedelta(hours=1)
MAX_BATCH = 100
MIN_SECRET = 16


class WebhookNotFoundError(NotFoundError):
    """No webhook with that id."""


class SignatureError(ValueError):
    """A webhook signature that does not verify."""


# --- signing (pure) ---------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Edgefleet-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0
) -> int:
    """Check a received signature; return its timestamp or raise :class:`SignatureError`."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
        given = parts[SIGNATURE_VERSION]
    except (KeyError, ValueError):
        raise SignatureError(f"malformed signature header {header!r}") from None
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"signature timestamp {timestamp} is outside ±{tolerance:.0f} s")
    expected = sign(secret, timestamp, body).split(f"{SIGNATURE_VERSION}=", 1)[1]
    if not hmac.compare_digest(expected, given):
        raise SignatureError("signature does not match the body and secret")
    return timestamp


def backoff(attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: 5 s, 10 s, 20 s ... at most 1 h."""
    return min(BACKOFF_CAP, BACKOFF_BASE * (2 ** max(0, attempts - 1)))


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Webhook:
    id: str
    url: str
    source: str
    created_at: datetime
    created_by: str
    disabled_at: datetime | None


@dataclass(frozen=True)
class Delivery:
    id: str
    webhook_id: str
    alert_id: str
    event: str
    created_at: datetime
    next_attempt_at: datetime
    attempts: int
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None
    gave_up_at: datetime | None


def _opt(text: str | None) -> datetime | None:
    return from_iso(text) if text else None


def _webhook(row: Mapping[str, Any]) -> Webhook:
    return Webhook(
        row["id"],
        row["url"],
        row["source"],
        from_iso(row["created_at"]),
        row["created_by"],
        _opt(row["disabled_at"]),
    )


def _delivery(row: Mapping[str, Any]) -> Delivery:
    return Delivery(
        id=row["id"],
        webhook_id=row["webhook_id"],
        alert_id=row["alert_id"],
        event=row["event"],
        created_at=from_iso(row["created_at"]),
        next_attempt_at=from_iso(row["next_attempt_at"]),
        attempts=int(row["attempts"]),
        last_status=row["last_status"],
        last_error=row["last_error"],
        delivered_at=_opt(row["delivered_at"]),
        gave_up_at=_opt(row["gave_up_at"]),
    )


def _settings_id(url: str) -> str:
    return "whk-cfg-" + hashlib.sha256(url.encode()).hexdigest()[:12]


def check_url(url: str) -> str:
    if (
        not url.startswith(("http://", "https://"))
        or len(url) > 2048
        or any(c.isspace() for c in url)
    ):
        raise InvalidInputError(
            f"webhook url {url[:80]!r} is not valid: give an http:// or https:// URL"
        )
    return url


# --- the service ------------------------------------------------------------------------------


class WebhookService:
    """Webhooks and their outbox over one connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # registry

    def sync_settings(self, configured: tuple[WebhookSettings, ...], now: datetime) -> None:
        """Make the ``source = 'settings'`` rows match the settings (disable removed ones)."""
        wanted = {_settings_id(w.url): w for w in configured}
        with immediate(self.db):
            for wid, w in wanted.items():
                self.db.execute(
                    "INSERT INTO webhooks (id, url, secret, source, created_at, created_by) "
                    "VALUES (?, ?, ?, 'settings', ?, 'settings') ON CONFLICT (id) DO UPDATE "
                    "SET secret = excluded.secret, disabled_at = NULL",
                    [wid, w.url, w.secret.get_secret_value(), iso(now)],
                )
            for row in self.db.query(
                "SELECT id FROM webhooks WHERE source = 'settings' AND disabled_at IS NULL"
            ):
                if row["id"] not in wanted:
                    self.db.execute(
                        "UPDATE webhooks SET disabled_at = ? WHERE id = ?", [iso(now), row["id"]]
                    )

    def add(self, url: str, secret: str, actor: str, now: datetime) -> Webhook:
        check_url(url)
        if len(secret) < MIN_SECRET:
            raise InvalidInputError(
                f"the webhook secret must have {MIN_SECRET}+ characters (e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        wid = "whk-" + secrets.token_hex(6)
        with immediate(self.db):
            self.db.execute(
                "INSERT INTO webhooks (id, url, secret, source, created_at, created_by) "
                "VALUES (?, ?, ?, 'api', ?, ?)",
                [wid, url, secret, iso(now), actor],
            )
        return self.get(wid)

    def get(self, webhook_id: str) -> Webhook:
        rows = list(self.db.query("SELECT * FROM webhooks WHERE id = ?", [webhook_id]))
        if not rows:
            raise WebhookNotFoundError(f"no webhook {webhook_id!r}; GET /v1/webhooks lists them")
        return _webhook(rows[0])

    def all(self) -> list[Webhook]:
        return [_webhook(r) for r in self.db.query("SELECT * FROM webhooks ORDER BY created_at")]

    def disable(self, webhook_id: str, now: datetime) -> Webhook:
        hook = self.get(webhook_id)
        if hook.source == "settings":
            raise ConflictError(
                f"webhook {webhook_id} comes from the settings (alerts.webhooks): remove it "
                "there and restart the fleet manager"
            )
        with immediate(self.db):
            self.db.execute(
                "UPDATE webhooks SET disabled_at = COALESCE(disabled_at, ?) WHERE id = ?",
                [iso(now), webhook_id],
            )
        return self.get(webhook_id)

    # outbox

    def enqueue(self, alert_id: str, event: str, payload: Mapping[str, Any], now: datetime) -> int:
        """Queue ``event`` for every active webhook; call inside the alert's transaction."""
        hooks = [
            r["id"] for r in self.db.query("SELECT id FROM webhooks WHERE disabled_at IS NULL")
        ]
        for wid in hooks:
            delivery_id = "dlv-" + secrets.token_hex(8)
            body = {"event": event, "delivery_id": delivery_id, **payload}
            self.db.execute(
                "INSERT INTO webhook_deliveries (id, webhook_id, alert_id, event, body, "
                "created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    delivery_id,
                    wid,
                    alert_id,
                    event,
                    json.dumps(body, separators=(",", ":"), sort_keys=True),
                    iso(now),
                    iso(now),
                ],
            )
        return len(hooks)

    def deliveries(self, alert_id: str | None = None, limit: int = 100) -> list[Delivery]:
        where, params = ("WHERE alert_id = ?", [alert_id]) if alert_id else ("", [])
        rows = self.db.query(
            f"SELECT * FROM webhook_deliveries {where} ORDER BY created_at DESC, id LIMIT ?",
            [*params, limit],
        )
        return [_delivery(r) for r in rows]

    def pending(self) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM webhook_deliveries "
            "WHERE delivered_at IS NULL AND gave_up_at IS NULL"
        ).fetchone()
        return int(row[0])

    def deliver_due(
        self,
        client: httpx.Client,
        now: datetime,
        max_attempts: int,
    ) -> tuple[int, int]:
        """POST every due delivery once; return (delivered, failed). No transaction is held
        during the HTTP calls."""
        due = list(
            self.db.query(
                "SELECT d.id, d.body, d.event, d.attempts, w.url, w.secret, w.disabled_at "
                "FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id "
                "WHERE d.delivered_at IS NULL AND d.gave_up_at IS NULL "
                "AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at LIMIT ?",
                [iso(now), MAX_BATCH],
            )
        )
        delivered = failed = 0
        for row in due:
            if row["disabled_at"]:
                self._finish(row["id"], now, None, "webhook disabled", give_up=True)
                continue
            status, error = self._post(client, row, now)
            attempts = int(row["attempts"]) + 1
            if error is None:
                self._finish(row["id"], now, status, None, give_up=False, delivered=True)
                delivered += 1
                continue
            failed += 1
            log.warning(
                "webhook delivery %s to %s failed (attempt %d): %s",
                row["id"],
                row["url"],
                attempts,
                error,
            )
            give_up = attempts >= max_attempts
            self._finish(row["id"], now + backoff(attempts), status, error, give_up=give_up)
            if give_up:
                log.error("giving up on webhook delivery %s after %d attempts", row["id"], attempts)
        return delivered, failed

    def _post(
        self, client: httpx.Client, row: Mapping[str, Any], now: datetime
    ) -> tuple[int | None, str | None]:
        body = row["body"].encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "edgefleet-webhooks/1",
            EVENT_HEADER: row["event"],
            DELIVERY_HEADER: row["id"],
            SIGNATURE_HEADER: sign(row["secret"], int(now.timestamp()), body),
        }
        try:
            r = client.post(row["url"], content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if 200 <= r.status_code < 300:
            return r.status_code, None
        return r.status_code, f"HTTP {r.status_code}: {r.text[:200]}"

    def _finish(
        self,
        delivery_id: str,
        when: datetime,
        status: int | None,
        error: str | None,
        *,
        give_up: bool,
        delivered: bool = False,
    ) -> None:
        with immediate(self.db):
            self.db.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + ?, last_status = ?, "
                "last_error = ?, next_attempt_at = ?, delivered_at = ?, gave_up_at = ? "
                "WHERE id = ?",
                [
                    0 if error == "webhook disabled" else 1,
                    status,
                    error,
                    iso(when),
                    iso(when) if delivered else None,
                    iso(when) if give_up else None,
                    delivery_id,
                ],
            )
