"""Device telemetry from MQTT ingestion.

``telemetry_messages`` holds every accepted report once per ``(device_id, seq)`` (the
idempotency key: a redelivered message is ignored), with its body as JSON. The per-kind tables
(``heartbeats``, ``drift_summaries``, ``update_events``) hold the same reports in
query-friendly columns, keyed the same way. ``device_state`` is each device's newest ``state``
report (birth or Last Will): an older ``seq`` never overwrites a newer one. ``ingest_counters``
keeps the ingester's counts (stored per kind, duplicates, rejected per reason) across restarts.
Times from devices (``ts``, window bounds) are epoch seconds; times from the fleet (``*_at``)
are ISO text like every other table.
"""

from __future__ import annotations

from sqlite_utils import Database

STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS telemetry_messages (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    ts REAL NOT NULL,
    received_at TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS heartbeats (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    uptime_s REAL NOT NULL,
    cpu_percent REAL NOT NULL,
    mem_rss_bytes INTEGER NOT NULL,
    mem_available_bytes INTEGER NOT NULL,
    disk_free_bytes INTEGER NOT NULL,
    outbox_depth INTEGER NOT NULL,
    outbox_evicted_total INTEGER NOT NULL,
    inferences_total INTEGER NOT NULL,
    inference_errors_total INTEGER NOT NULL,
    latency_p50_ms REAL,
    latency_p95_ms REAL,
    latency_p99_ms REAL,
    model_name TEXT,
    model_version INTEGER,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS heartbeats_device_ts ON heartbeats (device_id, ts)",
    """CREATE TABLE IF NOT EXISTS drift_summaries (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    window_start REAL NOT NULL,
    window_end REAL NOT NULL,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    reference_sha256 TEXT NOT NULL,
    n INTEGER NOT NULL,
    drifted INTEGER NOT NULL,
    drifted_features TEXT NOT NULL DEFAULT '[]',
    counts TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
)""",
    "CREATE INDEX IF NOT EXISTS drift_device_window ON drift_summaries (device_id, window_end)",
    """CREATE INDEX IF NOT EXISTS drift_model_window
    ON drift_summaries (model_name, model_version, window_end)""",
    """CREATE TABLE IF NOT EXISTS update_events (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    release_name TEXT NOT NULL,
    release_version INTEGER NOT NULL,
    rollback INTEGER NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    reason TEXT,
    elapsed_s TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (device_id, seq)
)""",
    "CREATE INDEX IF NOT EXISTS update_events_device_ts ON update_events (device_id, ts)",
    """CREATE INDEX IF NOT EXISTS update_events_release
    ON update_events (release_name, release_version, ts)""",
    """CREATE TABLE IF NOT EXISTS device_state (
    device_id TEXT PRIMARY KEY REFERENCES devices (id),
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    online INTEGER NOT NULL,
    agent_version TEXT NOT NULL,
    profile TEXT NOT NULL,
    model_name TEXT,
    model_version INTEGER,
    model_slot TEXT,
    model_runtime TEXT,
    received_at TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS ingest_counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL DEFAULT 0
)""",
)


def migrate(db: Database) -> None:
    # one statement at a time: executescript() would commit the migration's transaction
    for statement in STATEMENTS:
        db.execute(statement)
