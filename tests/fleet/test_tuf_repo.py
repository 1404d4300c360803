"""The fleet's TUF repository on disk: layout, publishing, expiry refresh, key changes.

Signatures are checked with python-tuf's own verification (``verify_delegate``, root chain
verification); the end-to-end checks with ``tuf.ngclient`` over HTTP are in
tests/agent/test_tuf_client.py.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from fleet.errors import (
    TargetConflictError,
    TufRepositoryError,
    TufRepositoryNotInitializedError,
)
from fleet.tuf_repo import Expiries, TufRepository
from protocol.bundle import ArtifactInfo, BundleMetadata, HealthThresholds, TensorSpec
from protocol.release import parse_artifact_custom, release_targets

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _keys() -> dict[str, CryptoSigner]:
    return {
        r: CryptoSigner.generate_ed25519() for r in ("root", "targets", "snapshot", "timestamp")
    }


@pytest.fixture
def keys() -> dict[str, CryptoSigner]:
    return _keys()


@pytest.fixture
def repo(tmp_path: Path, keys: dict[str, CryptoSigner]) -> TufRepository:
    r = TufRepository(tmp_path / "repo", {k: v for k, v in keys.items() if k != "root"})
    r.init(keys["root"], NOW)
    return r


def _md(repo: TufRepository, name: str) -> Metadata:
    return Metadata.from_bytes((repo.metadata_dir / name).read_bytes())


def _current(repo: TufRepository) -> tuple[Metadata, Metadata, Metadata, Metadata]:
    """root, targets, snapshot, timestamp as a client would chain them, each verified."""
    root = _md(repo, f"{repo.root_version()}.root.json")
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
    ts = _md(repo, "timestamp.json")
    root.signed.verify_delegate("timestamp", ts.signed_bytes, ts.signatures)
    snap_name = f"{ts.signed.snapshot_meta.version}.snapshot.json"
    snap = _md(repo, snap_name)
    ts.signed.snapshot_meta.verify_length_and_hashes((repo.metadata_dir / snap_name).read_bytes())
    root.signed.verify_delegate("snapshot", snap.signed_bytes, snap.signatures)
    targets_meta = snap.signed.meta["targets.json"]
    targets_name = f"{targets_meta.version}.targets.json"
    targets = _md(repo, targets_name)
    targets_meta.verify_length_and_hashes((repo.metadata_dir / targets_name).read_bytes())
    root.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    assert targets.signed.version == targets_meta.version
    assert snap.signed.version == ts.signed.snapshot_meta.version
    return root, targets, snap, ts


def _verify_root_chain(repo: TufRepository) -> None:
    previous = _md(repo, "1.root.json").signed
    for v in range(2, repo.root_version() + 1):
        md = _md(repo, f"{v}.root.json")
        result = md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures)
        assert result.verified, f"root v{v} does not verify against v{v - 1}"
        previous = md.signed


# --- init -------------------------------------------------------------------------------------


def test_init_writes_a_consistent_snapshot_repository(
    repo: TufRepository, keys: dict[str, CryptoSigner]
) -> None:
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"]
    root, targets, snap, ts = _current(repo)
    assert isinstance(root.signed, Root) and root.signed.consistent_snapshot
    for role, key in keys.items():
        assert root.signed.roles[role].keyids == [key.public_key.keyid]
    assert (targets.signed.version, snap.signed.version, ts.signed.version) == (1, 1, 1)
    assert ts.signed.expires == NOW + timedelta(days=1)
    assert root.signed.expires == NOW + timedelta(days=365)
    # compact JSON: no byte of a served file is whitespace
    for p in repo.metadata_dir.iterdir():
        assert b"\n" not in p.read_bytes() and b": " not in p.read_bytes()


def test_init_refuses_an_existing_repository_unless_forced(
    repo: TufRepository, keys: dict[str, CryptoSigner]
) -> None:
    with pytest.raises(TufRepositoryError, match="already holds a TUF repository"):
        repo.init(keys["root"], NOW)
    repo.add_targets([("m/1/a", b"a", {})], NOW)
    repo.init(keys["root"], NOW, force=True)
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "timestamp.json",
    ]


def test_an_uninitialised_directory_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(TufRepositoryNotInitializedError, match="fleet keys init"):
        TufRepository(tmp_path, {}).root_bytes()


def test_the_root_key_is_not_an_online_key(tmp_path: Path, keys: dict[str, CryptoSigner]) -> None:
    with pytest.raises(TufRepositoryError, match="root key stays offline"):
        TufRepository(tmp_path, keys)


# --- publishing -------------------------------------------------------------------------------


def test_add_targets_publishes_new_versions_and_content_addressed_files(
    repo: TufRepository,
) -> None:
    assert repo.add_targets([("m/1/model.onnx", b"weights", {"k": "v"})], NOW) == 2
    root, targets, snap, ts = _current(repo)
    assert (targets.signed.version, snap.signed.version, ts.signed.version) == (2, 2, 2)
    info = targets.signed.targets["m/1/model.onnx"]
    assert info.length == 7 and info.custom == {"k": "v"}
    stored = repo.targets_dir / "m" / "1" / f"{info.hashes['sha256']}.model.onnx"
    assert stored.read_bytes() == b"weights"
    assert repo.target_file(f"m/1/{info.hashes['sha256']}.model.onnx") == stored
    assert repo.get_target("m/1/model.onnx") == info


def test_republishing_the_same_target_is_a_no_op(repo: TufRepository) -> None:
    repo.add_targets([("m/1/a", b"a", {"x": 1})], NOW)
    assert repo.add_targets([("m/1/a", b"a", {"x": 1})], NOW) == 2
    assert _md(repo, "timestamp.json").signed.version == 2


@pytest.mark.parametrize("change", [(b"b", {"x": 1}), (b"a", {"x": 2})], ids=["bytes", "custom"])
def test_a_published_target_never_changes(
    repo: TufRepository, change: tuple[bytes, dict[str, int]]
) -> None:
    repo.add_targets([("m/1/a", b"a", {"x": 1})], NOW)
    with pytest.raises(TargetConflictError, match="publish a new model version"):
        repo.add_targets([("m/1/a", *change)], NOW)
    assert _md(repo, "timestamp.json").signed.version == 2


@pytest.mark.parametrize("path", ["", "/abs", "a/../b", "a//b", "a\\b", "a/./b", "a/\nb"])
def test_bad_target_paths_are_refused(repo: TufRepository, path: str) -> None:
    with pytest.raises(TufRepositoryError, match="plain relative path"):
        repo.add_targets([(path, b"x", {})], NOW)


def test_float_custom_metadata_is_refused_before_signing(repo: TufRepository) -> None:
    with pytest.raises(TufRepositoryError, match="decimal strings"):
        repo.add_targets([("m/1/a", b"a", {"atol": 0.05})], NOW)


def test_a_bundle_release_round_trips_through_the_repository(repo: TufRepository) -> None:
    files = {"model.onnx": b"onnx bytes", "golden.npz": b"golden", "reference.json": b"{}"}
    meta = BundleMetadata(
        name="pdm",
        version=4,
        description="",
        input=TensorSpec("x", "float32", (None, 3)),
        output=TensorSpec("y", "float32", (None, 2)),
        feature_names=("a", "b", "c"),
        class_names=("ok", "bad"),
        artifacts=(
            ArtifactInfo(
                file="model.onnx",
                format="onnx",
                runtime="onnxruntime",
                quantization="int8",
                golden="golden.npz",
                sha256=hashlib.sha256(files["model.onnx"]).hexdigest(),
                length=len(files["model.onnx"]),
                profiles=("rpi4",),
            ),
        ),
        reference_profile="reference.json",
        health=HealthThresholds(golden_atol=0.125),
        files={p: (hashlib.sha256(b).hexdigest(), len(b)) for p, b in files.items()},
    )
    release = release_targets(meta)
    repo.add_targets([(t.path, files[t.bundle_file], t.custom) for t in release], NOW)
    _, targets, _, _ = _current(repo)
    artifact = parse_artifact_custom(targets.signed.targets["pdm/4/model.onnx"].custom)
    assert artifact.health.golden_atol == 0.125
    assert targets.signed.targets[artifact.golden_path].hashes["sha256"] == artifact.golden_sha256
    reference = targets.signed.targets[artifact.reference_path]
    assert reference.hashes["sha256"] == artifact.reference_sha256


# --- keeping metadata fresh -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("later", "resigned"),
    [
        (timedelta(hours=11), []),
        (timedelta(hours=13), ["timestamp"]),
        (timedelta(days=4), ["snapshot", "timestamp"]),
        (timedelta(days=46), ["targets", "snapshot", "timestamp"]),
    ],
)
def test_refresh_resigns_what_is_close_to_expiry(
    repo: TufRepository, later: timedelta, resigned: list[str]
) -> None:
    assert repo.needs_timestamp_refresh(NOW + later) == bool(resigned)
    assert repo.refresh_timestamp(NOW + later) == resigned
    assert not repo.needs_timestamp_refresh(NOW + later)
    _, targets, snap, ts = _current(repo)
    assert ts.signed.expires == (NOW + later if resigned else NOW) + timedelta(days=1)
    assert snap.signed.version == (2 if "snapshot" in resigned else 1)
    assert targets.signed.version == (2 if "targets" in resigned else 1)


def test_expiries_are_configurable(tmp_path: Path, keys: dict[str, CryptoSigner]) -> None:
    online = {k: v for k, v in keys.items() if k != "root"}
    repo = TufRepository(tmp_path, online, Expiries(timestamp=timedelta(hours=2)))
    repo.init(keys["root"], NOW)
    assert _md(repo, "timestamp.json").signed.expires == NOW + timedelta(hours=2)
    assert repo.needs_timestamp_refresh(NOW + timedelta(hours=1, minutes=1))


def test_an_expiring_root_is_logged(repo: TufRepository, caplog: pytest.LogCaptureFixture) -> None:
    repo.refresh_timestamp(NOW + timedelta(days=200))
    assert "renew it with the offline root key" in caplog.text


def test_a_naive_now_is_refused(repo: TufRepository) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        repo.refresh_timestamp(datetime(2025, 3, 1))


# --- key changes ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_rotating_an_online_key(
    repo: TufRepository, keys: dict[str, CryptoSigner], role: str
) -> None:
    repo.add_targets([("m/1/a", b"a", {})], NOW)
    new = CryptoSigner.generate_ed25519()
    assert repo.rotate_key(role, new, keys["root"], NOW) == 2
    _verify_root_chain(repo)
    root, *_ = _current(repo)  # every role verifies under root v2
    assert root.signed.roles[role].keyids == [new.public_key.keyid]
    assert keys[role].public_key.keyid not in root.signed.keys
    assert repo.signers[role] is new
    assert repo.get_target("m/1/a") is not None


def test_rotating_the_root_key_signs_with_old_and_new(
    repo: TufRepository, keys: dict[str, CryptoSigner]
) -> None:
    new_root = CryptoSigner.generate_ed25519()
    repo.rotate_key("root", new_root, keys["root"], NOW)
    v2 = _md(repo, "2.root.json")
    assert set(v2.signatures) == {keys["root"].public_key.keyid, new_root.public_key.keyid}
    assert repo.renew_root(new_root, NOW) == 3
    _verify_root_chain(repo)
    with pytest.raises(TufRepositoryError, match="not a root key of root v3"):
        repo.renew_root(keys["root"], NOW)


def test_revoking_a_key_needs_a_replacement_when_it_is_the_last(
    repo: TufRepository, keys: dict[str, CryptoSigner]
) -> None:
    keyid = keys["targets"].public_key.keyid
    with pytest.raises(TufRepositoryError, match="below its threshold"):
        repo.revoke_key("targets", keyid[:8], keys["root"], NOW)
    assert repo.root_version() == 1
    replacement = CryptoSigner.generate_ed25519()
    assert repo.revoke_key("targets", keyid[:8], keys["root"], NOW, replacement) == 2
    _verify_root_chain(repo)
    root, *_ = _current(repo)
    assert root.signed.roles["targets"].keyids == [replacement.public_key.keyid]


def test_revoking_an_unknown_key_lists_the_role_keys(
    repo: TufRepository, keys: dict[str, CryptoSigner]
) -> None:
    with pytest.raises(TufRepositoryError, match=keys["snapshot"].public_key.keyid):
        repo.revoke_key("snapshot", "deadbeefdeadbeef", keys["root"], NOW)


def test_revoking_the_root_key_without_replacement_is_refused_before_writing(
    repo: TufRepository, keys: dict[str, CryptoSigner]
) -> None:
    with pytest.raises(TufRepositoryError, match="below its threshold"):
        repo.revoke_key("root", keys["root"].public_key.keyid, keys["root"], NOW)
    assert repo.root_version() == 1


def test_a_wrong_root_key_is_refused(repo: TufRepository) -> None:
    with pytest.raises(TufRepositoryError, match="not a root key"):
        repo.rotate_key("targets", CryptoSigner.generate_ed25519(), _keys()["root"], NOW)
    assert repo.root_version() == 1


def test_a_wrong_online_key_is_refused_before_anything_is_written(
    repo: TufRepository, keys: dict[str, CryptoSigner]
) -> None:
    stale = TufRepository(repo.repo_dir, {**repo.signers, "targets": _keys()["targets"]})
    with pytest.raises(TufRepositoryError, match="not a key of the targets role in root v1"):
        stale.add_targets([("m/1/a", b"a", {})], NOW)
    assert _md(repo, "timestamp.json").signed.version == 1
    assert not repo.targets_dir.exists()


def test_root_bytes_and_targets_role_keys(
    repo: TufRepository, keys: dict[str, CryptoSigner]
) -> None:
    v1 = repo.root_bytes()
    repo.rotate_key("targets", CryptoSigner.generate_ed25519(), keys["root"], NOW)
    assert repo.root_bytes(1) == v1
    assert json.loads(repo.root_bytes())["signed"]["version"] == 2
    assert [k.keyid for k in repo.targets_role_keys()] == [repo.signers["targets"].public_key.keyid]
    with pytest.raises(TufRepositoryError, match="no root version 7"):
        repo.root_bytes(7)


@pytest.mark.parametrize(
    "name", ["root.json", "../keys/root.pem", "0.root.json", "1.root.json.tmp", "1.foo.json"]
)
def test_only_metadata_files_are_served(repo: TufRepository, name: str) -> None:
    assert repo.metadata_file(name) is None
    assert repo.metadata_file("1.root.json") is not None


@pytest.mark.parametrize("path", ["../metadata/1.root.json", "m/1/a", "m/../../x", ""])
def test_only_hashed_target_files_are_served(repo: TufRepository, path: str) -> None:
    assert repo.target_file(path) is None


def test_metadata_types(repo: TufRepository) -> None:
    _, targets, snap, ts = _current(repo)
    assert isinstance(targets.signed, Targets)
    assert isinstance(snap.signed, Snapshot)
    assert isinstance(ts.signed, Timestamp)
