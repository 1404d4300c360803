"""Assigning releases end to end: the real app over HTTP, a real Mosquitto, devices enrolled
through the API with their own Ed25519 keys, the committed bundles uploaded as releases.

A subscriber on the device's desired topic receives the retained document, which verifies
against the root the device got at enrollment and names the artifact its profile selects;
refusals (same version, unknown release, bad rollback, decommissioned) leave nothing behind; a
broker outage delays publishing but loses nothing; decommissioning clears the retained document;
the update history shows ingested ``update`` reports; the CLI drives the same endpoints."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion

from fleet.bundle_upload import pack
from fleet.cli import main as fleet_main
from fleet.desired_state import retry_job
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.settings import FleetSettings, load_settings
from fleet.store import connect
from fleet.tuf_repo import TufRepository
from protocol.bodies import ModelRef, UpdateBody
from protocol.desired import DesiredDocument, verify_desired
from protocol.device_auth import public_key_hex
from protocol.messages import Envelope, encode
from protocol.topics import TopicKind, desired_topic, state_topic, update_topic
from simulators.broker import MosquittoBroker

BUNDLES = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier"
MODEL = "pdm-classifier"


@dataclass
class Enrolled:
    id: str
    profile: str
    root: bytes


@pytest.fixture
def settings(tmp_path: Path, broker: MosquittoBroker) -> FleetSettings:
    return load_settings(
        data_dir=tmp_path / "data",
        public_base_url="http://fleet.test:8080",
        mqtt={"host": broker.host, "port": broker.port, "client_id": "fleet-test"},
        desired={"publish_timeout": "3s", "retry_every": "1h"},
        ingest={"enabled": True, "shared": False, "batch_wait_ms": 0},
    )


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


@pytest.fixture
def enroll(released: None, http: httpx.Client, admin: dict[str, str]) -> Callable[..., Enrolled]:
    def make(profile: str = "x86_64-gateway", group: str | None = None) -> Enrolled:
        spec: dict[str, object] = {"uses": 1}
        if group:
            spec["group"] = group
        token = http.post("/v1/enrollment-tokens", json=spec, headers=admin).json()["secret"]
        arch = "x86_64" if profile.startswith("x86") else "aarch64"
        r = http.post(
            "/v1/enroll",
            json={
                "token": token,
                "public_key": public_key_hex(Ed25519PrivateKey.generate()),
                "profile": profile,
                "facts": {"arch": arch, "ram_mb": 4096, "cores": 4, "agent_version": "0.1.0"},
            },
        )
        assert r.status_code == 201, r.text
        got = r.json()
        return Enrolled(got["device_id"], profile, got["root_json"].encode())

    return make


def retained(broker: MosquittoBroker, topic: str, wait: float = 3.0) -> bytes | None:
    """The retained message a new subscriber gets on ``topic`` (None: nothing retained)."""
    got: list[bytes] = []
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            got.append(bytes(msg.payload))
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        done.wait(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1] if got else None


def desired_of(broker: MosquittoBroker, device: Enrolled, now: object) -> DesiredDocument:
    wire = retained(broker, desired_topic(device.id))
    assert wire is not None, f"no retained desired document for {device.id}"
    return verify_desired(wire, device.root, now, device_id=device.id)  # type: ignore[arg-type]


def assign(
    http: httpx.Client, headers: dict[str, str], device: str, version: int, **extra: object
) -> httpx.Response:
    return http.post(
        f"/v1/devices/{device}/assignment",
        json={"model": MODEL, "version": version, **extra},
        headers=headers,
    )


def test_each_profile_gets_its_artifact_signed_and_retained(
    enroll: Callable[..., Enrolled],
    http: httpx.Client,
    operator: dict[str, str],
    viewer: dict[str, str],
    broker: MosquittoBroker,
    clock: Callable[[], object],
) -> None:
    gateway, pi = enroll("x86_64-gateway"), enroll("rpi4-aarch64")
    for device, artifact in ((gateway, "model.int8.onnx"), (pi, "model.int8.tflite")):
        r = assign(http, operator, device.id, 1)
        assert r.status_code == 201, r.text
        result = r.json()
        assert result["published"] == [device.id] and result["pending"] == []
        doc = desired_of(broker, device, clock())
        assert (doc.model, doc.model_version, doc.rollback, doc.serial) == (MODEL, 1, False, 1)
        assert doc.target_path == f"{MODEL}/1/{artifact}"
        assert doc.expires - doc.issued_at == timedelta(days=30)
        current = http.get(f"/v1/devices/{device.id}/assignment", headers=viewer).json()
        assert current["artifact"] == artifact and current["published_at"]
        assert current["document"].encode() == retained(broker, desired_topic(device.id))
    audit = http.get("/v1/audit", params={"action": "release.assign"}, headers=operator).json()
    assert {e["target"] for e in audit["items"]} == {gateway.id, pi.id}
    # a viewer may read but not assign
    assert assign(http, viewer, gateway.id, 2).status_code == 403


def test_a_group_gets_the_release_and_other_devices_do_not(
    enroll: Callable[..., Enrolled],
    http: httpx.Client,
    operator: dict[str, str],
    broker: MosquittoBroker,
    clock: Callable[[], object],
) -> None:
    members = [enroll("x86_64-gateway", "line-1"), enroll("rpi4-aarch64", "line-1")]
    outsider = enroll("x86_64-gateway", "line-2")
    r = http.post(
        "/v1/groups/line-1/assignment", json={"model": MODEL, "version": 2}, headers=operator
    )
    assert r.status_code == 201, r.text
    assert sorted(r.json()["published"]) == sorted(d.id for d in members)
    for device in members:
        assert desired_of(broker, device, clock()).model_version == 2
    assert retained(broker, desired_topic(outsider.id), wait=0.5) is None
    r = http.post(
        "/v1/groups/nobody/assignment", json={"model": MODEL, "version": 2}, headers=operator
    )
    assert r.status_code == 404 and "no active devices" in r.json()["detail"]


def test_versions_only_grow_unless_a_signed_rollback(
    enroll: Callable[..., Enrolled],
    http: httpx.Client,
    operator: dict[str, str],
    viewer: dict[str, str],
    broker: MosquittoBroker,
    clock: Callable[[], object],
) -> None:
    device = enroll("rpi4-aarch64")
    assert assign(http, operator, device.id, 1, rollback=True).status_code == 409  # from nothing
    assert assign(http, operator, device.id, 1).status_code == 201
    again = assign(http, operator, device.id, 1)
    assert again.status_code == 409 and "not newer" in again.json()["detail"]
    unknown = assign(http, operator, device.id, 9)
    assert unknown.status_code == 404 and "latest is v2" in unknown.json()["detail"]
    assert assign(http, operator, device.id, 2).status_code == 201
    up = assign(http, operator, device.id, 2, rollback=True)
    assert up.status_code == 409, up.text
    down = assign(http, operator, device.id, 1)
    assert down.status_code == 409 and "rollback" in down.json()["detail"]
    r = assign(http, operator, device.id, 1, rollback=True)
    assert r.status_code == 201, r.text
    doc = desired_of(broker, device, clock())
    assert (doc.model_version, doc.rollback, doc.serial) == (1, True, 3)
    assert doc.target_path == f"{MODEL}/1/model.int8.tflite"
    # the refusals stored nothing: serials 1, 2, 3 only
    audit = http.get("/v1/audit", params={"target": device.id}, headers=operator).json()
    actions = [e["action"] for e in audit["items"] if e["action"].startswith("release.")]
    assert actions == ["release.rollback", "release.assign", "release.assign"]


def test_a_broker_outage_delays_publishing_and_loses_nothing(
    app: FastAPI,
    enroll: Callable[..., Enrolled],
    http: httpx.Client,
    operator: dict[str, str],
    viewer: dict[str, str],
    broker: MosquittoBroker,
    clock: Callable[[], object],
) -> None:
    device = enroll("x86_64-gateway")
    broker.stop()
    r = assign(http, operator, device.id, 1)
    assert r.status_code == 201, r.text
    result = r.json()
    assert result["published"] == [] and result["pending"] == [device.id]
    assert "not reachable" in result["publish_error"]
    stored = http.get(f"/v1/devices/{device.id}/assignment", headers=viewer).json()
    assert stored["serial"] == 1 and stored["published_at"] is None
    # the job while the broker is still down keeps it queued
    ctx = app.state.fleet
    job = lambda: retry_job(ctx.store, ctx.settings, app.state.desired_outbox, ctx.clock)  # noqa: E731
    assert job().pending == (device.id,)
    broker.start()
    assert app.state.desired_publisher.wait_connected(15)
    assert job().published == (device.id,)
    assert desired_of(broker, device, clock()).serial == 1
    stored = http.get(f"/v1/devices/{device.id}/assignment", headers=viewer).json()
    assert stored["published_at"] is not None
    assert job().published == ()  # nothing left to publish


def test_decommissioning_clears_the_retained_document(
    enroll: Callable[..., Enrolled],
    http: httpx.Client,
    operator: dict[str, str],
    broker: MosquittoBroker,
) -> None:
    device = enroll("x86_64-gateway")
    assert assign(http, operator, device.id, 1).status_code == 201
    assert retained(broker, desired_topic(device.id)) is not None
    r = http.post(f"/v1/devices/{device.id}/decommission", json={}, headers=operator)
    assert r.status_code == 200, r.text
    assert retained(broker, desired_topic(device.id), wait=1.0) is None
    refused = assign(http, operator, device.id, 2)
    assert refused.status_code == 409 and "decommissioned" in refused.json()["detail"]


def _publish_reports(broker: MosquittoBroker, device: str, envelopes: list[Envelope]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for env in envelopes:
            topic = state_topic(device) if env.kind is TopicKind.STATE else update_topic(device)
            client.publish(topic, encode(env), qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_update_history_shows_ingested_transitions_and_current_state(
    app: FastAPI,
    settings: FleetSettings,
    enroll: Callable[..., Enrolled],
    http: httpx.Client,
    operator: dict[str, str],
    viewer: dict[str, str],
    broker: MosquittoBroker,
) -> None:
    device = enroll("x86_64-gateway")
    assert assign(http, operator, device.id, 1).status_code == 201
    assert app.state.ingester.wait_connected(10)
    ref = ModelRef(MODEL, 1)
    steps = [("idle", "downloading"), ("downloading", "verifying"), ("verifying", "installing")]
    reports = [
        Envelope(
            TopicKind.UPDATE,
            device.id,
            seq,
            100.0 + seq,
            UpdateBody(ref, False, a, b, elapsed_s={a: 0.5}),
        )
        for seq, (a, b) in enumerate(steps, start=1)
    ]
    _publish_reports(broker, device.id, reports)
    deadline = time.monotonic() + 10
    body: dict = {}
    while time.monotonic() < deadline:
        body = http.get(f"/v1/devices/{device.id}/updates", headers=viewer).json()
        if body["total"] == 3:
            break
        time.sleep(0.1)
    assert [(t["from_state"], t["to_state"]) for t in body["history"]] == steps[::-1]
    assert body["history"][0]["elapsed_s"] == {"verifying": 0.5}
    current = body["current"]
    assert current["desired"]["version"] == 1 and current["desired"]["published"]
    assert current["last_transition"]["to_state"] == "installing"
    assert current["running_model"] is None and not current["in_sync"]


def test_cli_assigns_and_prints_the_history(
    live: str,
    settings: FleetSettings,
    enroll: Callable[..., Enrolled],
    operator: dict[str, str],
    viewer: dict[str, str],
    broker: MosquittoBroker,
    capsys: pytest.CaptureFixture[str],
    clock: Callable[[], object],
) -> None:
    device = enroll("rpi4-aarch64")
    grouped = enroll("x86_64-gateway", "yard")
    op_token = operator["Authorization"].removeprefix("Bearer ")
    view_token = viewer["Authorization"].removeprefix("Bearer ")
    base = ["--server", live, "--token", op_token]
    assert fleet_main(["assign", device.id, "--model", MODEL, "--version", "2", *base]) == 0
    out = capsys.readouterr().out
    assert device.id in out and "model.int8.tflite" in out and "published" in out
    assert fleet_main(["assign", device.id, "--model", MODEL, "--version", "1", *base]) == 2
    assert "rollback" in capsys.readouterr().err
    assert (
        fleet_main(["assign", device.id, "--model", MODEL, "--version", "1", "--rollback", *base])
        == 0
    )
    assert desired_of(broker, device, clock()).rollback
    assert fleet_main(["assign", "--group", "yard", "--model", MODEL, "--version", "1", *base]) == 0
    assert grouped.id in capsys.readouterr().out
    with closing(connect(settings.db_path)) as db:
        assert db.execute("SELECT count(*) FROM desired_outbox").fetchone()[0] == 0
    view = ["--server", live, "--token", view_token]
    assert fleet_main(["device", "updates", device.id, *view]) == 0
    out = capsys.readouterr().out
    assert "desired" in out and "v1" in out and "rollback" in out
