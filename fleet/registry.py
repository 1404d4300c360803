"""The model registry and the release service: validated bundles become signed releases.

A *release* is one model version: its artifacts, reference profile, golden sets and health
thresholds (its ``bundle.json``), recorded in the ``models``/``releases``/``release_artifacts``
tables. Releases are immutable and a model's versions only grow: :meth:`ReleaseService.publish`
refuses a version not greater than the model's latest (naming the latest).

Publishing, in one ``BEGIN IMMEDIATE`` transaction (so two uploads of one model serialise):
check the version, copy every bundle file into the content-addressed :class:`ArtifactStore`
(``<data_dir>/artifacts/sha256/ab/abcd...``, atomic writes), add the release's targets
(:func:`protocol.release.release_targets`, with their custom metadata) to the TUF repository,
which re-signs targets, snapshot and timestamp, then insert the rows and the
``release.publish`` audit entry. If the database write fails after signing, the TUF targets
stay; publishing the same bundle again is then a no-op for TUF and completes the record.

This module neither unpacks nor validates uploads (:mod:`fleet.bundle_upload`) nor serves files
(:mod:`fleet.routes.repository`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from agent.atomic import write_atomic
from fleet.audit import Actor, AuditLog
from fleet.bundle_upload import UploadLimits, unpack, validate
from fleet.errors import (
    ReleaseNotFoundError,
    ReleaseSigningUnavailableError,
    ReleaseVersionError,
    SigningKeyError,
)
from fleet.keys import load_online_keys
from fleet.settings import FleetSettings
from fleet.store import from_iso, immediate, iso, to_json
from fleet.tuf_repo import Expiries, TufRepository
from protocol.bundle import METADATA_FILE, BundleMetadata, parse_bundle
from protocol.release import TargetKind, release_targets

log = logging.getLogger(__name__)


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseFile:
    """One published file of a release: an artifact, a golden set or the reference profile."""

    file: str
    kind: TargetKind
    target_path: str
    sha256: str
    length: int
    format: str | None = None
    runtime: str | None = None
    quantization: str | None = None
    profiles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Release:
    model: str
    version: int
    status: str  # published | withdrawn
    created_at: datetime
    created_by: str
    created_by_name: str
    targets_version: int | None
    metadata_sha256: str
    metadata: dict[str, Any]  # the bundle.json as uploaded
    files: tuple[ReleaseFile, ...]


@dataclass(frozen=True)
class ModelSummary:
    name: str
    latest_version: int
    releases: int
    created_at: datetime


@dataclass(frozen=True)
class Timings:
    """Seconds spent on one upload, for the response and the log."""

    unpack: float = 0.0
    validate: float = 0.0
    sign: float = 0.0


@dataclass(frozen=True)
class PublishedRelease:
    """What an upload answers: the release and where the time went."""

    release: Release
    timings: Timings


# --- the artifact store -----------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Content-addressed files under ``root``: ``sha256/<first two hex>/<sha256>``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` (atomically; a no-op when already there); return its sha256."""
        digest = sha256_hex(data)
        dest = self.path(digest)
        if dest.is_file() and dest.stat().st_size == len(data):
            return digest
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, data)
        return digest


# --- the TUF repository with the online keys --------------------------------------------------


def signing_repository(settings: FleetSettings) -> TufRepository:
    """The fleet's TUF repository with its online keys, read now (so `fleet keys init` or a key
    rotation on a running server takes effect at once)."""
    try:
        signers = load_online_keys(settings.keys_dir)
    except SigningKeyError as exc:
        raise ReleaseSigningUnavailableError(
            f"cannot sign releases: {exc} (the fleet's online keys live in {settings.keys_dir})"
        ) from exc
    repo = TufRepository(
        settings.tuf_dir, dict(signers), Expiries(timestamp=settings.timestamp_expiry)
    )
    if not repo.is_initialized():
        raise ReleaseSigningUnavailableError(
            f"{settings.tuf_dir} holds no TUF repository; run `fleet keys init --dir "
            f"{settings.keys_dir} --repo {settings.tuf_dir}` first"
        )
    return repo


# --- the registry -----------------------------------------------------------------------------


