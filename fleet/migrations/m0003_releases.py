"""The model registry: models, their releases (immutable, versions only grow per model) and
each release's files (artifacts, golden sets, reference profile) with the TUF target path they
were published under. ``metadata`` is the release's ``bundle.json`` as uploaded."""

from __future__ import annotations

from sqlite_utils import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL REFERENCES models (name),
    version INTEGER NOT NULL CHECK (version >= 1),
    metadata TEXT NOT NULL,
    metadata_sha256 TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'published' CHECK (status IN ('published', 'withdrawn')),
    targets_version INTEGER,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_by_name TEXT NOT NULL DEFAULT '',
    UNIQUE (model, version)
);
CREATE TABLE IF NOT EXISTS release_artifacts (
    release_id INTEGER NOT NULL REFERENCES releases (id),
    file TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('artifact', 'golden', 'reference')),
    target_path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    length INTEGER NOT NULL CHECK (length >= 0),
    format TEXT,
    runtime TEXT,
    quantization TEXT,
    profiles TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (release_id, file)
);
CREATE INDEX IF NOT EXISTS releases_model ON releases (model, version);
"""


def migrate(db: Database) -> None:
    db.executescript(SCHEMA)
