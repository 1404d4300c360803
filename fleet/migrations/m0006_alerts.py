"""Alerts, webhooks and the webhook delivery outbox.

``alerts`` is every alert the fleet raised: ``key`` names the condition (``device_offline:cam-1``,
``drift_fleet:pdm/2``...); at most one alert per key is open (``resolved_at`` NULL), so a
condition that stays true is one alert, and one that comes back after being resolved is a new
one. ``acknowledged_at``/``acknowledged_by`` record an operator having seen it.

``webhooks`` are the receivers of alert events, from settings (``source = 'settings'``,
re-synced at every start) or added over the API (``source = 'api'``). The secret is kept in
clear: the fleet needs it to sign every delivery (HMAC-SHA256).

``webhook_deliveries`` is the outbox: one row per (event, webhook), written in the same
transaction as the alert change, so an event is never lost across restarts. ``id`` is the
idempotency key sent with every attempt; ``next_attempt_at`` is when it is due;
``delivered_at`` or ``gave_up_at`` ends it.
"""

from __future__ import annotations

from sqlite_utils import Database

STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    subject TEXT NOT NULL,
    message TEXT NOT NULL,
    details TEXT NOT NULL DEFAULT '{}',
    opened_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    resolved_at TEXT,
    acknowledged_at TEXT,
    acknowledged_by TEXT
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS alerts_open_key ON alerts (key) WHERE resolved_at IS NULL",
    "CREATE INDEX IF NOT EXISTS alerts_opened ON alerts (opened_at)",
    """CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('settings', 'api')),
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    disabled_at TEXT
)""",
    """CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL REFERENCES webhooks (id),
    alert_id TEXT NOT NULL REFERENCES alerts (id),
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    delivered_at TEXT,
    gave_up_at TEXT
)""",
    """CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL""",
)


def migrate(db: Database) -> None:
    # one statement at a time: executescript() would commit the migration's transaction
    for statement in STATEMENTS:
        db.execute(statement)
