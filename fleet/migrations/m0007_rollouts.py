"""Staged rollouts.

``rollouts`` is one row per rollout: the release (model, version), the target (``kind`` all,
group, tags or profiles, and its ``value`` as JSON; ``target_key`` is their canonical text,
used by the one-active-rollout rule), the stages (JSON list of percent, soak and max wait), the
gate thresholds (JSON), the failure policy, and where it stands: ``state``, ``stage`` (index
of the current stage), ``stage_started_at``, the last gate verdicts (JSON) and the last reason.
A partial unique index allows one active rollout (running, paused, rolling back) per model and
target.

``rollout_devices`` is each device of a rollout with the stage it was placed in (once placed,
never moved), the version it ran before (the rollback target), when the rollout assigned the
release to it and when the fleet issued its rollback.

``rollout_events`` is the rollout's history: one row per state change or promotion, with who
caused it and why.
"""

from __future__ import annotations

from sqlite_utils import Database

STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    target_kind TEXT NOT NULL CHECK (target_kind IN ('all', 'group', 'tags', 'profiles')),
    target_value TEXT NOT NULL,
    target_key TEXT NOT NULL,
    stages TEXT NOT NULL,
    gates TEXT NOT NULL,
    policy TEXT NOT NULL CHECK (policy IN ('pause', 'rollback')),
    state TEXT NOT NULL
        CHECK (state IN ('running', 'paused', 'rolling_back', 'rolled_back', 'completed')),
    stage INTEGER NOT NULL DEFAULT 0,
    stage_started_at TEXT NOT NULL,
    verdicts TEXT NOT NULL DEFAULT '[]',
    reason TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_by_name TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    ended_at TEXT
)""",
    """CREATE UNIQUE INDEX IF NOT EXISTS rollouts_one_active ON rollouts (model, target_key)
    WHERE state IN ('running', 'paused', 'rolling_back')""",
    "CREATE INDEX IF NOT EXISTS rollouts_state ON rollouts (state)",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts (id),
    device_id TEXT NOT NULL REFERENCES devices (id),
    stage INTEGER NOT NULL,
    from_version INTEGER,
    placed_at TEXT NOT NULL,
    assigned_at TEXT,
    rollback_at TEXT,
    note TEXT,
    PRIMARY KEY (rollout_id, device_id)
)""",
    "CREATE INDEX IF NOT EXISTS rollout_devices_device ON rollout_devices (device_id)",
    """CREATE TABLE IF NOT EXISTS rollout_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL REFERENCES rollouts (id),
    ts TEXT NOT NULL,
    from_state TEXT NOT NULL,
    event TEXT NOT NULL,
    to_state TEXT NOT NULL,
    stage INTEGER NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
)""",
    "CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events (rollout_id, id)",
)


def migrate(db: Database) -> None:
    # one statement at a time: executescript() would commit the migration's transaction
    for statement in STATEMENTS:
        db.execute(statement)