def _file(row: dict[str, Any]) -> ReleaseFile:
    return ReleaseFile(
        file=row["file"],
        kind=TargetKind(row["kind"]),
        target_path=row["target_path"],
        sha256=row["sha256"],
        length=int(row["length"]),
        format=row["format"],
        runtime=row["runtime"],
        quantization=row["quantization"],
        profiles=tuple(json.loads(row["profiles"])),
    )


class ModelRegistry:
    """Reads and writes of the registry tables on one connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def latest_version(self, model: str) -> int | None:
        row = self.db.execute("SELECT max(version) FROM releases WHERE model = ?", [model])
        value = row.fetchone()[0]
        return None if value is None else int(value)

    def models(self) -> list[ModelSummary]:
        rows = self.db.query(
            "SELECT m.name, m.created_at, max(r.version) AS latest, count(r.id) AS n "
            "FROM models m LEFT JOIN releases r ON r.model = m.name "
            "GROUP BY m.name ORDER BY m.name"
        )
        return [
            ModelSummary(r["name"], int(r["latest"] or 0), int(r["n"]), from_iso(r["created_at"]))
            for r in rows
        ]

    def releases(self, model: str | None = None) -> list[Release]:
        """Every release (of ``model``), newest version first within a model."""
        where, params = ("WHERE model = ?", [model]) if model else ("", [])
        rows = list(
            self.db.query(f"SELECT * FROM releases {where} ORDER BY model, version DESC", params)
        )
        if model and not rows and not self._model_exists(model):
            raise ReleaseNotFoundError(
                f"no model {model!r}; GET /v1/models lists the models (`fleet release list`)"
            )
        return [self._release(r) for r in rows]

    def get(self, model: str, version: int) -> Release:
        rows = list(
            self.db.query(
                "SELECT * FROM releases WHERE model = ? AND version = ?", [model, version]
            )
        )
        if not rows:
            latest = self.latest_version(model)
            hint = f"its latest is v{latest}" if latest else "there is no such model"
            raise ReleaseNotFoundError(
                f"no release {model} v{version} ({hint}); `fleet release list` shows releases"
            )
        return self._release(rows[0])

    def _model_exists(self, model: str) -> bool:
        found = self.db.execute("SELECT 1 FROM models WHERE name = ?", [model]).fetchone()
        return found is not None

    def _release(self, row: dict[str, Any]) -> Release:
        files = self.db.query(
            "SELECT * FROM release_artifacts WHERE release_id = ? ORDER BY kind, file", [row["id"]]
        )
        return Release(
            model=row["model"],
            version=int(row["version"]),
            status=row["status"],
            created_at=from_iso(row["created_at"]),
            created_by=row["created_by"],
            created_by_name=row["created_by_name"],
            targets_version=row["targets_version"],
            metadata_sha256=row["metadata_sha256"],
            metadata=json.loads(row["metadata"]),
            files=tuple(_file(f) for f in files),
        )

    def check_version(self, meta: BundleMetadata) -> None:
        """Refuse a version not greater than the model's latest (:class:`ReleaseVersionError`)."""
        latest = self.latest_version(meta.name)
        if latest is not None and meta.version <= latest:
            raise ReleaseVersionError(
                f"{meta.name} v{meta.version} is not newer than the latest release "
                f"{meta.name} v{latest}; model versions only grow: rebuild the bundle as "
                f"v{latest + 1} or higher"
            )

    def insert(
        self,
        meta: BundleMetadata,
        metadata_json: bytes,
        files: list[ReleaseFile],
        targets_version: int,
        actor: Actor,
        now: datetime,
    ) -> None:
        """Insert the release rows (call inside the publishing transaction)."""
        if not self._model_exists(meta.name):
            self.db.table("models").insert(
                {"name": meta.name, "created_at": iso(now), "created_by": actor.id}
            )
        release_id = (
            self.db.table("releases")
            .insert(
                {
                    "model": meta.name,
                    "version": meta.version,
                    "metadata": metadata_json.decode("utf-8"),
                    "metadata_sha256": sha256_hex(metadata_json),
                    "status": "published",
                    "targets_version": targets_version,
                    "created_at": iso(now),
                    "created_by": actor.id,
                    "created_by_name": actor.name,
                }
            )
            .last_pk
        )
        self.db.table("release_artifacts").insert_all(
            {
                "release_id": release_id,
                "file": f.file,
                "kind": f.kind.value,
                "target_path": f.target_path,
                "sha256": f.sha256,
                "length": f.length,
                "format": f.format,
                "runtime": f.runtime,
                "quantization": f.quantization,
                "profiles": to_json(list(f.profiles)),
            }
            for f in files
        )


