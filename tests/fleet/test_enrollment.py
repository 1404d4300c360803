"""Enrollment over real HTTP (uvicorn on a free port, httpx): tokens made by an admin, devices
trading them for an identity, and the refusals the security issue asks for (replayed, expired,
revoked, forged tokens; over-use under concurrency; decommissioned devices)."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from datetime import timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tuf.api.metadata import Metadata, Root

from fleet.mqtt_credentials import verify_mosquitto_hash
from fleet.settings import FleetSettings
from fleet.tuf_repo import TufRepository
from protocol.device_auth import public_key_hex, sign_request

FACTS = {"arch": "aarch64", "ram_mb": 2048, "cores": 4, "agent_version": "0.1.0"}


def new_token(http: httpx.Client, admin: dict[str, str], **body: Any) -> dict[str, Any]:
    r = http.post("/v1/enrollment-tokens", json=body, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()


def enroll_body(token: str, key: Ed25519PrivateKey | None = None, **extra: Any) -> dict[str, Any]:
    key = key or Ed25519PrivateKey.generate()
    return {
        "token": token,
        "public_key": public_key_hex(key),
        "profile": "rpi4-aarch64",
        "facts": FACTS,
        **extra,
    }


def signed(key: Ed25519PrivateKey, device_id: str, path: str, now: float) -> dict[str, str]:
    return {"Authorization": sign_request(key, device_id, "GET", path, now)}


def stored(settings: FleetSettings) -> tuple[list[Any], ...]:
    """Devices, enrollment tokens and the audit log as stored: a refused enrollment changes
    none of them."""
    with closing(sqlite3.connect(settings.db_path)) as db:
        return tuple(
            db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in ("devices", "enrollment_tokens", "audit")
        )


@pytest.fixture
def ready(tuf_repo: TufRepository, http: httpx.Client) -> httpx.Client:
    """The live app with an initialised TUF repository."""
    return http


def test_enroll_end_to_end(
    ready: httpx.Client,
    admin: dict[str, str],
    tuf_repo: TufRepository,
    settings: FleetSettings,
    clock: Any,
) -> None:
    token = new_token(ready, admin, uses=1, expires_in="24h", group="plant-7", tags=["line=a"])
    assert token["secret"].startswith("efe_")
    key = Ed25519PrivateKey.generate()
    r = ready.post("/v1/enroll", json=enroll_body(token["secret"], key))
    assert r.status_code == 201, r.text
    got = r.json()
    device_id = got["device_id"]
    assert device_id.startswith("dev-") and len(device_id) == 16
    assert got["mqtt_username"] == device_id
    assert (got["broker_host"], got["broker_port"], got["broker_tls"]) == ("127.0.0.1", 1883, False)
    assert got["fleet_url"] == "http://fleet.test:8080"
    assert (got["group"], got["tags"]) == ("plant-7", ["line=a"])
    # the root to pin is the repository's, byte for byte, and a real TUF root
    assert got["root_json"].encode() == tuf_repo.root_bytes()
    assert isinstance(Metadata.from_bytes(got["root_json"].encode()).signed, Root)

    # the registry has it, with the token's group and tags, and never the password
    device = ready.get(f"/v1/devices/{device_id}", headers=admin).json()
    assert device["status"] == "active" and device["group"] == "plant-7"
    assert device["tags"] == ["line=a"] and device["facts"]["arch"] == "aarch64"
    assert device["public_key"] == public_key_hex(key)
    assert got["mqtt_password"] not in str(device)
    with sqlite3.connect(settings.db_path) as conn:
        (stored,) = conn.execute(
            "SELECT mqtt_password_hash FROM devices WHERE id = ?", [device_id]
        ).fetchone()
    assert stored.startswith("$7$") and verify_mosquitto_hash(got["mqtt_password"], stored)
    assert not verify_mosquitto_hash(got["mqtt_password"] + "x", stored)

    # the device can sign requests with its key
    now = clock().timestamp()
    own = ready.get("/v1/device", headers=signed(key, device_id, "/v1/device", now))
    assert own.status_code == 200, own.text
    assert own.json()["id"] == device_id

    # audited: the enrollment token created by the admin, the device enrolled with it
    audit = ready.get("/v1/audit", params={"action": "device.*"}, headers=admin).json()
    assert [(e["action"], e["target"], e["actor"]) for e in audit["items"]] == [
        ("device.enroll", device_id, f"enrollment-token:{token['id']}")
    ]


def test_a_single_use_token_cannot_be_replayed(
    ready: httpx.Client, admin: dict[str, str], settings: FleetSettings
) -> None:
    token = new_token(ready, admin)
    assert ready.post("/v1/enroll", json=enroll_body(token["secret"])).status_code == 201
    before = stored(settings)
    r = ready.post("/v1/enroll", json=enroll_body(token["secret"]))
    assert r.status_code == 401
    assert "used up" in r.json()["detail"] and "fleet enroll-token create" in r.json()["detail"]
    assert stored(settings) == before
    left = ready.get(f"/v1/enrollment-tokens/{token['id']}", headers=admin).json()
    assert left["uses_left"] == 0


def test_an_expired_token_is_refused(
    ready: httpx.Client, admin: dict[str, str], clock: Any, settings: FleetSettings
) -> None:
    token = new_token(ready, admin, uses=5, expires_in="10m")
    clock.advance(timedelta(minutes=9, seconds=59))
    assert ready.post("/v1/enroll", json=enroll_body(token["secret"])).status_code == 201
    clock.advance(timedelta(seconds=1))
    before = stored(settings)
    r = ready.post("/v1/enroll", json=enroll_body(token["secret"]))
    assert r.status_code == 401
    assert "expired at" in r.json()["detail"]
    assert stored(settings) == before  # no device, and the token keeps its 4 uses


def test_a_revoked_token_is_refused(ready: httpx.Client, admin: dict[str, str]) -> None:
    token = new_token(ready, admin, uses=3)
    r = ready.delete(f"/v1/enrollment-tokens/{token['id']}", headers=admin)
    assert r.status_code == 200 and r.json()["revoked_at"]
    r = ready.post("/v1/enroll", json=enroll_body(token["secret"]))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    usable = ready.get("/v1/enrollment-tokens", params={"usable": True}, headers=admin).json()
    assert token["id"] not in {t["id"] for t in usable}


@pytest.mark.parametrize(
    "secret", ["efe_" + "A" * 43, "efo_" + "A" * 43, "", "x" * 256], ids=str.__len__
)
def test_forged_tokens_are_refused(
    ready: httpx.Client, admin: dict[str, str], secret: str, settings: FleetSettings
) -> None:
    real = new_token(ready, admin)
    before = stored(settings)
    r = ready.post("/v1/enroll", json=enroll_body(secret))
    assert r.status_code in (401, 422), r.text
    if r.status_code == 401:
        assert "not valid" in r.json()["detail"]
    # a near miss of a real token is no better
    r = ready.post("/v1/enroll", json=enroll_body(real["secret"][:-1] + "_"))
    assert r.status_code == 401
    assert stored(settings) == before


def test_concurrent_enrollments_never_exceed_the_uses(
    ready: httpx.Client, admin: dict[str, str], live: str
) -> None:
    uses, attempts = 3, 12
    token = new_token(ready, admin, uses=uses)
    barrier = threading.Barrier(attempts)
    codes: list[int] = []
    lock = threading.Lock()

    def attempt() -> None:
        body = enroll_body(token["secret"])
        with httpx.Client(base_url=live, timeout=30) as client:
            barrier.wait()
            code = client.post("/v1/enroll", json=body).status_code
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=attempt) for _ in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [201] * uses + [401] * (attempts - uses)
    devices = ready.get("/v1/devices", headers=admin).json()
    assert devices["total"] == uses
    assert {d["enrollment_token_id"] for d in devices["items"]} == {token["id"]}
    assert ready.get(f"/v1/enrollment-tokens/{token['id']}", headers=admin).json()["uses_left"] == 0


def test_without_a_tuf_repository_enrollment_is_503_and_uses_nothing(
    http: httpx.Client, admin: dict[str, str]
) -> None:
    token = new_token(http, admin)
    r = http.post("/v1/enroll", json=enroll_body(token["secret"]))
    assert r.status_code == 503
    assert "fleet keys init" in r.json()["detail"]
    left = http.get(f"/v1/enrollment-tokens/{token['id']}", headers=admin).json()["uses_left"]
    assert left == 1


def test_pem_public_keys_are_accepted(ready: httpx.Client, admin: dict[str, str]) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    body = enroll_body(new_token(ready, admin)["secret"], public_key=pem)
    r = ready.post("/v1/enroll", json=body)
    assert r.status_code == 201, r.text
    device = ready.get(f"/v1/devices/{r.json()['device_id']}", headers=admin).json()
    assert device["public_key"] == public_key_hex(key)


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"public_key": "00" * 31}, "Ed25519 key as 64 hex digits"),
        ({"public_key": "zz" * 32}, "Ed25519 key as 64 hex digits"),
        ({"public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}, "PEM"),
        ({"profile": "Not A Profile"}, "profile"),
        ({"facts": {**FACTS, "arch": "sparc"}}, "arch 'sparc' is not supported"),
        ({"facts": {"arch": "aarch64"}}, "ram_mb"),
        ({"facts": {**FACTS, "blob": "x" * 5000}}, "4096 bytes"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_enrollment_requests_say_what_is_wrong(
    ready: httpx.Client, admin: dict[str, str], change: dict[str, Any], expect: str
) -> None:
    token = new_token(ready, admin)
    r = ready.post("/v1/enroll", json={**enroll_body(token["secret"]), **change})
    assert r.status_code == 422, r.text
    assert expect in r.text
    # nothing was used up
    assert ready.get(f"/v1/enrollment-tokens/{token['id']}", headers=admin).json()["uses_left"] == 1


def test_an_rsa_pem_key_is_refused_by_name(ready: httpx.Client, admin: dict[str, str]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    body = enroll_body(new_token(ready, admin)["secret"], public_key=pem)
    r = ready.post("/v1/enroll", json=body)
    assert r.status_code == 422 and "not Ed25519" in r.json()["detail"]


def test_an_active_key_cannot_enroll_twice(ready: httpx.Client, admin: dict[str, str]) -> None:
    key = Ed25519PrivateKey.generate()
    token = new_token(ready, admin, uses=2)
    first = ready.post("/v1/enroll", json=enroll_body(token["secret"], key)).json()
    r = ready.post("/v1/enroll", json=enroll_body(token["secret"], key))
    assert r.status_code == 409 and first["device_id"] in r.json()["detail"]
    assert ready.get(f"/v1/enrollment-tokens/{token['id']}", headers=admin).json()["uses_left"] == 1
    # once decommissioned, the hardware may enroll again (as a new device)
    ready.post(f"/v1/devices/{first['device_id']}/decommission", headers=admin)
    again = ready.post("/v1/enroll", json=enroll_body(token["secret"], key))
    assert again.status_code == 201 and again.json()["device_id"] != first["device_id"]


def test_decommissioning_revokes_credentials_at_once(
    ready: httpx.Client, admin: dict[str, str], operator: dict[str, str], settings: Any, clock: Any
) -> None:
    key = Ed25519PrivateKey.generate()
    got = ready.post("/v1/enroll", json=enroll_body(new_token(ready, admin)["secret"], key)).json()
    device_id = got["device_id"]
    now = clock().timestamp()
    assert ready.get("/v1/device", headers=signed(key, device_id, "/v1/device", now)).is_success
    r = ready.post(
        f"/v1/devices/{device_id}/decommission", json={"reason": "stolen"}, headers=operator
    )
    assert r.status_code == 200 and r.json()["status"] == "decommissioned"
    # the very next request is refused, and the broker password hash is gone
    r = ready.get("/v1/device", headers=signed(key, device_id, "/v1/device", now))
    assert r.status_code == 403 and "decommissioned" in r.json()["detail"]
    with sqlite3.connect(settings.db_path) as conn:
        row = conn.execute(
            "SELECT mqtt_password_hash FROM devices WHERE id = ?", [device_id]
        ).fetchone()
    assert row == (None,)
    audit = ready.get("/v1/audit", params={"target": device_id}, headers=admin).json()
    assert audit["items"][0]["action"] == "device.decommission"
    assert audit["items"][0]["detail"] == {"reason": "stolen"}


def test_device_requests_must_be_signed_for_this_path_and_time(
    ready: httpx.Client, admin: dict[str, str], clock: Any
) -> None:
    key = Ed25519PrivateKey.generate()
    got = ready.post("/v1/enroll", json=enroll_body(new_token(ready, admin)["secret"], key)).json()
    device_id, now = got["device_id"], clock().timestamp()
    cases = {
        "unsigned": {},
        "operator token": admin,
        "other path": signed(key, device_id, "/v1/devices", now),
        "stale": signed(key, device_id, "/v1/device", now - 301),
        "other key": signed(Ed25519PrivateKey.generate(), device_id, "/v1/device", now),
        "unknown device": signed(key, "dev-000000000000", "/v1/device", now),
    }
    for name, headers in cases.items():
        r = ready.get("/v1/device", headers=headers)
        assert r.status_code == 401, f"{name}: {r.status_code} {r.text}"
        assert r.headers["www-authenticate"] == "Edgefleet-Ed25519", name
    # the query string is part of what is signed
    r = ready.get("/v1/device?x=1", headers=signed(key, device_id, "/v1/device?x=1", now))
    assert r.status_code == 200
    r = ready.get("/v1/device?x=2", headers=signed(key, device_id, "/v1/device?x=1", now))
    assert r.status_code == 401


def test_enrollment_tokens_are_admin_only_and_listed_without_secrets(
    ready: httpx.Client, admin: dict[str, str], operator: dict[str, str]
) -> None:
    assert ready.post("/v1/enrollment-tokens", json={}, headers=operator).status_code == 403
    token = new_token(ready, admin, uses=2, note="rack 4", tags=["b", "a", "a"])
    assert token["tags"] == ["a", "b"]
    listed = ready.get("/v1/enrollment-tokens", headers=admin).json()
    assert [t["id"] for t in listed] == [token["id"]]
    assert "secret" not in listed[0] and token["secret"] not in str(listed)
    for bad, expect in [
        ({"uses": 0}, "greater than or equal to 1"),
        ({"expires_in": "forever"}, "not a duration"),
        ({"expires_in": "30s"}, "must expire between"),
        ({"group": "no spaces"}, "group 'no spaces' is not valid"),
        ({"tags": ["ok", "not ok"]}, "tag 'not ok' is not valid"),
    ]:
        r = ready.post("/v1/enrollment-tokens", json=bad, headers=admin)
        assert r.status_code == 422 and expect in r.text, (bad, r.text)
