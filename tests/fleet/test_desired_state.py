"""The desired-state service itself: the version rule as a table, artifact choice per profile
(and the refusal that names the profile and why), all-or-nothing assignment of several
devices, re-signing documents close to expiry, clearing, and the MQTT publisher's refusal when
the broker is down. Releases are the committed bundles uploaded to the real app; the service
runs on the app's real SQLite database."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI

from firmware_profiles import load_profiles
from fleet.audit import Actor
from fleet.bundle_upload import pack
from fleet.desired_outbox import DesiredOutbox, pending_devices
from fleet.desired_state import (
    CurrentRelease,
    DesiredStateService,
    NoFittingArtifactError,
    ReleaseOrderError,
    check_order,
    choose_artifact,
)
from fleet.errors import DeviceDecommissionedError
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.mqtt_publisher import MqttPublisher, PublisherConfig, PublishFailedError
from fleet.registry import ModelRegistry
from fleet.settings import FleetSettings
from fleet.store import connect
from fleet.tuf_repo import TufRepository
from protocol.desired import verify_desired
from protocol.device_auth import public_key_hex
from simulators.broker import MosquittoBroker, free_port

BUNDLES = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier"
MODEL = "pdm-classifier"
ACTOR = Actor.cli("pytest")


@pytest.mark.parametrize(
    ("current", "version", "rollback", "refused"),
    [
        (None, 1, False, None),
        (None, 1, True, "no release to roll back from"),
        (CurrentRelease(MODEL, 1, "assignment"), 2, False, None),
        (CurrentRelease(MODEL, 1, "assignment"), 1, False, "not newer"),
        (CurrentRelease(MODEL, 2, "assignment"), 1, False, "not newer"),
        (CurrentRelease(MODEL, 2, "assignment"), 1, True, None),
        (CurrentRelease(MODEL, 2, "assignment"), 2, True, "nothing to roll back"),
        (CurrentRelease(MODEL, 1, "assignment"), 2, True, "lower than"),
        (CurrentRelease(MODEL, 1, "reported"), 1, False, "not newer"),
        (CurrentRelease("other-model", 1, "reported"), 2, False, "re-provisioning"),
    ],
)
def test_the_version_rule(
    current: CurrentRelease | None, version: int, rollback: bool, refused: str | None
) -> None:
    if refused is None:
        check_order("dev-1", MODEL, version, rollback, current)
    else:
        with pytest.raises(ReleaseOrderError, match=refused):
            check_order("dev-1", MODEL, version, rollback, current)


@pytest.fixture
def released(
    settings: FleetSettings, clock: Callable[[], object], http: httpx.Client, operator: dict
) -> None:
    signers = init_key_dir(settings.keys_dir)
    repo = TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES})
    repo.init(signers[ROOT], clock())  # type: ignore[arg-type]
    for version in ("1", "2"):
        r = http.post(
            "/v1/models",
            content=pack(BUNDLES / version),
            headers={**operator, "Content-Type": "application/gzip"},
        )
        assert r.status_code == 201, r.text


def enroll(http: httpx.Client, admin: dict[str, str], profile: str) -> tuple[str, bytes]:
    token = http.post("/v1/enrollment-tokens", json={"uses": 1}, headers=admin).json()["secret"]
    r = http.post(
        "/v1/enroll",
        json={
            "token": token,
            "public_key": public_key_hex(Ed25519PrivateKey.generate()),
            "profile": profile,
            "facts": {"arch": "aarch64", "ram_mb": 4096, "cores": 4, "agent_version": "0.1.0"},
        },
    )
    assert r.status_code == 201, r.text
    return r.json()["device_id"], r.json()["root_json"].encode()


def test_no_fitting_artifact_names_the_profile_and_why(
    released: None, app: FastAPI, settings: FleetSettings
) -> None:
    with closing(connect(settings.db_path)) as db:
        release = ModelRegistry(db).get(MODEL, 1)
    profiles = load_profiles()
    tiny = replace(profiles["rpi3-armv7l"], name="tiny-mcu", max_model_bytes=1000)
    with pytest.raises(NoFittingArtifactError) as caught:
        choose_artifact("dev-1", "tiny-mcu", {"tiny-mcu": tiny}, release)
    message = str(caught.value)
    assert "'tiny-mcu'" in message and "model.int8.tflite" in message and "> max 1000" in message
    assert "runtime onnxruntime not on tiny-mcu" in message
    with pytest.raises(NoFittingArtifactError, match="does not know"):
        choose_artifact("dev-1", "nope", profiles, release)
    for profile, artifact in [
        ("x86_64-gateway", "model.int8.onnx"),
        ("jetson-aarch64", "model.int8.onnx"),
        ("rpi4-aarch64", "model.int8.tflite"),
        ("rpi3-armv7l", "model.int8.tflite"),
    ]:
        assert choose_artifact("dev-1", profile, profiles, release).file == artifact


def test_several_devices_are_assigned_all_or_none(
    released: None,
    app: FastAPI,
    http: httpx.Client,
    admin: dict[str, str],
    operator: dict[str, str],
    settings: FleetSettings,
    clock: Callable[[], object],
) -> None:
    ids = [enroll(http, admin, "rpi4-aarch64")[0] for _ in range(3)]
    r = http.post(f"/v1/devices/{ids[2]}/decommission", json={}, headers=operator)
    assert r.status_code == 200
    with closing(connect(settings.db_path)) as db:
        service = DesiredStateService(db, settings)
        release = ModelRegistry(db).get(MODEL, 1)
        with pytest.raises(DeviceDecommissionedError, match="1 of 3 devices refused"):
            service.assign(ids, release, False, "ro-1", ACTOR, clock())  # type: ignore[arg-type]
        assert db.execute("SELECT count(*) FROM assignments").fetchone()[0] == 0
        assert pending_devices(db) == []
        result = service.assign(ids[:2], release, False, "ro-1", ACTOR, clock())  # type: ignore[arg-type]
        assert [a.serial for a in result.assignments] == [1, 1]
        assert {a.rollout_id for a in result.assignments} == {"ro-1"}
        # no outbox given: stored and queued, not published
        assert result.published == () and set(result.pending) == set(ids[:2])
        assert sorted(pending_devices(db)) == sorted(ids[:2])


def test_documents_close_to_expiry_are_re_signed(
    released: None,
    app: FastAPI,
    http: httpx.Client,
    admin: dict[str, str],
    settings: FleetSettings,
    clock: Callable[[], object],
) -> None:
    device, root = enroll(http, admin, "x86_64-gateway")
    expiry = settings.desired.expiry
    with closing(connect(settings.db_path)) as db:
        service = DesiredStateService(db, settings)
        release = ModelRegistry(db).get(MODEL, 2)
        service.assign([device], release, False, None, ACTOR, clock())  # type: ignore[arg-type]
        clock.advance(expiry / 2)  # type: ignore[attr-defined]
        assert service.refresh_expiring(clock()) == []  # type: ignore[arg-type]
        clock.advance(expiry / 4)  # type: ignore[attr-defined]
        assert service.refresh_expiring(clock()) == [device]  # type: ignore[arg-type]
        fresh = service.current(device)
        assert fresh is not None and fresh.serial == 2 and fresh.version == 2
        doc = verify_desired(fresh.document.encode(), root, clock(), last_serial=1)  # type: ignore[arg-type]
        assert doc.expires == (clock() + expiry).replace(microsecond=0)  # type: ignore[operator]
        assert service.refresh_expiring(clock()) == []  # type: ignore[arg-type]
        # the refresh is not an operator action: the audit log has the one assignment only
        actions = [r[0] for r in db.execute("SELECT action FROM audit WHERE target = ?", [device])]
        assert actions.count("release.assign") == 1


def test_the_publisher_refuses_at_once_when_the_broker_is_down(tmp_path: Path) -> None:
    port = free_port()
    config = PublisherConfig("127.0.0.1", port, "fleet-test-desired", timeout_s=2.0)
    with MqttPublisher(config) as publisher:
        started = time.monotonic()
        with pytest.raises(PublishFailedError, match=f"127.0.0.1:{port} is not reachable"):
            publisher.publish("edgefleet/v1/devices/d1/desired", b"{}")
        assert time.monotonic() - started < 3
        with MosquittoBroker(tmp_path / "mqtt", port=port):
            assert publisher.wait_connected(15)
            publisher.publish("edgefleet/v1/devices/d1/desired", b"{}")  # acknowledged


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_outbox_publishes_only_the_newest_payload(
    released: None,
    app: FastAPI,
    http: httpx.Client,
    admin: dict[str, str],
    settings: FleetSettings,
    clock: Callable[[], object],
    broker: MosquittoBroker,
    protocol: str,
) -> None:
    device, _ = enroll(http, admin, "x86_64-gateway")
    config = PublisherConfig(broker.host, broker.port, "fleet-test-outbox", protocol=protocol)  # type: ignore[arg-type]
    with MqttPublisher(config) as publisher, closing(connect(settings.db_path)) as db:
        assert publisher.wait_connected(10)
        outbox = DesiredOutbox(app.state.fleet.store, publisher)
        service = DesiredStateService(db, settings)  # queue only
        registry = ModelRegistry(db)
        service.assign([device], registry.get(MODEL, 1), False, None, ACTOR, clock())  # type: ignore[arg-type]
        service.assign([device], registry.get(MODEL, 2), False, None, ACTOR, clock())  # type: ignore[arg-type]
        assert pending_devices(db) == [device]  # one row: the newest document
        assert outbox.flush(clock()).published == (device,)  # type: ignore[arg-type]
        rows = db.execute(
            "SELECT serial, published_at IS NOT NULL FROM assignments ORDER BY serial"
        ).fetchall()
        assert rows == [(1, 0), (2, 1)]  # serial 1 was superseded, never published
        assert pending_devices(db) == []
        # a cleared document is queued and published the same way
        assert service.clear(device, clock()).pending == (device,)  # type: ignore[arg-type]
        assert outbox.flush(clock(), [device]).published == (device,)  # type: ignore[arg-type]