# --- publishing -------------------------------------------------------------------------------


class ReleaseService:
    """Publish validated bundles as releases (see the module docstring)."""

    def __init__(self, db: Database, settings: FleetSettings) -> None:
        self.db = db
        self.settings = settings
        self.registry = ModelRegistry(db)
        self.store = ArtifactStore(settings.artifacts_dir)

    def upload(self, archive: Path, work: Path, actor: Actor, now: datetime) -> PublishedRelease:
        """Unpack the ``.tar.gz`` ``archive`` into the new directory ``work``, validate it and
        publish it. The caller deletes ``work`` afterwards, whatever happens."""
        limits = UploadLimits.from_max_upload(self.settings.limits.max_upload_bytes)
        started = time.perf_counter()
        bundle_dir = unpack(archive, work, limits)
        meta = parse_bundle((bundle_dir / METADATA_FILE).read_bytes())
        self.registry.check_version(meta)  # refuse early, before the golden replay
        unpacked = time.perf_counter()
        validate(bundle_dir)
        validated = time.perf_counter()
        release, signing = self.publish(bundle_dir, meta, actor, now)
        timings = Timings(unpacked - started, validated - unpacked, signing)
        log.info(
            "upload of %s v%d: unpacked in %.3fs, validated in %.3fs, signed in %.3fs",
            meta.name,
            meta.version,
            timings.unpack,
            timings.validate,
            timings.sign,
        )
        return PublishedRelease(release, timings)

    def publish(
        self, bundle_dir: Path, meta: BundleMetadata, actor: Actor, now: datetime
    ) -> tuple[Release, float]:
        """Publish the validated bundle in ``bundle_dir``; return the release and the seconds
        spent signing. Raises :class:`ReleaseVersionError` for a version not greater than the
        latest, :class:`ReleaseSigningUnavailableError` without keys or repository."""
        metadata_json = (bundle_dir / METADATA_FILE).read_bytes()
        blobs = {rel: (bundle_dir / rel).read_bytes() for rel in meta.files}
        repo = signing_repository(self.settings)
        targets = release_targets(meta)
        files = []
        for t in targets:
            sha, length = meta.files[t.bundle_file]
            art = meta.artifact(t.bundle_file) if t.kind is TargetKind.ARTIFACT else None
            files.append(
                ReleaseFile(
                    file=t.bundle_file,
                    kind=t.kind,
                    target_path=t.path,
                    sha256=sha,
                    length=length,
                    format=art.format if art else None,
                    runtime=art.runtime if art else None,
                    quantization=art.quantization if art else None,
                    profiles=art.profiles if art else (),
                )
            )
        with immediate(self.db):
            self.registry.check_version(meta)
            for data in (metadata_json, *blobs.values()):
                self.store.put(data)
            started = time.perf_counter()
            targets_version = repo.add_targets(
                ((t.path, blobs[t.bundle_file], t.custom) for t in targets), now
            )
            signing = time.perf_counter() - started
            self.registry.insert(meta, metadata_json, files, targets_version, actor, now)
            AuditLog(self.db).record(
                actor,
                "release.publish",
                f"{meta.name}/{meta.version}",
                now,
                {
                    "model": meta.name,
                    "version": meta.version,
                    "targets_version": targets_version,
                    "bundle_sha256": sha256_hex(metadata_json),
                    "targets": [t.path for t in targets],
                },
            )
        log.info(
            "published %s v%d as TUF targets v%d (%d files, signed in %.3fs)",
            meta.name,
            meta.version,
            targets_version,
            len(targets),
            signing,
            extra={"model": meta.name, "version": meta.version},
        )
        return self.registry.get(meta.name, meta.version), signing
