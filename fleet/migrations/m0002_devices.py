"""Enrollment tokens and the device registry.

``online`` and ``last_seen`` are filled by MQTT ingestion; ``mqtt_password_hash`` is Mosquitto's
``$7$`` PBKDF2-SHA512 form (so a broker password file can be written from it) and is set to NULL
when the device is decommissioned.
"""

from __future__ import annotations

from sqlite_utils import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    note TEXT NOT NULL DEFAULT '',
    uses_total INTEGER NOT NULL CHECK (uses_total >= 1),
    uses_left INTEGER NOT NULL CHECK (uses_left >= 0 AND uses_left <= uses_total),
    expires_at TEXT NOT NULL,
    group_name TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    profile TEXT NOT NULL,
    facts TEXT NOT NULL DEFAULT '{}',
    agent_version TEXT NOT NULL DEFAULT '',
    group_name TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    enrolled_at TEXT NOT NULL,
    enrollment_token_id TEXT REFERENCES enrollment_tokens (id),
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'decommissioned')),
    decommissioned_at TEXT,
    mqtt_username TEXT NOT NULL UNIQUE,
    mqtt_password_hash TEXT,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS devices_active_key ON devices (public_key)
    WHERE status = 'active';
CREATE INDEX IF NOT EXISTS devices_group ON devices (group_name);
CREATE INDEX IF NOT EXISTS devices_profile ON devices (profile);
CREATE INDEX IF NOT EXISTS devices_status ON devices (status);
"""


def migrate(db: Database) -> None:
    db.executescript(SCHEMA)
