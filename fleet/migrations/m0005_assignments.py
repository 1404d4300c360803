"""Release assignments and the desired-document outbox.

``assignments`` is every signed desired document the fleet issued, one row per (device,
serial): the release (model, version, the artifact's TUF target path), the rollback flag, the
rollout that issued it (NULL for a direct operator assignment), its times, the signed wire form
and when the broker acknowledged it (``published_at``, NULL until then). The row with a
device's highest serial is its current assignment; serials only grow per device.

``desired_outbox`` holds, per device, the one retained payload still to be published: the
newest signed document, or an empty payload that clears the retained document (a
decommissioned device). A row is deleted once the broker acknowledged exactly that payload
(``id`` changes whenever the row is replaced, so an older publish never deletes a newer row).
"""

from __future__ import annotations

from sqlite_utils import Database

STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS assignments (
    device_id TEXT NOT NULL REFERENCES devices (id),
    serial INTEGER NOT NULL CHECK (serial >= 1),
    model TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    artifact TEXT NOT NULL,
    target_path TEXT NOT NULL,
    rollback INTEGER NOT NULL DEFAULT 0 CHECK (rollback IN (0, 1)),
    rollout_id TEXT,
    issued_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    document TEXT NOT NULL,
    assigned_by TEXT NOT NULL,
    assigned_by_name TEXT NOT NULL DEFAULT '',
    published_at TEXT,
    PRIMARY KEY (device_id, serial)
)""",
    """CREATE INDEX IF NOT EXISTS assignments_release ON assignments (model, version)""",
    """CREATE INDEX IF NOT EXISTS assignments_rollout ON assignments (rollout_id)
    WHERE rollout_id IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS desired_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL UNIQUE REFERENCES devices (id),
    serial INTEGER,
    payload BLOB NOT NULL,
    queued_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
)""",
)


def migrate(db: Database) -> None:
    # one statement at a time: executescript() would commit the migration's transaction
    for statement in STATEMENTS:
        db.execute(statement)
