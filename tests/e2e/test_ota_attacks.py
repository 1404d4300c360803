"""Attacks on signed OTA updates through the real stack: each is refused with its reason, the
device keeps serving its working model, and the fleet's update history (ingested from the
device's ``update`` topic) shows the refusal.

Through the fleet's real serving and signing:

* the stored artifact on the fleet's disk has a flipped byte, or more bytes than its signed
  length (the fleet serves what is on disk: endless data);
* a desired document signed with the stolen targets key for a release the fleet never assigned
  the device: the fleet does not serve its files to that device;
* a desired document signed by an unknown key, or by the device's own key, published retained
  on the device's desired topic by an attacker client;
* a replayed older desired document (the retained payload captured by a subscriber, re-published
  after a newer one was accepted);
* a downgrade without a signed rollback, and an artifact for another profile, both signed with
  the fleet's real targets key (the fleet API itself refuses to issue them);
* expired timestamp metadata served by the fleet (freeze);
* a desired document signed by a targets key revoked in a newer root (``fleet keys rotate``).

Engine-level tests in ``tests/agent/test_updater.py`` cover the rest against a stdlib server
(mix-and-match, metadata rollback, another device's document, an expired document, another
model, an unpublished target).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from paho.mqtt.enums import CallbackAPIVersion
from securesystemslib.signer import CryptoSigner, Signer

from fleet.keys import load_key, load_online_keys
from fleet.tuf_repo import Expiries, TufRepository
from protocol.desired import DesiredDocument, sign_desired
from protocol.topics import desired_topic

MODEL = "pdm-classifier"
OTHER_PROFILE = "rpi4-aarch64"
_serials = itertools.count(1_000_000)  # above anything the fleet issues in these tests


def publish_retained(broker: Any, topic: str, payload: bytes) -> None:
    """An attacker (any client the broker lets publish there) puts ``payload`` on ``topic``."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def retained(broker: Any, topic: str, wait: float = 5.0) -> bytes:
    """The retained message a new subscriber gets on ``topic``."""
    got: list[bytes] = []
    done = threading.Event()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            got.append(bytes(msg.payload))
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert done.wait(wait), f"nothing retained on {topic}"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1]


def forge(
    device: str,
    version: int,
    signer: Signer,
    *,
    file: str = "model.int8.onnx",
    rollback: bool = False,
    serial: int | None = None,
) -> bytes:
    now = datetime.now(UTC)
    doc = DesiredDocument(
        device_id=device,
        serial=next(_serials) if serial is None else serial,
        issued_at=now - timedelta(minutes=1),
        expires=now + timedelta(hours=1),
        model=MODEL,
        model_version=version,
        target_path=f"{MODEL}/{version}/{file}",
        rollback=rollback,
    )
    return sign_desired(doc, signer)


def fleet_targets_key(stack: Any) -> CryptoSigner:
    return load_online_keys(stack.settings.keys_dir)["targets"]


def assert_refused(
    stack: Any, device: Any, seen: int, reason: str, serving: int, kit: Any
) -> dict[str, Any]:
    """The fleet saw the update end in ``failed`` with ``reason``; the device serves
    ``serving`` still (active slot and live predictions)."""
    end = stack.wait_new_end(device.id, seen)
    assert end["to_state"] == "failed", end
    assert end["reason"].split(":")[0] == reason, end
    assert device.alive(), device.log()
    assert device.active_version() == serving
    assert device.predict(kit.traffic_rows(4)).model_version == serving
    return end


