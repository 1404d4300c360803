"""A fleet database for rollout tests: the committed bundles published as releases v1 and v2
(real keys, real TUF repository, real golden replay), devices in the registry, and device
reports written through the real ingestion path (:class:`fleet.ingest_writer.BatchWriter`).

Imported by the rollout test modules (pytest's importlib mode lets a test import a sibling
module by path only through ``importlib``; see :func:`load`)."""

from __future__ import annotations

import hashlib
import shutil
from collections import defaultdict
from contextlib import closing
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlite_utils import Database

from fleet.audit import Actor
from fleet.bundle_upload import pack
from fleet.ingest_writer import BatchWriter, Received
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir
from fleet.registry import ReleaseService
from fleet.settings import FleetSettings
from fleet.store import connect, iso, migrate
from fleet.tuf_repo import TufRepository
from protocol.bodies import ActiveModel, HeartbeatBody, Latency, ModelRef, StateBody, UpdateBody
from protocol.drift import WindowCounts, summarize
from protocol.messages import Envelope, encode
from protocol.reference import ReferenceProfile
from protocol.topics import TopicKind, device_topic

BUNDLES = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier"
MODEL = "pdm-classifier"
PROFILE = "x86_64-gateway"
UPDATE_STEPS = ("idle", "downloading", "verifying", "installing", "health_check", "activating")


def publish_releases(settings: FleetSettings, now: datetime, work: Path) -> None:
    """Keys, TUF repository and releases v1, v2 of the committed bundles, in settings' dirs."""
    signers = init_key_dir(settings.keys_dir)
    repo = TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES})
    repo.init(signers[ROOT], now)
    with closing(connect(settings.db_path)) as db:
        migrate(db)
        for version in ("1", "2"):
            archive = work / f"{version}.tar.gz"
            archive.write_bytes(pack(BUNDLES / version))
            ReleaseService(db, settings).upload(
                archive, work / f"unpacked-{version}", Actor.cli("pytest"), now
            )
            shutil.rmtree(work / f"unpacked-{version}", ignore_errors=True)


def add_device(db: Database, device_id: str, now: datetime, group: str | None = None) -> None:
    db.table("devices").insert(
        {
            "id": device_id,
            "public_key": hashlib.sha256(device_id.encode()).hexdigest(),
            "profile": PROFILE,
            "facts": "{}",
            "agent_version": "0.1.0",
            "group_name": group,
            "tags": "[]",
            "enrolled_at": iso(now),
            "status": "active",
            "mqtt_username": device_id,
        }
    )
    db.conn.commit()


class Reports:
    """Device reports through the ingestion path; each device's seq grows like an agent's."""

    def __init__(self, db: Database, settings: FleetSettings) -> None:
        self.db = db
        self.writer = BatchWriter()
        self.seq: dict[str, int] = defaultdict(int)
        self.rng = np.random.default_rng(7)
        with closing(connect(settings.db_path)) as conn:
            sha = conn.execute(
                "SELECT f.sha256 FROM release_artifacts f JOIN releases r ON r.id = f.release_id "
                "WHERE r.model = ? AND f.kind = 'reference' ORDER BY r.version",
                [MODEL],
            ).fetchall()
        self.reference_sha = {1: sha[0][0], 2: sha[1][0]}
        self.reference = {
            v: ReferenceProfile.from_json(
                (BUNDLES / str(v) / "reference_profile.json").read_bytes()
            )
            for v in (1, 2)
        }

    def send(self, kind: TopicKind, device: str, body: object, now: datetime) -> None:
        self.seq[device] += 1
        env = Envelope(kind, device, self.seq[device], now.timestamp(), body)  # type: ignore[arg-type]
        result = self.writer.write(
            self.db, [Received(device_topic(device, kind), encode(env))], now
        )
        assert not result.rejected, result.rejected

    def state(self, device: str, version: int, now: datetime) -> None:
        model = ActiveModel(MODEL, version, "a", "onnxruntime")
        self.send(TopicKind.STATE, device, StateBody(True, "0.1.0", PROFILE, model), now)

    def update(
        self,
        device: str,
        version: int,
        to: str,
        now: datetime,
        *,
        rollback: bool = False,
        frm: str | None = None,
        reason: str | None = None,
    ) -> None:
        """The transitions up to ``to`` as an agent reports them."""
        path = [*UPDATE_STEPS, "trial", "committed"]
        if to in path:
            steps = path[: path.index(to) + 1]
        else:
            steps = [*path[: path.index(frm or "trial") + 1], to]
        for a, b in zip(steps, steps[1:], strict=False):
            body = UpdateBody(
                ModelRef(MODEL, version), rollback, a, b, 1, reason if b == to else None
            )
            self.send(TopicKind.UPDATE, device, body, now)
        if to == "committed":
            self.state(device, version, now)

    def heartbeat(self, device: str, version: int, p95: float, now: datetime) -> None:
        body = HeartbeatBody(
            100.0,
            5.0,
            10,
            10,
            10,
            0,
            0,
            100,
            0,
            Latency(p95 / 2, p95, p95 * 1.2),
            ModelRef(MODEL, version),
        )
        self.send(TopicKind.HEARTBEAT, device, body, now)

    def drift(
        self, device: str, version: int, classes: tuple[float, ...], n: int, now: datetime
    ) -> None:
        """One drift window of ``n`` rows: inputs like the reference, outputs drawn from
        ``classes`` (probabilities)."""
        ref = self.reference[version]
        counts = []
        for f in ref.features:
            p = np.asarray(f.counts, dtype=float) + 1.0
            counts.extend(int(c) for c in self.rng.multinomial(n, p / p.sum()))
        nf = len(ref.features)
        window = WindowCounts(
            model_name=MODEL,
            model_version=version,
            reference_sha256=self.reference_sha[version],
            start=now.timestamp() - 60,
            end=now.timestamp(),
            n=n,
            feature_names=tuple(f.name for f in ref.features),
            bins=tuple(len(f.counts) for f in ref.features),
            counts=np.asarray(counts),
            sums=np.zeros(nf),
            sumsqs=np.zeros(nf),
            missing=np.zeros(nf, dtype=np.int64),
            class_counts=self.rng.multinomial(n, np.asarray(classes)),
        )
        self.send(TopicKind.DRIFT, device, summarize(window, ref), now)
