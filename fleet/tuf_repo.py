"""The fleet's TUF repository on disk: sign releases, keep timestamps fresh, rotate keys.

A thin adapter over python-tuf's metadata API and one directory::

    repo/metadata/1.root.json, 2.root.json, ...   every root version (devices walk the chain)
    repo/metadata/N.targets.json                  consistent snapshots: versioned targets
    repo/metadata/N.snapshot.json                 ... and snapshot
    repo/metadata/timestamp.json                  the only unversioned file; written last
    repo/targets/<model>/<version>/<sha256>.<file> target files, named by content hash

Served as is over HTTP (metadata base URL ``.../metadata/``, targets base URL ``.../targets/``),
this is what ``tuf.ngclient`` expects with ``consistent_snapshot`` on. Every write is atomic
(temp file, fsync, ``os.replace``) and a publish writes target files, then targets, snapshot and
timestamp metadata, so a reader or a crash never sees a half-published release: the current
state is what ``timestamp.json`` points to. Write operations hold an exclusive lock on
``repo/.lock``, so the web app, the scheduler and the CLI can share one repository.

The root key is offline: operations that change the root take it as an argument. Online keys
(targets, snapshot, timestamp) are given at construction. Time is passed in (``now``).

This module does not serve HTTP (the fleet app does, with :meth:`TufRepository.metadata_file`
and :meth:`TufRepository.target_file`), does not read key files (:mod:`fleet.keys`) and does
not build releases from bundles (:mod:`protocol.release` says what a release's targets are).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.atomic import write_atomic
from fleet.errors import (
    TargetConflictError,
    TufRepositoryError,
    TufRepositoryNotInitializedError,
)
from protocol.canonical import canonical_json
from protocol.errors import ProtocolError

logger = logging.getLogger(__name__)

ROOT, TARGETS, SNAPSHOT, TIMESTAMP = Root.type, Targets.type, Snapshot.type, Timestamp.type
ONLINE_ROLES = (TARGETS, SNAPSHOT, TIMESTAMP)
TOP_LEVEL_ROLES = (ROOT, *ONLINE_ROLES)
# Compact: no whitespace, so no byte of a served file is insignificant.
_SERIALIZER = JSONSerializer(compact=True)
_VERSIONED = re.compile(r"([1-9][0-9]*)\.(root|targets|snapshot)\.json")
_HASHED_TARGET = re.compile(r"[0-9a-f]{64}\.[^/]+")


@dataclass(frozen=True)
class Expiries:
    """How long each role's metadata is valid, and when the scheduler re-signs it.

    An online role is re-signed once less than ``refresh_fraction`` of its period is left, so
    with the defaults the timestamp (1 day) is re-signed when under 12 hours remain: a job that
    runs every hour or so never lets it lapse.
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    refresh_fraction: float = 0.5

    def period(self, role: str) -> timedelta:
        value = getattr(self, role)
        if not isinstance(value, timedelta):
            raise TufRepositoryError(f"{role!r} is not a TUF role")
        return value

    def margin(self, role: str) -> timedelta:
        return self.period(role) * self.refresh_fraction


@dataclass(frozen=True)
class RoleStatus:
    """What ``fleet keys show`` prints for one role."""

    role: str
    version: int
    expires: datetime
    threshold: int
    keyids: tuple[str, ...]
    signer_keyid: str | None  # the online key this repository holds for the role, if any


@dataclass
class _State:
    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]
    written: list[str] = field(default_factory=list)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC).replace(microsecond=0)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_target_path(path: str) -> None:
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 0x20 for c in path)
    ):
        raise TufRepositoryError(
            f"target path {path!r} must be a plain relative path like 'model/3/model.onnx'"
        )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


