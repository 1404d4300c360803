"""The device's TUF client against a real repository served over real HTTP on loopback.

The server below is a small stdlib ``http.server`` serving a :class:`fleet.tuf_repo.TufRepository`
directory the way the fleet app does (metadata public, targets behind a device bearer token,
Range support), plus switches that turn it into an attacker or a flaky network: serve other
bytes for a URL, cut a body short once, append bytes, ignore Range, answer 503.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Timestamp
from tuf.api.serialization.json import JSONSerializer

from agent.tuf_client import (
    DeviceFetcher,
    ReleaseAuthError,
    ReleaseClient,
    ReleaseFetchError,
    ReleaseVerificationError,
    RetryPolicy,
)
from fleet.tuf_repo import TufRepository
from protocol.desired import DesiredDocument, sign_desired, verify_desired
from protocol.errors import DesiredDocumentError

TOKEN = "device-7-secret"
MODEL_PATH = "demo/1/model.onnx"
MODEL = bytes(range(256)) * 800  # 204,800 bytes: several 64 KiB chunks
GOLDEN_PATH = "demo/1/golden.npz"
GOLDEN = b"golden inputs and outputs"
FAST = RetryPolicy(attempts=3, base_delay=0.0, jitter=0.0, timeout=5.0)


# --- the server -------------------------------------------------------------------------------


@dataclass
class Faults:
    overrides: dict[str, bytes] = field(default_factory=dict)  # URL path -> body to serve
    cut_once: dict[str, int] = field(default_factory=dict)  # URL path -> bytes before closing
    extra: dict[str, bytes] = field(default_factory=dict)  # URL path -> bytes appended
    announce_extra: bool = True  # Content-Length includes the extra bytes
    ignore_range: bool = False
    fail_first: dict[str, list[int | None]] = field(default_factory=dict)  # None = serve
    redirect: dict[str, str] = field(default_factory=dict)  # URL path -> Location
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)


class RepoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repo: TufRepository) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repo = repo
        self.faults = Faults()
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/tuf"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RepoServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        faults = self.server.faults
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            faults.requests.append((path, self.headers.get("Range")))
            statuses = faults.fail_first.get(path)
            status = statuses.pop(0) if statuses else None
        if status is not None:
            self.send_error(status)
            return
        if path in faults.redirect:
            self.send_response(302)
            self.send_header("Location", faults.redirect[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.startswith("/tuf/metadata/"):
            file = self.server.repo.metadata_file(path.removeprefix("/tuf/metadata/"))
        elif path.startswith("/tuf/targets/"):
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.send_error(401, "device credentials required")
                return
            file = self.server.repo.target_file(path.removeprefix("/tuf/targets/"))
        else:
            file = None
        body = faults.overrides.get(path)
        if body is None:
            if file is None:
                self.send_error(404)
                return
            body = file.read_bytes()
        self._send(path, body)

    def _send(self, path: str, body: bytes) -> None:
        faults = self.server.faults
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not faults.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
        part = body[start:]
        extra = faults.extra.get(path, b"")
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if not extra or faults.announce_extra:
            self.send_header("Content-Length", str(len(part) + len(extra)))
        self.end_headers()
        with self.server.lock:
            cut = faults.cut_once.pop(path, None)
        if cut is not None:
            self.wfile.write(part[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(part + extra)


# --- fixtures ---------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Published:
    repo: TufRepository
    server: RepoServer
    root_key: CryptoSigner
    pinned_root: bytes
    history: dict[str, bytes]  # metadata file name -> bytes; "timestamp.v2": a superseded one


def _publish_repo(repo_dir: Path, now: datetime) -> tuple[TufRepository, CryptoSigner]:
    root_key = CryptoSigner.generate_ed25519()
    online = {r: CryptoSigner.generate_ed25519() for r in ("targets", "snapshot", "timestamp")}
    repo = TufRepository(repo_dir, online)
    repo.init(root_key, now)
    return repo, root_key


def _serve(repo: TufRepository) -> RepoServer:
    server = RepoServer(repo)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """A repository with root v2 (so devices pinned to v1 fetch a root), two targets
    versions and the timestamps of every step kept for replay attacks."""
    repo, root_key = _publish_repo(tmp_path_factory.mktemp("repo"), _now())
    pinned = repo.root_bytes(1)
    repo.add_targets([(GOLDEN_PATH, GOLDEN, {"kind": "golden"})], _now())
    history = {}
    history["timestamp.v2"] = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.add_targets([(MODEL_PATH, MODEL, {"kind": "artifact", "model": "demo"})], _now())
    repo.renew_root(root_key, _now())  # root v2; re-signs targets/snapshot/timestamp
    for p in repo.metadata_dir.glob("*.json"):
        history[p.name] = p.read_bytes()
    server = _serve(repo)
    yield Published(repo, server, root_key, pinned, history)
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _reset_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "published" in request.fixturenames:
        request.getfixturevalue("published").server.faults = Faults()


def _fetcher(
    token: str | None = TOKEN,
    retry: RetryPolicy = FAST,
    sleep: Callable[[float], None] = time.sleep,
) -> DeviceFetcher:
    def auth(method: str, target: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    return DeviceFetcher(auth, retry, sleep=sleep)


def _client(
    p: Published, metadata_dir: Path, fetcher: DeviceFetcher | None = None
) -> ReleaseClient:
    return ReleaseClient(metadata_dir, p.pinned_root, p.server.base_url, fetcher or _fetcher())


def _current(p: Published, role: str) -> str:
    ts = Metadata[Timestamp].from_bytes(p.history["timestamp.json"]).signed
    if role == "snapshot":
        return f"{ts.snapshot_meta.version}.snapshot.json"
    snap = Metadata[Snapshot].from_bytes(p.history[f"{ts.snapshot_meta.version}.snapshot.json"])
    return f"{snap.signed.meta['targets.json'].version}.targets.json"


# --- the happy path ---------------------------------------------------------------------------


def test_ngclient_verifies_a_published_target(published: Published, tmp_path: Path) -> None:
    client = _client(published, tmp_path / "meta")
    client.refresh()
    assert client.trusted_root().version == 2
    info = client.target_info(MODEL_PATH)
    assert info.custom == {"kind": "artifact", "model": "demo"}
    dest = client.download_target(MODEL_PATH, tmp_path / "slot" / "model.onnx")
    assert dest.read_bytes() == MODEL
    assert not (tmp_path / "slot" / "model.onnx.part").exists()
    # a second call finds the verified file and downloads nothing
    before = len(published.server.faults.requests)
    assert client.download_target(MODEL_PATH, dest) == dest
    assert len(published.server.faults.requests) == before


def test_unknown_target_is_refused(published: Published, tmp_path: Path) -> None:
    client = _client(published, tmp_path / "meta")
    with pytest.raises(ReleaseVerificationError, match="not a target"):
        client.download_target("demo/9/model.onnx", tmp_path / "x")


# --- tampering: any changed byte fails --------------------------------------------------------

_SIG = re.compile(rb'"sig":"([0-9a-f]+)"')


def _same_signature(data: bytes, index: int, new: int) -> bool:
    """Upper-casing a hex digit of a signature spells the same signature bytes (securesystemslib
    reads hex case-insensitively), so it is no change of meaning; every other change is."""
    if bytes([new]) != bytes([data[index]]).upper() or new == data[index]:
        return False
    return any(m.start(1) <= index < m.end(1) for m in _SIG.finditer(data))


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets", "root"])
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_changed_metadata_byte_fails(
    published: Published, role: str, data: st.DataObject
) -> None:
    name = {
        "timestamp": "timestamp.json",
        "root": "2.root.json",
        "snapshot": _current(published, "snapshot"),
        "targets": _current(published, "targets"),
    }[role]
    original = published.history[name]
    index = data.draw(st.integers(0, len(original) - 1), label="index")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != original[index]), label="byte")
    assume(not _same_signature(original, index, new))
    tampered = bytearray(original)
    tampered[index] = new
    published.server.faults = Faults(overrides={f"/tuf/metadata/{name}": bytes(tampered)})
    with tempfile.TemporaryDirectory() as tmp:
        client = _client(published, Path(tmp))
        with pytest.raises(ReleaseVerificationError):
            client.refresh()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(index=st.integers(0, len(MODEL) - 1), xor=st.integers(1, 255))
def test_any_changed_target_byte_fails(published: Published, index: int, xor: int) -> None:
    tampered = bytearray(MODEL)
    tampered[index] ^= xor
    url = "/tuf/targets/demo/1/" + hashlib.sha256(MODEL).hexdigest() + ".model.onnx"
    published.server.faults = Faults(overrides={url: bytes(tampered)})
    with tempfile.TemporaryDirectory() as tmp:
        client = _client(published, Path(tmp) / "meta")
        dest = Path(tmp) / "model.onnx"
        with pytest.raises(ReleaseVerificationError, match="TUF verification failed"):
            client.download_target(MODEL_PATH, dest)
        assert not dest.exists()
        assert not dest.with_name("model.onnx.part").exists()  # never resume from bad data


def test_untampered_override_still_verifies(published: Published, tmp_path: Path) -> None:
    """The tampering tests can fail: serving the original bytes through the override passes."""
    name = _current(published, "targets")
    published.server.faults = Faults(overrides={f"/tuf/metadata/{name}": published.history[name]})
    _client(published, tmp_path).refresh()
    assert any(path.endswith(name) for path, _ in published.server.faults.requests)


# --- freeze, rollback, mix-and-match -----------------------------------------------------------


def test_expired_timestamp_is_refused_until_the_scheduler_resigns_it(tmp_path: Path) -> None:
    then = _now() - timedelta(days=3)
    repo, _ = _publish_repo(tmp_path / "repo", then)
    repo.add_targets([(MODEL_PATH, MODEL, {})], then)
    server = _serve(repo)
    try:
        client = ReleaseClient(tmp_path / "meta", repo.root_bytes(1), server.base_url, _fetcher())
        with pytest.raises(ReleaseVerificationError, match="ExpiredMetadataError"):
            client.refresh()
        assert repo.needs_timestamp_refresh(_now())
        assert repo.refresh_timestamp(_now()) == ["timestamp"]
        assert not repo.needs_timestamp_refresh(_now())
        client.refresh()
        assert client.download_target(MODEL_PATH, tmp_path / "m").read_bytes() == MODEL
    finally:
        server.shutdown()
        server.server_close()


def test_replayed_older_timestamp_is_refused(published: Published, tmp_path: Path) -> None:
    _client(published, tmp_path).refresh()  # the device has seen the newest timestamp
    old = published.history["timestamp.v2"]
    published.server.faults = Faults(overrides={"/tuf/metadata/timestamp.json": old})
    with pytest.raises(ReleaseVerificationError, match="BadVersionNumberError"):
        _client(published, tmp_path).refresh()


def test_replayed_older_snapshot_is_refused(published: Published, tmp_path: Path) -> None:
    current = _current(published, "snapshot")
    older = published.history[f"{int(current.split('.')[0]) - 1}.snapshot.json"]
    published.server.faults = Faults(overrides={f"/tuf/metadata/{current}": older})
    with pytest.raises(ReleaseVerificationError):
        _client(published, tmp_path).refresh()


def test_mix_and_match_targets_is_refused(published: Published, tmp_path: Path) -> None:
    """Snapshot names targets vN, the server hands out the (validly signed) vN-1."""
    current = _current(published, "targets")
    older = published.history[f"{int(current.split('.')[0]) - 1}.targets.json"]
    published.server.faults = Faults(overrides={f"/tuf/metadata/{current}": older})
    with pytest.raises(ReleaseVerificationError):
        _client(published, tmp_path).refresh()


# --- key rotation -----------------------------------------------------------------------------


def _forged_release(
    repo: TufRepository, targets_key: Signer, snapshot_key: Signer, ts_key: Signer
) -> dict[str, bytes]:
    """A targets version adding an evil target, signed by ``targets_key``, with snapshot and
    timestamp that point at it signed by the given keys: URL path -> bytes."""
    ser = JSONSerializer(compact=True)
    state = repo._state()
    targets = state.targets
    targets.signed.version += 1
    targets.signed.targets["demo/1/model.onnx"] = TargetFile.from_data("demo/1/model.onnx", b"evil")
    targets.signatures.clear()
    targets.sign(targets_key)
    tbytes = targets.to_bytes(ser)
    snapshot = state.snapshot
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = MetaFile(targets.signed.version)
    snapshot.signatures.clear()
    snapshot.sign(snapshot_key)
    sbytes = snapshot.to_bytes(ser)
    timestamp = state.timestamp
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile(snapshot.signed.version)
    timestamp.signatures.clear()
    timestamp.sign(ts_key)
    return {
        f"/tuf/metadata/{targets.signed.version}.targets.json": tbytes,
        f"/tuf/metadata/{snapshot.signed.version}.snapshot.json": sbytes,
        "/tuf/metadata/timestamp.json": timestamp.to_bytes(ser),
    }


def test_device_follows_a_rotation_and_refuses_the_revoked_key(tmp_path: Path) -> None:
    repo, root_key = _publish_repo(tmp_path / "repo", _now())
    repo.add_targets([(MODEL_PATH, MODEL, {})], _now())
    server = _serve(repo)
    try:
        pinned = repo.root_bytes(1)
        client = ReleaseClient(tmp_path / "meta", pinned, server.base_url, _fetcher())
        client.refresh()
        old_targets_key = repo.signers["targets"]
        assert client.trusted_root().roles["targets"].keyids == [old_targets_key.public_key.keyid]

        # the control: before the rotation, metadata forged with that key is accepted
        server.faults.overrides = _forged_release(
            repo, old_targets_key, repo.signers["snapshot"], repo.signers["timestamp"]
        )
        control = ReleaseClient(tmp_path / "ctl", pinned, server.base_url, _fetcher())
        assert control.target_info(MODEL_PATH).length == len(b"evil")
        server.faults = Faults()

        new_targets_key = CryptoSigner.generate_ed25519()
        assert repo.rotate_key("targets", new_targets_key, root_key, _now()) == 2
        client = ReleaseClient(tmp_path / "meta", pinned, server.base_url, _fetcher())
        client.refresh()
        root = client.trusted_root()
        assert root.version == 2
        assert root.roles["targets"].keyids == [new_targets_key.public_key.keyid]
        assert client.download_target(MODEL_PATH, tmp_path / "m").read_bytes() == MODEL

        server.faults.overrides = _forged_release(
            repo, old_targets_key, repo.signers["snapshot"], repo.signers["timestamp"]
        )
        with pytest.raises(ReleaseVerificationError, match="UnsignedMetadataError"):
            ReleaseClient(tmp_path / "meta", pinned, server.base_url, _fetcher()).refresh()

        # a device provisioned with root v1 that never saw v1's metadata follows too
        fresh = ReleaseClient(tmp_path / "fresh", pinned, server.base_url, _fetcher())
        server.faults = Faults()
        assert fresh.download_target(MODEL_PATH, tmp_path / "f").read_bytes() == MODEL
    finally:
        server.shutdown()
        server.server_close()


def test_device_follows_a_root_key_rotation(tmp_path: Path) -> None:
    repo, old_root = _publish_repo(tmp_path / "repo", _now())
    repo.add_targets([(MODEL_PATH, MODEL, {})], _now())
    server = _serve(repo)
    try:
        pinned = repo.root_bytes(1)
        new_root = CryptoSigner.generate_ed25519()
        assert repo.rotate_key("root", new_root, old_root, _now()) == 2
        assert repo.renew_root(new_root, _now()) == 3  # signed by the new root key alone
        client = ReleaseClient(tmp_path / "meta", pinned, server.base_url, _fetcher())
        client.refresh()
        assert client.trusted_root().version == 3
        assert client.download_target(MODEL_PATH, tmp_path / "m").read_bytes() == MODEL

        # a root v4 signed by the revoked root key only is refused
        forged = Metadata.from_bytes(repo.root_bytes(3))
        forged.signed.version = 4
        forged.signatures.clear()
        forged.sign(old_root)
        server.faults.overrides = {
            "/tuf/metadata/4.root.json": forged.to_bytes(JSONSerializer(compact=True))
        }
        with pytest.raises(ReleaseVerificationError, match="UnsignedMetadataError"):
            ReleaseClient(tmp_path / "meta", pinned, server.base_url, _fetcher()).refresh()
    finally:
        server.shutdown()
        server.server_close()


def test_desired_document_checked_against_the_client_trusted_root(tmp_path: Path) -> None:
    repo, root_key = _publish_repo(tmp_path / "repo", _now())
    server = _serve(repo)
    try:
        now = _now()
        doc = DesiredDocument("dev-7", 1, now, now + timedelta(hours=1), "demo", 1, MODEL_PATH)
        old_key = repo.signers["targets"]
        wire = sign_desired(doc, old_key)
        pinned = repo.root_bytes(1)
        client = ReleaseClient(tmp_path / "meta", pinned, server.base_url, _fetcher())
        assert verify_desired(wire, client.trusted_root(), now, device_id="dev-7") == doc

        repo.rotate_key("targets", CryptoSigner.generate_ed25519(), root_key, now)
        client = ReleaseClient(tmp_path / "meta", pinned, server.base_url, _fetcher())
        client.refresh()
        with pytest.raises(DesiredDocumentError) as err:
            verify_desired(wire, client.trusted_root(), now, device_id="dev-7")
        assert err.value.reason == "bad_signature"
        rewire = sign_desired(doc, repo.signers["targets"])
        assert verify_desired(rewire, client.trusted_root(), now) == doc
    finally:
        server.shutdown()
        server.server_close()


# --- the fetcher: resume, length cap, credentials, retries ------------------------------------


def _model_url() -> str:
    return "/tuf/targets/demo/1/" + hashlib.sha256(MODEL).hexdigest() + ".model.onnx"


def test_interrupted_download_resumes_with_range(published: Published, tmp_path: Path) -> None:
    published.server.faults = Faults(cut_once={_model_url(): 70_000})
    client = _client(published, tmp_path / "meta")
    assert client.download_target(MODEL_PATH, tmp_path / "m").read_bytes() == MODEL
    ranges = [r for path, r in published.server.faults.requests if path == _model_url()]
    assert ranges == [None, "bytes=70000-"]


def test_plain_fetch_resumes_too(published: Published) -> None:
    """FetcherInterface.fetch (unused by ngclient's Updater, part of the interface)."""
    published.server.faults = Faults(cut_once={_model_url(): 1000})
    url = published.server.base_url.removesuffix("/tuf") + _model_url()
    assert b"".join(_fetcher().fetch(url)) == MODEL


class _Killed(Exception):
    """Stands for the agent process dying while it waits to retry."""


def _die(_: float) -> None:
    raise _Killed


def test_download_resumes_from_the_part_file_after_a_restart(
    published: Published, tmp_path: Path
) -> None:
    # first run: the body breaks at 100,000 bytes, the Range retry gets a 503 and the process
    # dies in its backoff sleep, leaving the partial data in m.part
    published.server.faults = Faults(
        cut_once={_model_url(): 100_000}, fail_first={_model_url(): [None, 503]}
    )
    with pytest.raises(_Killed):
        _client(published, tmp_path / "meta", _fetcher(sleep=_die)).download_target(
            MODEL_PATH, tmp_path / "m"
        )
    assert (tmp_path / "m.part").read_bytes() == MODEL[:100_000]
    # the restarted agent resumes where the file ends
    dest = _client(published, tmp_path / "meta").download_target(MODEL_PATH, tmp_path / "m")
    assert dest.read_bytes() == MODEL
    ranges = [r for path, r in published.server.faults.requests if path == _model_url()]
    assert ranges == [None, "bytes=100000-", "bytes=100000-"]


def test_a_server_ignoring_range_is_read_from_the_start(
    published: Published, tmp_path: Path
) -> None:
    (tmp_path / "m.part").write_bytes(MODEL[:50_000])
    published.server.faults = Faults(ignore_range=True)
    dest = _client(published, tmp_path / "meta").download_target(MODEL_PATH, tmp_path / "m")
    assert dest.read_bytes() == MODEL


def test_stale_part_file_that_fails_verification_is_discarded(
    published: Published, tmp_path: Path
) -> None:
    (tmp_path / "m.part").write_bytes(b"x" * 1000)  # not a prefix of the target
    with pytest.raises(ReleaseVerificationError):
        _client(published, tmp_path / "meta").download_target(MODEL_PATH, tmp_path / "m")
    assert not (tmp_path / "m.part").exists()
    dest = _client(published, tmp_path / "meta").download_target(MODEL_PATH, tmp_path / "m")
    assert dest.read_bytes() == MODEL


@pytest.mark.parametrize("announce", [True, False], ids=["announced", "close-delimited"])
def test_a_server_sending_more_than_the_target_length_is_cut_off(
    published: Published, tmp_path: Path, announce: bool
) -> None:
    published.server.faults = Faults(extra={_model_url(): b"\0" * 100_000}, announce_extra=announce)
    with pytest.raises(ReleaseVerificationError, match="more than the 204800 bytes"):
        _client(published, tmp_path / "meta").download_target(MODEL_PATH, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not (tmp_path / "m.part").exists()


def test_a_server_sending_more_metadata_than_signed_is_cut_off(
    published: Published, tmp_path: Path
) -> None:
    name = _current(published, "targets")
    published.server.faults = Faults(
        extra={f"/tuf/metadata/{name}": b" " * 10}, announce_extra=False
    )
    with pytest.raises(ReleaseVerificationError, match="more than"):
        _client(published, tmp_path).refresh()


def test_missing_device_credentials_give_a_clear_error(
    published: Published, tmp_path: Path
) -> None:
    client = _client(published, tmp_path / "meta", _fetcher(token=None))
    client.refresh()  # metadata is public
    with pytest.raises(ReleaseAuthError, match="401.*refused this device's credentials"):
        client.download_target(MODEL_PATH, tmp_path / "m")


def test_credentials_are_made_per_request_for_its_method_and_target(
    published: Published, tmp_path: Path
) -> None:
    """Signed device tokens (protocol.device_auth) sign the method and the request target."""
    seen: list[tuple[str, str]] = []

    def auth(method: str, target: str) -> dict[str, str]:
        seen.append((method, target))
        return {"Authorization": f"Bearer {TOKEN}"}

    client = _client(published, tmp_path / "meta", DeviceFetcher(auth, FAST))
    client.download_target(MODEL_PATH, tmp_path / "m")
    assert seen == [("GET", path) for path, _ in published.server.faults.requests]
    assert ("GET", _model_url()) in seen


def test_redirects_are_not_followed(published: Published, tmp_path: Path) -> None:
    """A redirect would hand the device's credentials to wherever the server points."""
    published.server.faults = Faults(redirect={_model_url(): "/elsewhere"})
    client = _client(published, tmp_path / "meta")
    with pytest.raises(ReleaseFetchError, match="HTTP 302"):
        client.download_target(MODEL_PATH, tmp_path / "m")
    assert "/elsewhere" not in [path for path, _ in published.server.faults.requests]


def test_transient_errors_are_retried_with_growing_backoff(
    published: Published, tmp_path: Path
) -> None:
    published.server.faults = Faults(fail_first={_model_url(): [503, 502, 500]})
    delays: list[float] = []
    policy = RetryPolicy(attempts=4, base_delay=0.01, max_delay=1.0, jitter=0.0, timeout=5.0)
    client = _client(published, tmp_path / "meta", _fetcher(retry=policy, sleep=delays.append))
    assert client.download_target(MODEL_PATH, tmp_path / "m").read_bytes() == MODEL
    assert delays == [0.01, 0.02, 0.04]


def test_retries_give_up_with_a_transient_error(published: Published, tmp_path: Path) -> None:
    published.server.faults = Faults(fail_first={_model_url(): [503] * 5})
    client = _client(published, tmp_path / "meta", _fetcher(sleep=lambda _: None))
    with pytest.raises(ReleaseFetchError, match="gave up after 3 attempts") as err:
        client.download_target(MODEL_PATH, tmp_path / "m")
    assert err.value.transient


def test_unreachable_fleet_is_a_transient_error(published: Published, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = ReleaseClient(
        tmp_path,
        published.pinned_root,
        f"http://127.0.0.1:{port}/tuf",
        _fetcher(sleep=lambda _: None),
    )
    with pytest.raises(ReleaseFetchError) as err:
        client.refresh()
    assert err.value.transient
