"""The fleet API fuzzed from its own OpenAPI spec (schemathesis) over real HTTP.

Every operation gets schema-valid and schema-violating requests (path, query, headers, body),
sent as an admin, an operator, a viewer, with no token and with a forged one, against a fleet
with a published release and an enrolled device. Every response must be no 5xx (but a 503 that
names the missing dependency: an ``UnavailableError``) and, where the spec documents its status,
match the documented schema; and a refused request (4xx) must change
nothing: every table of the fleet database and every file under its data directory are the same
before and after.

CI runs a few hundred requests; ``EDGEFLEET_FUZZ=long`` (``bench/fuzz.py``) runs 10,000.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from fleet.bundle_upload import pack
from fleet.errors import UnavailableError
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.settings import FleetSettings
from fleet.tuf_repo import TufRepository

LONG = os.environ.get("EDGEFLEET_FUZZ") == "long"


def _subclasses(cls: type) -> set[type]:
    return {cls}.union(*(_subclasses(c) for c in cls.__subclasses__()))


BUNDLE = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier" / "1"
ROLES = ("admin", "operator", "viewer", "none", "forged")
FORGED = {"Authorization": "Bearer " + "ef_" + "A" * 40}
# 503 is the fleet's answer when a dependency is not set up (a signing key, the broker's
# credential files): a refusal that says what to configure, never a crash
UNAVAILABLE = {c.__name__ for c in _subclasses(UnavailableError)}


def snapshot(settings: FleetSettings) -> dict[str, str]:
    """A digest of every table's rows and of every file (name, size, content) under the data
    directory except the database files themselves."""
    out: dict[str, str] = {}
    with closing(sqlite3.connect(settings.db_path)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            rows = sorted(repr(r) for r in db.execute(f'SELECT * FROM "{table}"'))
            out[f"table {table}"] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    data_dir = settings.db_path.parent
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and not path.name.startswith(settings.db_path.name):
            out[f"file {path.relative_to(data_dir)}"] = hashlib.sha256(
                path.read_bytes()
            ).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture
def seeded(
    settings: FleetSettings,
    clock: Callable[[], Any],
    http: httpx.Client,
    admin: dict[str, str],
    operator: dict[str, str],
) -> None:
    """A published release and an enrolled device, so that lookups can hit real rows."""
    signers = init_key_dir(settings.keys_dir)
    TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES}).init(
        signers[ROOT], clock()
    )
    r = http.post(
        "/v1/models",
        content=pack(BUNDLE),
        headers={**operator, "Content-Type": "application/gzip"},
    )
    assert r.status_code == 201, r.text
    token = http.post("/v1/enrollment-tokens", json={"uses": 1}, headers=admin).json()["secret"]
    r = http.post(
        "/v1/enroll",
        json={
            "token": token,
            "public_key": "ab" * 32,
            "profile": "rpi4-aarch64",
            "facts": {"arch": "aarch64", "ram_mb": 2048, "cores": 4, "agent_version": "0.1.0"},
        },
    )
    assert r.status_code == 201, r.text


Call = Callable[[Any, str], tuple[int, list[str]]]


@pytest.fixture
def api(
    app: FastAPI,
    live: str,
    seeded: None,
    settings: FleetSettings,
    admin: dict[str, str],
    operator: dict[str, str],
    viewer: dict[str, str],
) -> Call:
    """``call(case, role)``: send one generated request as ``role`` and check its response;
    returns the status and what a refused request changed (must be nothing)."""
    headers = {
        "admin": admin,
        "operator": operator,
        "viewer": viewer,
        "none": {},
        "forged": FORGED,
    }

    def call(case: Any, role: str) -> tuple[int, list[str]]:
        before = snapshot(settings)
        response = case.call(base_url=live, headers=headers[role], timeout=30)
        if response.status_code == 503:  # only a deliberate one: a missing dependency, said so
            assert response.json()["error"] in UNAVAILABLE, response.text
        case.validate_response(response, checks=[response_schema_conformance])
        after = snapshot(settings) if 400 <= response.status_code < 500 else before
        return response.status_code, changed(before, after)

    return call


_strategies: dict[str, st.SearchStrategy[Any]] = {}


def cases(app: FastAPI) -> st.SearchStrategy[Any]:
    """Schema-valid and schema-violating requests for every operation of ``app``'s spec."""
    if "cases" not in _strategies:  # the spec is the same for every app; build it once
        schema = schemathesis.openapi.from_dict(app.openapi())
        _strategies["cases"] = st.sampled_from(
            [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
        ).flatmap(lambda mode: schema.as_strategy(generation_mode=mode))
    return _strategies["cases"]


@settings(
    max_examples=10_000 if LONG else 300,
    deadline=None,
    derandomize=not LONG,  # CI runs the same cases every time; the long run explores
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(data=st.data(), role=st.sampled_from(ROLES))
def test_fuzz_api(app: FastAPI, api: Call, data: st.DataObject, role: str) -> None:
    case = data.draw(cases(app), label="case")
    status, diff = api(case, role)
    assert status < 500 or status == 503, f"{case.method} {case.formatted_path}: {status}"
    assert not diff, f"{case.method} {case.formatted_path} as {role}: {status}, changed {diff}"