class TufRepository:
    """One TUF repository directory, signed with the given online keys."""

    def __init__(
        self,
        repo_dir: Path,
        online_signers: Mapping[str, Signer],
        expiries: Expiries | None = None,
    ) -> None:
        unknown = set(online_signers) - set(ONLINE_ROLES)
        if unknown:
            raise TufRepositoryError(
                f"online signers given for {sorted(unknown)}; only {ONLINE_ROLES} are online "
                "(the root key stays offline and is passed to the operations that need it)"
            )
        self.repo_dir = Path(repo_dir)
        self.signers: dict[str, Signer] = dict(online_signers)
        self.expiries = expiries or Expiries()

    # --- layout ---------------------------------------------------------------------------

    @property
    def metadata_dir(self) -> Path:
        return self.repo_dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.repo_dir / "targets"

    def is_initialized(self) -> bool:
        return (self.metadata_dir / "timestamp.json").is_file()

    def metadata_file(self, name: str) -> Path | None:
        """The file to serve for metadata URL name ``name`` (``timestamp.json``,
        ``3.root.json``...), or None: the HTTP layer answers 404 for None."""
        if name != "timestamp.json" and not _VERSIONED.fullmatch(name):
            return None
        path = self.metadata_dir / name
        return path if path.is_file() else None

    def target_file(self, url_path: str) -> Path | None:
        """The file to serve for target URL path ``model/3/<sha256>.model.onnx``, or None."""
        parts = url_path.split("/")
        if any(p in ("", ".", "..") for p in parts) or not _HASHED_TARGET.fullmatch(parts[-1]):
            return None
        path = self.targets_dir.joinpath(*parts)
        return path if path.is_file() else None

    # --- reading --------------------------------------------------------------------------

    def _require_init(self) -> None:
        if not self.is_initialized():
            raise TufRepositoryNotInitializedError(
                f"{self.repo_dir} holds no TUF repository; create it with "
                f"`fleet keys init --dir KEYS --repo {self.repo_dir}`"
            )

    def _read(self, name: str) -> Metadata[Any]:
        path = self.metadata_dir / name
        try:
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise TufRepositoryError(
                f"{path} is missing although timestamp.json refers to it; restore the "
                "metadata directory from backup"
            ) from None
        except RepositoryError as exc:
            raise TufRepositoryError(f"{path} is not valid TUF metadata ({exc})") from exc

    def root_version(self) -> int:
        """The newest root version in the repository."""
        self._require_init()
        versions = [
            int(m.group(1))
            for p in self.metadata_dir.iterdir()
            if (m := _VERSIONED.fullmatch(p.name)) and m.group(2) == ROOT
        ]
        if not versions:
            raise TufRepositoryError(f"{self.metadata_dir} has no N.root.json")
        return max(versions)

    def root_bytes(self, version: int | None = None) -> bytes:
        """The bytes of root ``version`` (default: the newest). Enrollment hands the newest
        root to a device to pin; the device then follows later rotations on its own."""
        version = self.root_version() if version is None else version
        path = self.metadata_dir / f"{version}.root.json"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise TufRepositoryError(f"the repository has no root version {version}") from None

    def _state(self) -> _State:
        self._require_init()
        root = self._read(f"{self.root_version()}.root.json")
        timestamp = self._read("timestamp.json")
        snapshot = self._read(f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
        targets = self._read(f"{snapshot.signed.meta['targets.json'].version}.targets.json")
        return _State(root, timestamp, snapshot, targets)

    def root(self) -> Root:
        return self._state().root.signed

    def targets(self) -> Targets:
        return self._state().targets.signed

    def targets_role_keys(self) -> list[Key]:
        """The keys of the ``targets`` role in the newest root (desired documents must be
        signed by one of them)."""
        root = self.root()
        return [root.get_key(k) for k in root.roles[TARGETS].keyids]

    def get_target(self, path: str) -> TargetFile | None:
        return self.targets().targets.get(path)

    def status(self) -> list[RoleStatus]:
        """Version, expiry and keys of every top-level role."""
        state = self._state()
        out = []
        for role, md in (
            (ROOT, state.root),
            (TARGETS, state.targets),
            (SNAPSHOT, state.snapshot),
            (TIMESTAMP, state.timestamp),
        ):
            r = state.root.signed.roles[role]
            signer = self.signers.get(role)
            out.append(
                RoleStatus(
                    role=role,
                    version=md.signed.version,
                    expires=md.signed.expires,
                    threshold=r.threshold,
                    keyids=tuple(r.keyids),
                    signer_keyid=signer.public_key.keyid if signer else None,
                )
            )
        return out

    # --- writing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        with open(self.repo_dir / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _signer(self, root: Root, role: str) -> Signer:
        signer = self.signers.get(role)
        if signer is None:
            raise TufRepositoryError(
                f"no {role} key was given to the repository; load the online keys with "
                "fleet.keys.load_online_keys"
            )
        keyids = root.roles[role].keyids
        if signer.public_key.keyid not in keyids:
            raise TufRepositoryError(
                f"the {role} key given (keyid {signer.public_key.keyid[:12]}) is not a key of "
                f"the {role} role in root v{root.version} (keys "
                f"{', '.join(k[:12] for k in keyids)}); use the key file that `fleet keys "
                "rotate` wrote last"
            )
        return signer

    def _write_metadata(self, name: str, md: Metadata[Any], signers: Iterable[Signer]) -> bytes:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        data = md.to_bytes(_SERIALIZER)
        _write_atomic(self.metadata_dir / name, data)
        return data

    def _bump(self, md: Metadata[Any], now: datetime) -> None:
        signed: Signed = md.signed
        signed.version += 1
        signed.expires = now + self.expiries.period(signed.type)

    def _publish(self, state: _State, now: datetime, *, from_role: str) -> list[str]:
        """New versions of ``from_role`` and the roles below it (targets → snapshot →
        timestamp), written in that order so timestamp.json is the last to change."""
        root = state.root.signed
        order = ONLINE_ROLES[ONLINE_ROLES.index(from_role) :]
        signers = {role: self._signer(root, role) for role in order}  # fail before writing
        written = []
        if TARGETS in order:
            self._bump(state.targets, now)
            data = self._write_metadata(
                f"{state.targets.signed.version}.targets.json", state.targets, [signers[TARGETS]]
            )
            state.snapshot.signed.meta["targets.json"] = MetaFile(
                version=state.targets.signed.version,
                length=len(data),
                hashes={"sha256": _sha256(data)},
            )
            written.append(TARGETS)
        if SNAPSHOT in order:
            self._bump(state.snapshot, now)
            data = self._write_metadata(
                f"{state.snapshot.signed.version}.snapshot.json",
                state.snapshot,
                [signers[SNAPSHOT]],
            )
            state.timestamp.signed.snapshot_meta = MetaFile(
                version=state.snapshot.signed.version,
                length=len(data),
                hashes={"sha256": _sha256(data)},
            )
            written.append(SNAPSHOT)
        self._bump(state.timestamp, now)
        self._write_metadata("timestamp.json", state.timestamp, [signers[TIMESTAMP]])
        written.append(TIMESTAMP)
        logger.info(
            "TUF repository %s: signed %s (targets v%d, snapshot v%d, timestamp v%d)",
            self.repo_dir,
            ", ".join(written),
            state.targets.signed.version,
            state.snapshot.signed.version,
            state.timestamp.signed.version,
        )
        return written

    def init(self, root_signer: Signer, now: datetime, *, force: bool = False) -> None:
        """Create root v1 (signed by the offline ``root_signer``) and the first targets,
        snapshot and timestamp. Refuses an existing repository unless ``force``."""
        now = _utc(now)
        with self._locked():
            if self.is_initialized() or any(self.metadata_dir.glob("*.json")):
                if not force:
                    raise TufRepositoryError(
                        f"{self.repo_dir} already holds a TUF repository; devices pinned to "
                        "its root would refuse a new one. Rotate keys instead, or pass --force "
                        "to start over"
                    )
                for old in self.metadata_dir.glob("*.json"):
                    old.unlink()
            root = Root(expires=now + self.expiries.root, consistent_snapshot=True)
            root.add_key(root_signer.public_key, ROOT)
            for role in ONLINE_ROLES:
                if role not in self.signers:
                    raise TufRepositoryError(f"init needs the online {role} key")
                root.add_key(self.signers[role].public_key, role)
            root_md = Metadata(root)
            self._write_metadata("1.root.json", root_md, [root_signer])
            targets, snapshot, timestamp = Targets(), Snapshot(), Timestamp()
            for signed in (targets, snapshot, timestamp):
                signed.version = 0  # _publish bumps every role to version 1
            state = _State(root_md, Metadata(timestamp), Metadata(snapshot), Metadata(targets))
            self._publish(state, now, from_role=TARGETS)
        logger.info("TUF repository %s initialised (root v1)", self.repo_dir)

    def add_targets(
        self, items: Iterable[tuple[str, bytes, Mapping[str, Any]]], now: datetime
    ) -> int:
        """Publish target files with their custom metadata; return the new targets version.

        Each item is ``(target_path, content, custom)``. Target files are written first
        (content-addressed), then new targets, snapshot and timestamp versions. Publishing the
        same content again is a no-op; other content under a published path raises
        :class:`TargetConflictError` (a release is immutable: publish a new model version).
        """
        now = _utc(now)
        items = list(items)
        with self._locked():
            state = self._state()
            targets = state.targets.signed
            new: dict[str, tuple[TargetFile, bytes]] = {}
            for path, content, custom in items:
                _check_target_path(path)
                try:
                    canonical_json(dict(custom))
                except ProtocolError as exc:
                    raise TufRepositoryError(f"custom metadata of {path}: {exc}") from exc
                info = TargetFile(
                    length=len(content),
                    hashes={"sha256": _sha256(content)},
                    path=path,
                    unrecognized_fields={"custom": dict(custom)},
                )
                old = targets.targets.get(path) or (new[path][0] if path in new else None)
                if old is not None:
                    if old == info:
                        continue
                    raise TargetConflictError(
                        f"{path} is already published with other content or metadata; a "
                        "published release never changes: publish a new model version"
                    )
                new[path] = (info, content)
            if not new:
                return targets.version
            for role in ONLINE_ROLES:  # a wrong key fails before any file is written
                self._signer(state.root.signed, role)
            for path, (info, content) in new.items():
                dirname, _, basename = path.rpartition("/")
                dest = self.targets_dir / dirname / f"{info.hashes['sha256']}.{basename}"
                if not dest.is_file():
                    _write_atomic(dest, content)
                targets.targets[path] = info
            self._publish(state, now, from_role=TARGETS)
            return state.targets.signed.version

    def _expiring(self, state: _State, now: datetime) -> str | None:
        for role, md in (
            (TARGETS, state.targets),
            (SNAPSHOT, state.snapshot),
            (TIMESTAMP, state.timestamp),
        ):
            if md.signed.expires - now < self.expiries.margin(role):
                return role
        return None

    def needs_timestamp_refresh(self, now: datetime) -> bool:
        """True when the timestamp (or snapshot or targets) metadata is close to expiry."""
        return self._expiring(self._state(), _utc(now)) is not None

    def refresh_timestamp(self, now: datetime) -> list[str]:
        """Re-sign what is close to expiry (the scheduled job). Returns the roles re-signed;
        re-signing targets or snapshot also re-signs the roles below it."""
        now = _utc(now)
        with self._locked():
            state = self._state()
            role = self._expiring(state, now)
            if role is None:
                return []
            written = self._publish(state, now, from_role=role)
            root_expires = state.root.signed.expires
            if root_expires - now < self.expiries.margin(ROOT):
                logger.warning(
                    "TUF root v%d expires %s: renew it with the offline root key "
                    "(`fleet keys renew-root`)",
                    state.root.signed.version,
                    root_expires.isoformat(),
                )
            return written

    # --- root changes (offline root key) -------------------------------------------------

    def _check_root_signer(self, root: Root, root_signer: Signer) -> None:
        if root_signer.public_key.keyid not in root.roles[ROOT].keyids:
            raise TufRepositoryError(
                f"the root key given (keyid {root_signer.public_key.keyid[:12]}) is not a root "
                f"key of root v{root.version}; use the offline root key of this repository"
            )

    def _new_root(
        self,
        state: _State,
        previous: Root,
        now: datetime,
        signers: list[Signer],
        online_key: tuple[str, Signer] | None = None,
    ) -> int:
        """Write the edited ``state.root`` as the next root version, signed by ``signers``,
        then re-sign every online role (with ``online_key`` if one role's key changed).

        Refuses, before writing anything, a root that devices trusting ``previous`` would
        reject: TUF wants a threshold of the old root's keys and of the new root's keys.
        """
        root_md = state.root
        self._bump(root_md, now)
        version = root_md.signed.version
        root_md.signatures.clear()
        for signer in signers:
            root_md.sign(signer, append=True)
        result = root_md.signed.get_root_verification_result(
            previous, root_md.signed_bytes, root_md.signatures
        )
        if not result.verified:
            raise TufRepositoryError(
                f"root v{version} would not verify: it needs signatures by a threshold of the "
                f"root keys of v{previous.version} and of v{version} (missing "
                f"{result.first.missing} old, {result.second.missing} new); sign with a root "
                "key that stays in the new root, or give a replacement root key"
            )
        signers_after = dict(self.signers)
        if online_key is not None:
            signers_after[online_key[0]] = online_key[1]
        for role in ONLINE_ROLES:
            keyid = signers_after[role].public_key.keyid if role in signers_after else None
            if keyid not in root_md.signed.roles[role].keyids:
                raise TufRepositoryError(
                    f"after this change the repository would hold no valid {role} key to "
                    f"re-sign with; give a replacement {role} key"
                )
        _write_atomic(self.metadata_dir / f"{version}.root.json", root_md.to_bytes(_SERIALIZER))
        logger.info("TUF repository %s: root v%d", self.repo_dir, version)
        self.signers = signers_after
        # Re-sign every online role so that it verifies under the new root (ngclient also
        # drops its trusted timestamp/snapshot when their keys rotate).
        self._publish(state, now, from_role=TARGETS)
        return version

    def rotate_key(self, role: str, new_signer: Signer, root_signer: Signer, now: datetime) -> int:
        """Replace every key of ``role`` with ``new_signer``'s key in a new root version.

        The new root is signed by the current (old) root key, and also by the new key when
        ``role`` is root. For an online role the repository signs with ``new_signer`` from now
        on (the caller saves the key file). Returns the new root version.
        """
        if role not in TOP_LEVEL_ROLES:
            raise TufRepositoryError(f"{role!r} is not a TUF role; use one of {TOP_LEVEL_ROLES}")
        now = _utc(now)
        with self._locked():
            state = self._state()
            root = state.root.signed
            previous = copy.deepcopy(root)
            self._check_root_signer(root, root_signer)
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(new_signer.public_key, role)
            if role == ROOT:
                return self._new_root(state, previous, now, [root_signer, new_signer])
            return self._new_root(state, previous, now, [root_signer], (role, new_signer))

    def revoke_key(
        self,
        role: str,
        keyid: str,
        root_signer: Signer,
        now: datetime,
        replacement: Signer | None = None,
    ) -> int:
        """Remove ``keyid`` from ``role`` in a new root version, adding ``replacement``.

        Refuses to leave the role with fewer keys than its threshold. A revoked root key still
        signs the new root as part of the old root (the TUF rule); ``root_signer`` must be a
        root key of the current root. Returns the new root version.
        """
        if role not in TOP_LEVEL_ROLES:
            raise TufRepositoryError(f"{role!r} is not a TUF role; use one of {TOP_LEVEL_ROLES}")
        now = _utc(now)
        with self._locked():
            state = self._state()
            root = state.root.signed
            previous = copy.deepcopy(root)
            self._check_root_signer(root, root_signer)
            keyids = list(root.roles[role].keyids)
            matches = [k for k in keyids if k.startswith(keyid)] if len(keyid) >= 8 else []
            if len(matches) != 1:
                raise TufRepositoryError(
                    f"{keyid!r} names {'no' if not matches else 'more than one'} key of the "
                    f"{role} role in root v{root.version}; its keys are "
                    f"{', '.join(keyids)} (give at least 8 characters)"
                )
            full = matches[0]
            remaining = len(keyids) - 1 + (1 if replacement is not None else 0)
            if remaining < root.roles[role].threshold:
                raise TufRepositoryError(
                    f"revoking {full[:12]} would leave the {role} role with {remaining} key(s), "
                    f"below its threshold {root.roles[role].threshold}: give a replacement key "
                    f"(`fleet keys revoke` makes one) or use `fleet keys rotate {role}`"
                )
            root.revoke_key(full, role)
            signers = [root_signer]
            online_key = None
            if replacement is not None:
                root.add_key(replacement.public_key, role)
                if role == ROOT:
                    signers.append(replacement)
                else:
                    online_key = (role, replacement)
            return self._new_root(state, previous, now, signers, online_key)

    def renew_root(self, root_signer: Signer, now: datetime) -> int:
        """A new root version with the same keys and a fresh expiry. Returns its version."""
        now = _utc(now)
        with self._locked():
            state = self._state()
            self._check_root_signer(state.root.signed, root_signer)
            previous = copy.deepcopy(state.root.signed)
            return self._new_root(state, previous, now, [root_signer])
