"""The device registry over HTTP: list, filter, search and paginate; change group and tags;
decommission; every change audited; bad input explained."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner

from fleet.app import create_app
from fleet.audit import Actor
from fleet.enrollment import (
    DeviceEndpoints,
    EnrollmentRequest,
    EnrollmentService,
    EnrollmentTokenSpec,
)
from fleet.server import BackgroundServer
from fleet.settings import FleetSettings, load_settings
from fleet.store import connect
from fleet.tokens import TokenService
from fleet.tuf_repo import ONLINE_ROLES, TufRepository
from protocol.device_auth import public_key_hex

ENDPOINTS = DeviceEndpoints("127.0.0.1", 1883, False, "http://fleet.test")


def enroll_many(
    settings: FleetSettings,
    repo: TufRepository,
    clock: Any,
    plan: list[tuple[str, str | None, tuple[str, ...]]],
) -> list[str]:
    """Enroll one device per (profile, group, tags) through the enrollment service."""
    ids = []
    with closing(connect(settings.db_path)) as db:
        service = EnrollmentService(db)
        for profile, group, tags in plan:
            secret = service.create_token(
                EnrollmentTokenSpec(group=group, tags=tags), Actor.cli("t"), clock()
            ).secret
            request = EnrollmentRequest.model_validate(
                {
                    "token": secret,
                    "public_key": public_key_hex(Ed25519PrivateKey.generate()),
                    "profile": profile,
                    "facts": {"arch": "aarch64", "ram_mb": 1024, "agent_version": "0.1.0"},
                }
            )
            ids.append(service.enroll(request, clock(), repo, ENDPOINTS).device_id)
    return ids


PLAN: list[tuple[str, str | None, tuple[str, ...]]] = [
    ("rpi4-aarch64", "plant-1", ("line=a", "camera")),
    ("rpi4-aarch64", "plant-1", ("line=b",)),
    ("jetson-aarch64", "plant-2", ("line=a", "camera")),
    ("x86_64-gateway", None, ()),
    ("rpi4-aarch64", "plant-2", ("camera",)),
]


@pytest.fixture
def fleet(
    settings: FleetSettings, tuf_repo: TufRepository, clock: Any, http: httpx.Client
) -> list[str]:
    return enroll_many(settings, tuf_repo, clock, PLAN)


@dataclass
class ReadOnly:
    """One served app with the PLAN fleet, shared by the tests that only read."""

    http: httpx.Client
    viewer: dict[str, str]
    fleet: list[str]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadOnly]:
    settings = load_settings(data_dir=tmp_path_factory.mktemp("shared") / "data")
    now = datetime(2030, 1, 1, tzinfo=UTC)
    repo = TufRepository(
        settings.tuf_dir, {r: CryptoSigner.generate_ed25519() for r in ONLINE_ROLES}
    )
    repo.init(CryptoSigner.generate_ed25519(), now)
    app = create_app(settings, clock=lambda: now)
    with closing(connect(settings.db_path)) as db:
        secret = TokenService(db).create("v", "viewer", Actor.cli("t"), now).secret
    fleet = enroll_many(settings, repo, lambda: now, PLAN)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as client:
        yield ReadOnly(client, {"Authorization": f"Bearer {secret}"}, fleet)


def ids(page: dict[str, Any]) -> list[str]:
    return [d["id"] for d in page["items"]]


@pytest.mark.parametrize(
    ("params", "expect"),
    [
        ({}, [0, 1, 2, 3, 4]),
        ({"group": "plant-1"}, [0, 1]),
        ({"tag": "camera"}, [0, 2, 4]),
        ({"tag": ["camera", "line=a"]}, [0, 2]),
        ({"profile": "rpi4-aarch64"}, [0, 1, 4]),
        ({"profile": "rpi4-aarch64", "group": "plant-2"}, [4]),
        ({"status": "active"}, [0, 1, 2, 3, 4]),
        ({"status": "decommissioned"}, []),
        ({"online": False}, [0, 1, 2, 3, 4]),
        ({"online": True}, []),
        ({"group": "nowhere"}, []),
    ],
)
def test_filters(shared: ReadOnly, params: dict[str, Any], expect: list[int]) -> None:
    page = shared.http.get("/v1/devices", params=params, headers=shared.viewer).json()
    assert ids(page) == [shared.fleet[i] for i in expect]
    assert page["total"] == len(expect)


def test_search_by_id_substring(
    http: httpx.Client, viewer: dict[str, str], fleet: list[str]
) -> None:
    target = fleet[3]
    page = http.get("/v1/devices", params={"search": target[4:10]}, headers=viewer).json()
    assert target in ids(page)
    # LIKE wildcards in the search are literal
    for wildcard in ("%", "_"):
        assert (
            http.get("/v1/devices", params={"search": wildcard}, headers=viewer).json()["total"]
            == 0
        )


def test_pagination_walks_every_device_once(shared: ReadOnly) -> None:
    http, viewer = shared.http, shared.viewer
    seen: list[str] = []
    offset = 0
    while True:
        page = http.get("/v1/devices", params={"limit": 2, "offset": offset}, headers=viewer).json()
        assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == offset
        if not page["items"]:
            break
        seen += ids(page)
        offset += 2
    assert seen == shared.fleet
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
        assert http.get("/v1/devices", params=bad, headers=viewer).status_code == 422


def test_change_group_and_tags(
    http: httpx.Client, operator: dict[str, str], viewer: dict[str, str], fleet: list[str]
) -> None:
    device = fleet[0]
    r = http.patch(f"/v1/devices/{device}", json={"group": "plant-9"}, headers=operator)
    assert r.status_code == 200 and r.json()["group"] == "plant-9"
    assert r.json()["tags"] == ["camera", "line=a"]  # untouched
    r = http.patch(
        f"/v1/devices/{device}",
        json={"add_tags": ["zone=3"], "remove_tags": ["camera"]},
        headers=operator,
    )
    assert r.json()["tags"] == ["line=a", "zone=3"] and r.json()["group"] == "plant-9"
    r = http.patch(f"/v1/devices/{device}", json={"group": None, "tags": []}, headers=operator)
    assert (r.json()["group"], r.json()["tags"]) == (None, [])
    assert http.get(f"/v1/devices/{device}", headers=viewer).json()["group"] is None
    # a viewer cannot
    assert http.patch(f"/v1/devices/{device}", json={}, headers=viewer).status_code == 403
    # audited, with before and after
    audit = http.get("/v1/audit", params={"target": device}, headers=operator).json()["items"]
    updates = [e for e in audit if e["action"] == "device.update"]
    assert len(updates) == 3
    assert updates[-1]["detail"]["before"] == {"group": "plant-1", "tags": ["camera", "line=a"]}


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ({"group": "has space"}, "group 'has space' is not valid"),
        ({"tags": ["ok", "not/ok"]}, "tag 'not/ok' is not valid"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_changes_are_explained(
    http: httpx.Client,
    operator: dict[str, str],
    fleet: list[str],
    body: dict[str, Any],
    expect: str,
) -> None:
    r = http.patch(f"/v1/devices/{fleet[0]}", json=body, headers=operator)
    assert r.status_code == 422 and expect in r.text


def test_decommission(
    http: httpx.Client, operator: dict[str, str], viewer: dict[str, str], fleet: list[str]
) -> None:
    device = fleet[1]
    r = http.post(f"/v1/devices/{device}/decommission", headers=operator)  # no body is fine
    assert r.status_code == 200
    got = r.json()
    assert got["status"] == "decommissioned" and got["decommissioned_at"]
    # repeating is harmless and audited once
    assert http.post(f"/v1/devices/{device}/decommission", headers=operator).status_code == 200
    audit = http.get("/v1/audit", params={"action": "device.decommission"}, headers=operator)
    assert [e["target"] for e in audit.json()["items"]] == [device]
    # it is read-only now, and filtered by status
    r = http.patch(f"/v1/devices/{device}", json={"group": "x"}, headers=operator)
    assert r.status_code == 409 and "decommissioned" in r.json()["detail"]
    page = http.get("/v1/devices", params={"status": "decommissioned"}, headers=viewer).json()
    assert ids(page) == [device]


def test_unknown_devices_are_404_with_a_hint(
    http: httpx.Client, operator: dict[str, str], fleet: list[str]
) -> None:
    for method, path in [
        ("GET", "/v1/devices/dev-000000000000"),
        ("PATCH", "/v1/devices/dev-000000000000"),
        ("POST", "/v1/devices/dev-000000000000/decommission"),
    ]:
        r = http.request(method, path, headers=operator, json={} if method == "PATCH" else None)
        assert r.status_code == 404, (method, r.text)
        assert "GET /v1/devices?search=" in r.json()["detail"]
        assert r.json()["error"] == "DeviceNotFoundError"


def test_broker_credentials_list_only_active_devices(
    settings: FleetSettings, http: httpx.Client, operator: dict[str, str], fleet: list[str]
) -> None:
    from fleet.devices import DeviceRegistry

    http.post(f"/v1/devices/{fleet[0]}/decommission", headers=operator)
    with closing(connect(settings.db_path)) as db:
        creds = DeviceRegistry(db).broker_credentials()
    assert [u for u, _ in creds] == sorted(fleet[1:])
    assert all(h.startswith("$7$") for _, h in creds)
