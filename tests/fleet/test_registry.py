"""The registry and release service on a real SQLite file and TUF repository (no HTTP): versions
only grow per model, targets carry the release's custom metadata, files are content-addressed;
the scheduler's timestamp job; and the ``fleet release`` CLI against the app on real HTTP."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlite_utils import Database

from fleet.audit import Actor
from fleet.bundle_upload import pack
from fleet.cli import main
from fleet.errors import ReleaseSigningUnavailableError, ReleaseVersionError
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.registry import ArtifactStore, ModelRegistry, ReleaseService
from fleet.scheduler import REFRESH_TIMESTAMP, build_scheduler, refresh_interval, refresh_timestamp
from fleet.settings import FleetSettings
from fleet.store import connect, migrate
from fleet.tuf_repo import TufRepository
from protocol.bundle import parse_bundle, sha256_hex
from protocol.release import TargetKind, artifact_custom, release_targets

BUNDLES = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier"
ACTOR = Actor.cli("pytest")


@pytest.fixture
def repo(settings: FleetSettings, clock: Callable[[], datetime]) -> TufRepository:
    signers = init_key_dir(settings.keys_dir)
    repo = TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES})
    repo.init(signers[ROOT], clock())
    return repo


@pytest.fixture
def db(settings: FleetSettings) -> Iterator[Database]:
    with closing(connect(settings.db_path)) as conn:
        migrate(conn)
        yield conn


def renamed(
    tmp_path: Path, version: int, name: str | None = None, new_version: int | None = None
) -> Path:
    """A copy of a committed bundle under another name and/or version (bundle.json lists no
    hash of itself, so its file hashes still hold)."""
    dest = tmp_path / f"{name or 'same'}-{version}-{new_version}"
    shutil.copytree(BUNDLES / str(version), dest)
    doc = json.loads((dest / "bundle.json").read_text())
    doc["name"] = name or doc["name"]
    doc["version"] = new_version or doc["version"]
    (dest / "bundle.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    return dest


def publish(db: Database, settings: FleetSettings, bundle: Path, now: datetime) -> int:
    meta = parse_bundle((bundle / "bundle.json").read_bytes())
    release, _ = ReleaseService(db, settings).publish(bundle, meta, ACTOR, now)
    return release.version


def test_versions_only_grow_per_model(
    db: Database,
    settings: FleetSettings,
    repo: TufRepository,
    clock: Callable[[], datetime],
    tmp_path: Path,
) -> None:
    now = clock()
    assert publish(db, settings, BUNDLES / "2", now) == 2
    for lower in (BUNDLES / "2", BUNDLES / "1"):
        with pytest.raises(ReleaseVersionError, match="latest release pdm-classifier v2"):
            publish(db, settings, lower, now)
    # another model name has its own sequence
    assert publish(db, settings, renamed(tmp_path, 1, name="pump-classifier"), now) == 1
    assert publish(db, settings, renamed(tmp_path, 1, new_version=7), now) == 7
    registry = ModelRegistry(db)
    assert [(m.name, m.latest_version, m.releases) for m in registry.models()] == [
        ("pdm-classifier", 7, 2),
        ("pump-classifier", 1, 1),
    ]
    assert [r.version for r in registry.releases("pdm-classifier")] == [7, 2]
    # the refused uploads left no rows and no audit entries
    audit = [r["target"] for r in db.query("SELECT target FROM audit ORDER BY id")]
    assert audit == ["pdm-classifier/2", "pump-classifier/1", "pdm-classifier/7"]


def test_published_targets_carry_the_release_metadata(
    db: Database,
    settings: FleetSettings,
    repo: TufRepository,
    clock: Callable[[], datetime],
) -> None:
    before = repo.targets().version
    publish(db, settings, BUNDLES / "1", clock())
    meta = parse_bundle((BUNDLES / "1" / "bundle.json").read_bytes())
    targets = repo.targets()
    assert targets.version == before + 1
    expected = release_targets(meta)
    assert set(targets.targets) == {t.path for t in expected}
    for t in expected:
        info = targets.targets[t.path]
        assert info.hashes["sha256"] == meta.files[t.bundle_file][0]
        assert info.length == meta.files[t.bundle_file][1]
        if t.kind is TargetKind.ARTIFACT:
            custom = artifact_custom(meta, meta.artifact(t.bundle_file))
            assert info.unrecognized_fields["custom"] == custom
    release = ModelRegistry(db).get("pdm-classifier", 1)
    assert release.targets_version == targets.version
    assert {f.target_path for f in release.files} == {t.path for t in expected}
    assert release.metadata_sha256 == sha256_hex((BUNDLES / "1" / "bundle.json").read_bytes())
    # every file in the content-addressed store, bundle.json included
    store = ArtifactStore(settings.artifacts_dir)
    for sha, length in meta.files.values():
        assert store.path(sha).stat().st_size == length
    assert store.path(release.metadata_sha256).is_file()


def test_the_artifact_store_is_content_addressed(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    digest = store.put(b"weights")
    assert digest == sha256_hex(b"weights") and store.path(digest).read_bytes() == b"weights"
    mtime = store.path(digest).stat().st_mtime_ns
    assert store.put(b"weights") == digest and store.path(digest).stat().st_mtime_ns == mtime
    assert not [p for p in store.root.rglob(".*")]  # no temp files left


def test_publishing_without_keys_says_how_to_make_them(
    db: Database, settings: FleetSettings, clock: Callable[[], datetime]
) -> None:
    with pytest.raises(ReleaseSigningUnavailableError, match="fleet keys init"):
        publish(db, settings, BUNDLES / "1", clock())
    assert ModelRegistry(db).models() == []


# --- the scheduler ----------------------------------------------------------------------------


def test_the_timestamp_job_re_signs_before_expiry(
    settings: FleetSettings, repo: TufRepository, clock: Callable[[], datetime]
) -> None:
    now = clock()
    version = repo.status()[-1].version
    assert refresh_timestamp(settings, now + timedelta(hours=1)) == []
    # under half the timestamp's day left: re-signed, with a fresh expiry
    later = now + timedelta(hours=13)
    assert refresh_timestamp(settings, later) == ["timestamp"]
    timestamp = repo.status()[-1]
    assert timestamp.version == version + 1
    assert timestamp.expires == (later + settings.timestamp_expiry).replace(microsecond=0)
    assert refresh_timestamp(settings, later) == []
    # a week on, snapshot too
    assert refresh_timestamp(settings, now + timedelta(days=5)) == ["snapshot", "timestamp"]


def test_the_timestamp_job_skips_a_fleet_without_repository_or_keys(
    settings: FleetSettings,
    repo: TufRepository,
    clock: Callable[[], datetime],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    bare = settings.model_copy(update={"data_dir": tmp_path / "empty"})
    assert refresh_timestamp(bare, clock() + timedelta(days=2)) == []
    (settings.keys_dir / "timestamp.pem").unlink()
    with caplog.at_level(logging.ERROR, logger="fleet.scheduler"):
        assert refresh_timestamp(settings, clock() + timedelta(days=2)) == []
    assert "timestamp.pem" in caplog.text


def test_the_job_is_registered_and_the_app_runs_the_scheduler(
    settings: FleetSettings, app: FastAPI, live: str, clock: Callable[[], datetime]
) -> None:
    scheduler = build_scheduler(settings, clock)
    job = scheduler.get_job(REFRESH_TIMESTAMP)
    assert job is not None
    assert job.trigger.interval == refresh_interval(settings) == timedelta(minutes=10)
    running = app.state.scheduler
    assert running.running and running.get_job(REFRESH_TIMESTAMP) is not None
    short = settings.model_copy(update={"timestamp_expiry": timedelta(minutes=2)})
    assert refresh_interval(short) == timedelta(seconds=30)


# --- the CLI ----------------------------------------------------------------------------------


def test_release_cli_uploads_lists_and_shows(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    repo: TufRepository,
    live: str,
    mint: Callable[[str], dict[str, str]],
    tmp_path: Path,
) -> None:
    operator = mint("operator")["Authorization"].removeprefix("Bearer ")
    monkeypatch.setenv("EDGEFLEET_SERVER", live)
    monkeypatch.setenv("EDGEFLEET_TOKEN", operator)
    assert main(["release", "upload", str(BUNDLES / "1")]) == 0
    out = capsys.readouterr().out
    assert "published pdm-classifier v1" in out and "pdm-classifier/1/model.int8.tflite" in out
    # refused: exit 2 with the server's reason
    assert main(["release", "upload", str(BUNDLES / "1")]) == 2
    assert "HTTP 409" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(BUNDLES / "2", broken)
    (broken / "model.int8.tflite").write_bytes(b"\0" * 100)
    assert main(["release", "upload", str(broken)]) == 2
    assert "model.int8.tflite" in capsys.readouterr().err
    assert main(["release", "upload", str(tmp_path)]) == 2
    assert "not a bundle directory" in capsys.readouterr().err

    viewer = mint("viewer")["Authorization"].removeprefix("Bearer ")
    assert main(["release", "list", "--token", viewer]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].split()[:3] == ["pdm-classifier", "1", "published"]
    assert main(["release", "show", "pdm-classifier", "1", "--token", viewer]) == 0
    out = capsys.readouterr().out
    assert "golden_atol" in out and "onnxruntime int8" in out
    assert main(["release", "show", "pdm-classifier", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert main(["release", "show", "pdm-classifier", "3"]) == 2
    assert "no release pdm-classifier v3" in capsys.readouterr().err
    monkeypatch.delenv("EDGEFLEET_TOKEN")
    assert main(["release", "list"]) == 2
    assert "EDGEFLEET_TOKEN" in capsys.readouterr().err


def test_upload_over_http_answers_503_without_keys(
    http: httpx.Client, operator: dict[str, str], settings: FleetSettings
) -> None:
    r = http.post(
        "/v1/models",
        content=pack(BUNDLES / "1"),
        headers={**operator, "Content-Type": "application/gzip"},
    )
    assert r.status_code == 503 and "fleet keys init" in r.json()["detail"]
    assert not any((settings.data_dir / "uploads").iterdir())
