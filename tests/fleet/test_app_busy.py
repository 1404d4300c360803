"""A write lock held past the busy timeout (a burst of writers on a loaded machine) is a 503
with Retry-After that changes nothing, not a 500; the same request succeeds once it is free."""

from __future__ import annotations

from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import httpx

from fleet.app import create_app
from fleet.audit import Actor
from fleet.server import BackgroundServer
from fleet.settings import load_settings
from fleet.store import connect, migrate
from fleet.tokens import Role, TokenService


def _token_names(db_path: Path) -> list[str]:
    with closing(connect(db_path)) as db:
        return sorted(t.name for t in TokenService(db).list())


def test_a_locked_database_is_503_retry_after_and_changes_nothing(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", db_busy_timeout_ms=200)
    with closing(connect(settings.db_path)) as db:
        migrate(db)
        secret = TokenService(db).create("boss", Role.ADMIN, Actor.cli("t"), datetime.now(UTC))
    headers = {"Authorization": f"Bearer {secret.secret}"}
    body = {"name": "new", "role": "viewer"}
    with (
        BackgroundServer(create_app(settings)) as server,
        httpx.Client(base_url=server.url, headers=headers, timeout=10) as http,
    ):
        holder = connect(settings.db_path)
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            r = http.post("/v1/tokens", json=body)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "2"
        assert r.json()["error"] == "Busy" and "retry" in r.json()["detail"]
        assert _token_names(settings.db_path) == ["boss"]
        assert http.post("/v1/tokens", json=body).status_code == 201
    assert _token_names(settings.db_path) == ["boss", "new"]
