"""The served TUF repository end to end: a device enrolled through the real endpoint verifies and
downloads a published release with ``agent.tuf_client`` (ngclient) over real HTTP, resuming
with Range; without device credentials, or decommissioned, it is refused; and any byte changed
in the served metadata or target files makes the device refuse them."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.tuf_client import (
    DeviceFetcher,
    ReleaseAuthError,
    ReleaseClient,
    ReleaseVerificationError,
    RetryPolicy,
)
from fleet.bundle_upload import pack
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.settings import FleetSettings
from fleet.tuf_repo import TufRepository
from protocol.device_auth import SCHEME as DEVICE_SCHEME
from protocol.device_auth import public_key_hex, sign_request
from protocol.release import parse_artifact_custom

BUNDLES = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier"
FAST = RetryPolicy(attempts=2, base_delay=0.0, jitter=0.0, timeout=5.0)
ARTIFACT = "pdm-classifier/1/model.int8.onnx"


@dataclass
class Device:
    id: str
    key: Ed25519PrivateKey
    root: bytes
    clock: Callable[[], object]

    def headers(self, method: str, target: str) -> dict[str, str]:
        now = self.clock().timestamp()  # type: ignore[attr-defined]
        return {"Authorization": sign_request(self.key, self.id, method, target, now)}


@pytest.fixture
def repo(settings: FleetSettings, clock: Callable[[], object]) -> TufRepository:
    signers = init_key_dir(settings.keys_dir)
    repo = TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES})
    repo.init(signers[ROOT], clock())  # type: ignore[arg-type]
    return repo


@pytest.fixture
def published(repo: TufRepository, http: httpx.Client, operator: dict[str, str]) -> TufRepository:
    r = http.post(
        "/v1/models",
        content=pack(BUNDLES / "1"),
        headers={**operator, "Content-Type": "application/gzip"},
    )
    assert r.status_code == 201, r.text
    return repo


def enroll(http: httpx.Client, admin: dict[str, str], clock: Callable[[], object]) -> Device:
    """A device enrolled through the real endpoint (profile rpi4-aarch64), with no assignment."""
    token = http.post("/v1/enrollment-tokens", json={"uses": 1}, headers=admin).json()["secret"]
    key = Ed25519PrivateKey.generate()
    r = http.post(
        "/v1/enroll",
        json={
            "token": token,
            "public_key": public_key_hex(key),
            "profile": "rpi4-aarch64",
            "facts": {"arch": "aarch64", "ram_mb": 2048, "cores": 4, "agent_version": "0.1.0"},
        },
    )
    assert r.status_code == 201, r.text
    got = r.json()
    return Device(got["device_id"], key, got["root_json"].encode(), clock)


def assign(http: httpx.Client, operator: dict[str, str], device: Device, version: int) -> None:
    r = http.post(
        f"/v1/devices/{device.id}/assignment",
        json={"model": "pdm-classifier", "version": version},
        headers=operator,
    )
    assert r.status_code == 201, r.text


@pytest.fixture
def device(
    published: TufRepository,
    http: httpx.Client,
    admin: dict[str, str],
    operator: dict[str, str],
    clock: Callable[[], object],
) -> Device:
    """An enrolled device the fleet assigned pdm-classifier v1 (so it may download it)."""
    enrolled = enroll(http, admin, clock)
    assign(http, operator, enrolled, 1)
    return enrolled


def client_for(device: Device, live: str, where: Path) -> ReleaseClient:
    fetcher = DeviceFetcher(device.headers, FAST, sleep=lambda s: None)
    return ReleaseClient(where, device.root, f"{live}/v1/repository", fetcher)


def test_a_device_verifies_and_downloads_a_published_release(
    device: Device, live: str, tmp_path: Path
) -> None:
    client = client_for(device, live, tmp_path / "meta")
    info = client.target_info(ARTIFACT)
    custom = parse_artifact_custom(info.unrecognized_fields["custom"])
    assert (custom.model, custom.version, custom.runtime) == ("pdm-classifier", 1, "onnxruntime")
    dest = client.download_target(ARTIFACT, tmp_path / "slot" / "model.int8.onnx")
    assert dest.read_bytes() == (BUNDLES / "1" / "model.int8.onnx").read_bytes()
    # the golden set and reference profile the artifact names are targets too
    golden = client.download_target(custom.golden_path, tmp_path / "slot" / "golden.json")
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == custom.golden_sha256
    client.download_target(custom.reference_path, tmp_path / "slot" / "reference.json")


def test_downloads_resume_with_range(
    device: Device, live: str, tmp_path: Path, http: httpx.Client
) -> None:
    client = client_for(device, live, tmp_path / "meta")
    info = client.target_info(ARTIFACT)
    content = (BUNDLES / "1" / "model.int8.onnx").read_bytes()
    half = len(content) // 2
    dest = tmp_path / "slot" / "model.int8.onnx"
    dest.parent.mkdir()
    part = dest.with_name(dest.name + ".part")
    # A wrong first half: only a client that resumed with Range (and a server that honoured
    # it) ends with bytes that fail the hash; a full re-download would succeed.
    part.write_bytes(bytes(half))
    with pytest.raises(ReleaseVerificationError):
        client.download_target(ARTIFACT, dest)
    assert not part.exists() and not dest.exists()
    part.write_bytes(content[:half])
    assert client.download_target(ARTIFACT, dest).read_bytes() == content

    # the server side of Range, as a device sees it
    url = client.target_url(info)
    target = url.removeprefix(live)
    sha = info.hashes["sha256"]

    def get(extra: dict[str, str]) -> httpx.Response:
        return http.get(target, headers={**device.headers("GET", target), **extra})

    whole = get({})
    assert whole.status_code == 200 and whole.content == content
    assert whole.headers["etag"] == f'"{sha}"' and whole.headers["accept-ranges"] == "bytes"
    r = get({"Range": f"bytes={half}-"})
    assert r.status_code == 206 and r.content == content[half:]
    assert r.headers["content-range"] == f"bytes {half}-{len(content) - 1}/{len(content)}"
    r = get({"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == content[-10:]
    r = get({"Range": f"bytes={len(content)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(content)}"
    # If-Range with another ETag: the whole file, not a part of something else
    r = get({"Range": "bytes=0-9", "If-Range": '"' + "0" * 64 + '"'})
    assert r.status_code == 200 and r.content == content


def test_without_device_credentials_nothing_is_served(
    device: Device,
    live: str,
    http: httpx.Client,
    operator: dict[str, str],
    published: TufRepository,
    tmp_path: Path,
) -> None:
    info = published.get_target(ARTIFACT)
    assert info is not None
    target = f"/v1/repository/targets/pdm-classifier/1/{info.hashes['sha256']}.model.int8.onnx"
    for path in (target, "/v1/repository/metadata/timestamp.json"):
        r = http.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == DEVICE_SCHEME
        assert http.get(path, headers=operator).status_code == 401  # a token is no device
        # a signature for another path does not open this one
        other = device.headers("GET", "/v1/device")
        assert http.get(path, headers=other).status_code == 401
        assert http.get(path, headers=device.headers("GET", path)).status_code == 200
    anonymous = ReleaseClient(
        tmp_path / "meta",
        device.root,
        f"{live}/v1/repository",
        DeviceFetcher(None, FAST, sleep=lambda s: None),
    )
    with pytest.raises(ReleaseAuthError):
        anonymous.refresh()


@pytest.mark.parametrize(
    "path",
    [
        "../../fleet.db",
        "..%2F..%2Ffleet.db",
        "pdm-classifier/1/model.int8.onnx",  # the path itself, not its hashed name
        "pdm-classifier/1/../../../keys/targets.pem",
        "%2Fetc%2Fpasswd",
    ],
)
def test_target_paths_outside_the_repository_are_404(
    device: Device, http: httpx.Client, path: str
) -> None:
    target = f"/v1/repository/targets/{path}"
    r = http.get(target, headers=device.headers("GET", target))
    assert r.status_code == 404, r.text
    assert b"PRIVATE KEY" not in r.content and b"SQLite" not in r.content


def test_unknown_metadata_is_404(device: Device, http: httpx.Client) -> None:
    for name in ("root.json", "9.root.json", "targets.json", "..%2Ffleet.db"):
        target = f"/v1/repository/metadata/{name}"
        r = http.get(target, headers=device.headers("GET", target))
        assert r.status_code == 404, (name, r.status_code)


def test_a_decommissioned_device_is_refused(
    device: Device, live: str, http: httpx.Client, operator: dict[str, str], tmp_path: Path
) -> None:
    client = client_for(device, live, tmp_path / "meta")
    client.refresh()
    r = http.post(f"/v1/devices/{device.id}/decommission", json={}, headers=operator)
    assert r.status_code == 200, r.text
    with pytest.raises(ReleaseAuthError):
        client.download_target(ARTIFACT, tmp_path / "model.onnx")
    with pytest.raises(ReleaseAuthError):
        client_for(device, live, tmp_path / "meta2").refresh()


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    i = min(len(data) - 1, int(len(data) * where))
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _current(repo: TufRepository, role: str) -> Path:
    timestamp = json.loads((repo.metadata_dir / "timestamp.json").read_bytes())
    snapshot_v = timestamp["signed"]["meta"]["snapshot.json"]["version"]
    if role == "snapshot":
        return repo.metadata_dir / f"{snapshot_v}.snapshot.json"
    snapshot = json.loads((repo.metadata_dir / f"{snapshot_v}.snapshot.json").read_bytes())
    return (
        repo.metadata_dir / f"{snapshot['signed']['meta']['targets.json']['version']}.targets.json"
    )


@pytest.mark.parametrize("where", [0.0, 0.41, 1.0])
@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_a_changed_byte_of_served_metadata_is_refused(
    device: Device, live: str, published: TufRepository, tmp_path: Path, role: str, where: float
) -> None:
    path = published.metadata_dir / "timestamp.json" if role == "timestamp" else None
    path = path or _current(published, role)
    _flip(path, where)
    with pytest.raises(ReleaseVerificationError):
        client_for(device, live, tmp_path / "meta").target_info(ARTIFACT)


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_a_changed_byte_of_a_served_target_is_refused(
    device: Device, live: str, published: TufRepository, tmp_path: Path, where: float
) -> None:
    info = published.get_target(ARTIFACT)
    assert info is not None
    stored = published.targets_dir / "pdm-classifier" / "1"
    _flip(stored / f"{info.hashes['sha256']}.model.int8.onnx", where)
    client = client_for(device, live, tmp_path / "meta")
    dest = tmp_path / "model.onnx"
    with pytest.raises(ReleaseVerificationError):
        client.download_target(ARTIFACT, dest)
    assert not dest.exists() and not dest.with_name("model.onnx.part").exists()


def test_an_unchanged_copy_still_verifies_after_a_second_release(
    device: Device, live: str, http: httpx.Client, operator: dict[str, str], tmp_path: Path
) -> None:
    client = client_for(device, live, tmp_path / "meta")
    client.download_target(ARTIFACT, tmp_path / "v1.onnx")
    r = http.post(
        "/v1/models",
        content=pack(BUNDLES / "2"),
        headers={**operator, "Content-Type": "application/gzip"},
    )
    assert r.status_code == 201, r.text
    assign(http, operator, device, 2)
    client.refresh()  # new targets/snapshot/timestamp versions verify against the same root
    v2 = client.download_target("pdm-classifier/2/model.int8.tflite", tmp_path / "v2.tflite")
    assert v2.read_bytes() == (BUNDLES / "2" / "model.int8.tflite").read_bytes()
    shutil.rmtree(tmp_path / "meta")


def _assignments(settings: FleetSettings) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(settings.db_path)) as db:
        return db.execute("SELECT * FROM assignments ORDER BY device_id, serial").fetchall()


def test_another_devices_release_is_not_served(
    device: Device,
    live: str,
    http: httpx.Client,
    admin: dict[str, str],
    operator: dict[str, str],
    published: TufRepository,
    settings: FleetSettings,
    clock: Callable[[], object],
    tmp_path: Path,
) -> None:
    r = http.post(
        "/v1/models",
        content=pack(BUNDLES / "2"),
        headers={**operator, "Content-Type": "application/gzip"},
    )
    assert r.status_code == 201, r.text
    other = enroll(http, admin, clock)
    assign(http, operator, other, 2)  # v2 is the other device's release; `device` has v1
    before = _assignments(settings)
    v2 = "pdm-classifier/2/model.int8.tflite"
    info = published.get_target(v2)
    assert info is not None
    target = f"/v1/repository/targets/pdm-classifier/2/{info.hashes['sha256']}.model.int8.tflite"
    r = http.get(target, headers=device.headers("GET", target))
    assert r.status_code == 403 and "never assigned to device" in r.text, r.text
    assert r.content.find((BUNDLES / "2" / "model.int8.tflite").read_bytes()[:64]) == -1
    # the device's TUF client sees the refusal; it writes nothing
    client = client_for(device, live, tmp_path / "meta")
    dest = tmp_path / "v2.tflite"
    with pytest.raises(ReleaseAuthError):
        client.download_target(v2, dest)
    part = dest.with_name("v2.tflite.part")  # the resume file may stay, empty
    assert not dest.exists() and (not part.exists() or part.stat().st_size == 0)
    # a device with no assignment at all gets no release either, not even v1
    fresh = enroll(http, admin, clock)
    for path in (target, f"/v1/repository/targets/{artifact_url(published)}"):
        assert http.get(path, headers=fresh.headers("GET", path)).status_code == 403
    # the releases' owners still get theirs, and nothing was assigned or changed by the refusals
    r = http.get(target, headers=other.headers("GET", target))
    assert r.status_code == 200
    assert r.content == (BUNDLES / "2" / "model.int8.tflite").read_bytes()
    assert _assignments(settings) == before
    assert client.download_target(ARTIFACT, tmp_path / "v1.onnx").is_file()


def artifact_url(repo: TufRepository) -> str:
    info = repo.get_target(ARTIFACT)
    assert info is not None
    return f"pdm-classifier/1/{info.hashes['sha256']}.model.int8.onnx"
