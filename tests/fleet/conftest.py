"""Fixtures for the fleet manager: settings on a temp data dir, a steppable clock, a real TUF
repository, the app, and the app served by uvicorn on a free loopback port (real HTTP).

Test modules cannot import this file (pytest's importlib mode); what they need beyond fixtures
lives in importable modules (:mod:`fleet.server`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from securesystemslib.signer import CryptoSigner

from fleet.app import create_app
from fleet.audit import Actor
from fleet.server import BackgroundServer
from fleet.settings import ENV_PREFIX, FleetSettings, load_settings
from fleet.store import connect, migrate
from fleet.tokens import Role, TokenService
from fleet.tuf_repo import ONLINE_ROLES, TufRepository

START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class SteppingClock:
    """Wall time under the test's control: starts at ``START`` and moves only when told."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's EDGEFLEET_* variables must not leak into the tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def clock() -> SteppingClock:
    return SteppingClock()


@pytest.fixture
def settings(tmp_path: Path) -> FleetSettings:
    return load_settings(data_dir=tmp_path / "data", public_base_url="http://fleet.test:8080")


@pytest.fixture
def tuf_repo(settings: FleetSettings, clock: SteppingClock) -> TufRepository:
    """A real, initialised TUF repository where the app looks for it (settings.tuf_dir)."""
    repo = TufRepository(
        settings.tuf_dir, {r: CryptoSigner.generate_ed25519() for r in ONLINE_ROLES}
    )
    repo.init(CryptoSigner.generate_ed25519(), clock())
    return repo


@pytest.fixture
def app(settings: FleetSettings, clock: SteppingClock) -> FastAPI:
    return create_app(settings, clock=clock)


@pytest.fixture
def live(app: FastAPI) -> Iterator[str]:
    """The app on real HTTP: its base URL."""
    with BackgroundServer(app) as server:
        yield server.url


@pytest.fixture
def http(live: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live, timeout=10) as client:
        yield client


def make_token(settings: FleetSettings, role: Role | str, name: str | None = None) -> str:
    """A token straight in the database (as `fleet token create` does); returns its secret."""
    with closing(connect(settings.db_path)) as db:
        migrate(db)
        issued = TokenService(db).create(
            name or f"test-{role}", role, Actor.cli("pytest"), datetime.now(UTC)
        )
    return issued.secret


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


Mint = Callable[[str], dict[str, str]]
Launch = Callable[[FastAPI], str]


@pytest.fixture
def mint(settings: FleetSettings, app: FastAPI) -> Mint:
    """``mint(role)``: the Authorization header of a new token of that role."""
    return lambda role: bearer(make_token(settings, role))


@pytest.fixture
def launch() -> Iterator[Launch]:
    """``launch(app)``: serve another app on real HTTP for the test; returns its URL."""
    running: list[BackgroundServer] = []

    def start(app: FastAPI) -> str:
        running.append(BackgroundServer(app))
        running[-1].start()
        return running[-1].url

    yield start
    for server in running:
        server.stop()


@pytest.fixture
def admin(mint: Mint) -> dict[str, str]:
    return mint(Role.ADMIN)


@pytest.fixture
def operator(mint: Mint) -> dict[str, str]:
    return mint(Role.OPERATOR)


@pytest.fixture
def viewer(mint: Mint) -> dict[str, str]:
    return mint(Role.VIEWER)