@pytest.fixture(scope="module")
def other_profile_release(stack: Any, kit: Any, tmp_path_factory: pytest.TempPathFactory) -> int:
    """v5: v2's artifacts built for another profile only."""
    bundle = kit.write_bundle(tmp_path_factory.mktemp("b5") / "b5", 5)
    doc = json.loads((bundle / "bundle.json").read_text())
    for a in doc["artifacts"]:
        a["profiles"] = [OTHER_PROFILE]
    (bundle / "bundle.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    stack.upload(bundle)
    return 5


@pytest.fixture(scope="module")
def victim(stack: Any, kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One device on v1 shared by the attacks that leave it there."""
    with kit.device_factory(tmp_path_factory.mktemp("victim")) as make:
        yield make(stack)


# --- the fleet's real serving -----------------------------------------------------------------


@pytest.mark.parametrize("tamper", ["flipped_byte", "extra_bytes"])
def test_tampered_artifact_on_the_fleets_disk_is_refused(
    stack: Any, devices: Callable[..., Any], kit: Any, tamper: str
) -> None:
    # the fleet serves a release's files only to devices it assigned the release to, so the
    # operator's own assignment is what fetches the tampered file here
    victim = devices(stack)
    repo = TufRepository(stack.settings.tuf_dir, {})
    info = repo.get_target(f"{MODEL}/2/model.int8.onnx")
    assert info is not None
    stored = repo.target_file(f"{MODEL}/2/{info.hashes['sha256']}.model.int8.onnx")
    assert stored is not None
    original = stored.read_bytes()
    bad = bytearray(original)
    if tamper == "flipped_byte":
        bad[len(bad) // 2] ^= 0x01
    else:
        bad += b"\0" * 4096  # the server sends more than the signed length
    seen = stack.seen(victim.id)
    stored.write_bytes(bytes(bad))
    try:
        stack.assign(victim.id, 2)
        end = assert_refused(stack, victim, seen, "verification", 1, kit)
    finally:
        stored.write_bytes(original)
    assert end["from_state"] == "downloading", end


def test_release_never_assigned_to_the_device_is_not_served(
    stack: Any, victim: Any, kit: Any
) -> None:
    seen = stack.seen(victim.id)
    publish_retained(
        stack.broker, desired_topic(victim.id), forge(victim.id, 2, fleet_targets_key(stack))
    )
    # the device's TUF client maps the fleet's 403 to a fatal ReleaseAuthError
    end = assert_refused(stack, victim, seen, "verification", 1, kit)
    assert end["from_state"] == "downloading" and "HTTP 403" in end["reason"], end


def test_document_signed_by_an_unknown_key_is_refused(stack: Any, victim: Any, kit: Any) -> None:
    seen = stack.seen(victim.id)
    wire = forge(victim.id, 2, CryptoSigner.generate_ed25519())
    publish_retained(stack.broker, desired_topic(victim.id), wire)
    assert_refused(stack, victim, seen, "bad_signature", 1, kit)


def test_document_signed_by_a_device_key_is_refused(stack: Any, victim: Any, kit: Any) -> None:
    """The device's own key (``device.key``, made at provisioning and trusted by the fleet for
    the device's requests) is no release key: a document it signs is refused."""
    device_key = load_pem_private_key((victim.state / "device.key").read_bytes(), password=None)
    assert isinstance(device_key, Ed25519PrivateKey)
    seen = stack.seen(victim.id)
    wire = forge(victim.id, 2, CryptoSigner(device_key))
    publish_retained(stack.broker, desired_topic(victim.id), wire)
    end = assert_refused(stack, victim, seen, "bad_signature", 1, kit)
    assert CryptoSigner(device_key).public_key.keyid[:8] in end["reason"], end


def test_artifact_for_another_profile_is_refused(
    stack: Any, victim: Any, kit: Any, other_profile_release: int
) -> None:
    # the fleet will not assign it to this device ...
    r = stack.http.post(
        f"/v1/devices/{victim.id}/assignment",
        json={"model": MODEL, "version": other_profile_release},
        headers=stack.operator,
    )
    assert r.status_code == 422 and "NoFittingArtifactError" in r.text, r.text
    # ... so the attacker signs it with the (stolen) targets key: the device refuses it too
    seen = stack.seen(victim.id)
    wire = forge(victim.id, other_profile_release, fleet_targets_key(stack))
    publish_retained(stack.broker, desired_topic(victim.id), wire)
    end = assert_refused(stack, victim, seen, "wrong_profile", 1, kit)
    assert "x86_64-gateway" in end["reason"]


# --- replay, downgrade, and the signed rollback that is allowed -------------------------------


def test_replayed_document_and_unsigned_downgrade_are_refused_signed_rollback_is_not(
    stack: Any, devices: Callable[..., Any], kit: Any
) -> None:
    device = devices(stack)
    traffic = kit.Traffic(device.predict_url, kit.traffic_rows())  # the trial needs requests
    stack.assign(device.id, 2)
    assert stack.wait_final(device.id, 2)["to_state"] == "committed"
    captured = retained(stack.broker, desired_topic(device.id))  # the v2 document
    stack.assign(device.id, 4)  # a newer document (its release fails health_check)
    assert stack.wait_final(device.id, 4)["to_state"] == "failed"

    seen = stack.seen(device.id)
    publish_retained(stack.broker, desired_topic(device.id), captured)
    assert_refused(stack, device, seen, "replayed", 2, kit)

    # a downgrade to v1 without rollback, signed with the fleet's real key: the fleet refuses
    # to issue it, and so does the device
    r = stack.http.post(
        f"/v1/devices/{device.id}/assignment",
        json={"model": MODEL, "version": 1},
        headers=stack.operator,
    )
    assert r.status_code == 409, r.text
    seen = stack.seen(device.id)
    forged = forge(device.id, 1, fleet_targets_key(stack))
    publish_retained(stack.broker, desired_topic(device.id), forged)
    assert_refused(stack, device, seen, "downgrade", 2, kit)

    # the operator's signed rollback to v1 goes through (refused documents never raise the
    # serial the device accepts, so the fleet's next serial is still good)
    seen = stack.seen(device.id)
    stack.assign(device.id, 1, rollback=True)
    end = stack.wait_new_end(device.id, seen)
    traffic.close()
    assert end["to_state"] == "committed", end
    assert traffic.errors == [], traffic.errors[:3]
    assert device.active_version() == 1
    assert device.predict(kit.traffic_rows(4)).model_version == 1


# --- the fleet's TUF metadata: freeze and key revocation --------------------------------------


def test_expired_timestamp_metadata_is_refused(
    fresh_stack: Any, devices: Callable[..., Any], kit: Any
) -> None:
    stack = fresh_stack
    device = devices(stack)
    # the fleet's repository re-signs its timestamp with a 2 s lifetime and then stops
    # refreshing it (the scheduled job runs every 10 min): every device sees frozen metadata
    keys = load_online_keys(stack.settings.keys_dir)
    short = TufRepository(
        stack.settings.tuf_dir,
        keys,
        expiries=Expiries(timestamp=timedelta(seconds=2), refresh_fraction=1e6),
    )
    assert "timestamp" in " ".join(short.refresh_timestamp(datetime.now(UTC)))
    expires = next(r.expires for r in short.status() if r.role == "timestamp")
    kit.wait_for("the timestamp to expire", lambda: datetime.now(UTC) > expires, 10)
    seen = stack.seen(device.id)
    stack.assign(device.id, 2)
    end = assert_refused(stack, device, seen, "verification", 1, kit)
    assert "xpired" in end["reason"], end


def test_document_signed_by_a_key_revoked_in_a_newer_root_is_refused(
    fresh_stack: Any, devices: Callable[..., Any], kit: Any
) -> None:
    stack = fresh_stack
    device = devices(stack)
    old_key = fleet_targets_key(stack)
    rotated = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "keys",
            "rotate",
            "targets",
            "--dir",
            str(stack.settings.keys_dir),
            "--repo",
            str(stack.settings.tuf_dir),
            "--root-key",
            str(stack.root_key),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=kit.REPO,
    )
    assert rotated.returncode == 0, rotated.stderr
    assert fleet_targets_key(stack).public_key.keyid != old_key.public_key.keyid
    assert load_key(stack.root_key).public_key.keyid  # the root key signed the new root

    seen = stack.seen(device.id)
    wire = forge(device.id, 2, old_key)
    publish_retained(stack.broker, desired_topic(device.id), wire)
    end = assert_refused(stack, device, seen, "bad_signature", 1, kit)
    assert "root v2" in end["reason"], end  # checked against the root it refreshed to

    # the fleet, signing with the new key, still updates the device
    traffic = kit.Traffic(device.predict_url, kit.traffic_rows())  # the trial needs requests
    seen = stack.seen(device.id)
    stack.assign(device.id, 2)
    end = stack.wait_new_end(device.id, seen)
    traffic.close()
    assert end["to_state"] == "committed", end
    assert device.predict(kit.traffic_rows(4)).model_version == 2
