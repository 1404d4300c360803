"""The update engine: takes signed desired documents and drives the update state machine.

:class:`Updater` owns one worker thread. ``submit(wire)`` (called from the MQTT handler, returns at
once) hands it the newest desired document; the worker checks it, in this order: the TUF
metadata is refreshed from the pinned root (ngclient), the document's signature is verified
against the ``targets`` keys of that trusted root with its expiry, device id and serial above the
last accepted one (:func:`protocol.desired.verify_desired`); then the version rule and the signed
target's custom metadata (same release, this device's profile, a runtime it has, the size cap).
Any refusal ends in ``failed`` with its reason, reported; the active slot is untouched. Accepted,
the update walks the table of :mod:`agent.update_states`, each state saved in SQLite
(:mod:`agent.update_store`) *before* its action:

* downloading: artifact, golden set and reference profile through the TUF client (device
  credentials, Range resume from ``.part``, retries, hard length cap, hashes);
* verifying: the files on disk against the signed lengths and sha256s kept in the record (so a
  restart needs no network), the golden set and reference profile parsed;
* installing: into the inactive slot (:class:`agent.slots.Slots`, fsynced);
* health_check: golden replay and latency budget in the runtime (:mod:`agent.health_check`);
  when the release's signed ``shadow_samples`` is above 0 the candidate's runtime stays loaded
  and the update goes to shadow, else straight to activating;
* shadow (optional): the active model keeps serving alone; a :class:`agent.shadow.ShadowTap` on
  it copies served rows into a bounded buffer, and this thread runs the candidate (and a private
  copy of the active model, for the latency figure) on the same rows until ``shadow_samples``
  are judged: agreement (argmax equality) below ``min_shadow_agreement`` fails the update, as
  does a shadow that sees too little traffic within ``shadow_max_seconds`` (fail closed); the
  figures go into the report of the transition out of shadow;
* activating: load the new model, switch the slot pointer atomically, swap the inference service
  (no request fails); the previous model stays loaded as the trial's yardstick and rollback;
* trial: sample the new model's counters, latency and predicted classes (against the previous
  model on the same live inputs) and ask :func:`agent.trial.evaluate_trial`;
* committed, or rolling_back -> rolled_back (pointer and service back to the previous slot).

Transient errors (network) retry with exponential backoff inside their state; fatal ones fail
the update or, once the new model may be live, roll it back. At start, :meth:`Updater.start`
counts the start into an unfinished record and :func:`agent.update_states.recover` says where to
pick up. Every transition is reported through ``report`` (the outbox) as an ``UpdateBody``.

A test hook, :class:`PauseHook` (``EDGEFLEET_TEST_PAUSE_IN=<state>`` and
``EDGEFLEET_TEST_PAUSE_MARKER=<file>``), makes the worker write the marker and block right after
saving that state, so a power-loss test can SIGKILL the agent inside any state.

This module does not subscribe to MQTT, build the TUF client or the reporter (the composition
root does), and contains no transition rules of its own.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from agent.errors import AgentError
from agent.health import UpdateFigures
from agent.health_check import run_health_check
from agent.inference import DriftFactory, DriftSink, InferenceService, LoadedModel, load_model
from agent.runtimes import Runtime, RuntimeLoader, load_runtime
from agent.shadow import ShadowStats, ShadowTap, ShadowThresholds, evaluate_shadow, median
from agent.slots import InstalledRelease, Release, SlotError, Slots
from agent.trial import (
    OUTPUT_ALPHA,
    Continue,
    Fail,
    TrialStats,
    TrialThresholds,
    evaluate_trial,
)
from agent.tuf_client import ReleaseClient, ReleaseError
from agent.update_states import (
    MAX_ATTEMPTS,
    TERMINAL,
    Baseline,
    FatalUpdateError,
    Installed,
    RecoveryKind,
    TargetRef,
    TransientUpdateError,
    UpdateError,
    UpdateEvent,
    UpdateRecord,
    UpdateState,
    check_artifact,
    check_version,
    recover,
)
from agent.update_store import UpdateStore
from protocol.canonical import canonical_json
from protocol.desired import DesiredDocument, verify_desired
from protocol.drift import DriftSummary
from protocol.errors import DesiredDocumentError, MessageError, ProtocolError
from protocol.golden import GoldenSet
from protocol.messages import MAX_SEQ, ModelRef, UpdateBody
from protocol.profiles import FirmwareProfile
from protocol.reference import ReferenceProfile
from protocol.release import ArtifactTarget, parse_artifact_custom

log = logging.getLogger(__name__)

S, E = UpdateState, UpdateEvent
PAUSE_ENV = "EDGEFLEET_TEST_PAUSE_IN"
PAUSE_MARKER_ENV = "EDGEFLEET_TEST_PAUSE_MARKER"
Report = Callable[[UpdateBody], object]


@dataclass(frozen=True)
class PauseHook:
    """Test hook: after saving ``state``, write ``marker`` (the state's name) and block."""

    state: str
    marker: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PauseHook | None:
        state, marker = env.get(PAUSE_ENV), env.get(PAUSE_MARKER_ENV)
        if not state or not marker:
            return None
        return cls(UpdateState(state).value, Path(marker))


@dataclass(frozen=True)
class UpdaterConfig:
    downloads_dir: Path  # <state dir>/downloads: one directory per update
    threads: int = 1  # inference threads of the firmware profile
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    max_transient_failures: int = 12  # in a row, then the update fails ("unreachable")
    trial_sample_seconds: float = 1.0
    trial_max_seconds: float = 24 * 3600.0
    max_output_js: float = 0.3
    output_alpha: float = OUTPUT_ALPHA  # the output drift must also be significant at this level
    trial_sample_rows: int = 512  # live rows kept to compare new and previous predictions
    shadow_sample_seconds: float = 0.2  # how often the shadow drains its tap
    shadow_max_seconds: float = 3600.0  # too few live rows by then: the shadow fails closed
    shadow_buffer_rows: int = 1024  # live rows the shadow tap holds between drains
    shadow_timed_rows: int = 64  # per drain, rows both models are timed on one at a time
    max_attempts: int = MAX_ATTEMPTS
    pause: PauseHook | None = None
    runtime_loader: RuntimeLoader = load_runtime  # a simulator shares runtimes among agents


class TrialTap:
    """The new model's drift sink during its life: passes every batch on to the real drift
    accumulator and keeps the last ``size`` input rows with their predicted classes, so the trial
    can run the previous model on the very same live inputs."""

    def __init__(self, inner: DriftSink, size: int) -> None:
        self.inner = inner
        self._rows: collections.deque[tuple[np.ndarray, int]] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        return self.inner.rows

    def add(self, inputs: np.ndarray, predicted: np.ndarray) -> None:
        self.inner.add(inputs, predicted)
        rows = np.array(inputs, dtype=np.float32)  # a copy: the caller reuses its buffer
        with self._lock:
            self._rows.extend(zip(rows, predicted.tolist(), strict=True))

    def close_window(
        self, start: float, end: float, model_name: str, model_version: int, reference_sha256: str
    ) -> DriftSummary:
        return self.inner.close_window(start, end, model_name, model_version, reference_sha256)

    def sample(self) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            rows = list(self._rows)
        if not rows:
            return None
        return np.stack([r for r, _ in rows]), np.asarray([c for _, c in rows])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unverified_claim(wire: bytes) -> tuple[str, int, bool, int]:
    """Model, version, rollback and serial as a refused document *claims* them, for the
    report only (they are not trusted for anything). A claim the report cannot carry (no
    printable model name of at most 128 characters, no integer in ``[0, 2**63)``) reads as
    ``unknown`` / 0, so a forged document can never keep its refusal from being reported."""
    signed: Any = None
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError, RecursionError):
        signed = json.loads(wire)["signed"]
    if not isinstance(signed, dict):
        return "unknown", 0, False, 0

    def count(key: str) -> int:
        value = signed.get(key)
        return value if type(value) is int and 0 <= value <= MAX_SEQ else 0

    claimed: Any = signed.get("model")
    try:
        model = ModelRef(claimed, 0).name
    except MessageError:
        model = "unknown"
    return model, count("model_version"), signed.get("rollback") is True, count("serial")


class Updater:
    """The update engine (see the module docstring)."""

    def __init__(
        self,
        *,
        store: UpdateStore,
        slots: Slots,
        service: InferenceService,
        client: ReleaseClient,
        profile: FirmwareProfile,
        device_id: str,
        report: Report,
        config: UpdaterConfig,
        drift_factory: DriftFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.slots = slots
        self.service = service
        self.client = client
        self.profile = profile
        self.device_id = device_id
        self._report = report
        self.config = config
        self._drift_factory = drift_factory
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: bytes | None = None
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous: LoadedModel | None = None  # swapped out at activation, kept for trial
        self._refused: set[str] = set()  # sha256 of documents refused in this process
        self._candidate: tuple[str, Runtime] | None = None  # health_check -> shadow: slot, runtime
        self._note = ""  # what the current step wants said in its transition's report

    # --- public API ---------------------------------------------------------------------------

    def start(self) -> None:
        """Count this start into an unfinished update, then run the worker (which first
        resumes or reverts that update, then waits for desired documents)."""
        try:
            record = self.store.start()
        except AgentError as exc:  # an unreadable record: keep the active slot, take new ones
            log.error("%s", exc)
            record = None
        self._thread = threading.Thread(
            target=self._run, args=(record,), name="updater", daemon=True
        )
        self._busy = True
        self._thread.start()

    def submit(self, wire: bytes) -> None:
        """Hand a desired document to the worker; the newest one wins. Never blocks."""
        with self._cond:
            self._pending = bytes(wire)
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker at its next wait; an update under way resumes at the next start."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> UpdateRecord | None:
        """The current (or last) update record."""
        return self.store.load()

    def figures(self) -> UpdateFigures | None:
        """The health page's view of the current (or last) update."""
        try:
            record = self.store.load()
        except AgentError as exc:
            return UpdateFigures("unknown", reason=str(exc))
        if record is None:
            return None
        result = ""
        if record.state in TERMINAL:
            result = f"{record.state.value} {record.model} v{record.version}"
        return UpdateFigures(record.state.value, result, record.reason, record.entered_at)

    def wait_settled(self, timeout: float) -> UpdateRecord | None:
        """Block until no document is pending and no update is under way (tests, CLI)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._pending is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the update is still under way: {self.store.load()}")
                self._cond.wait(min(left, 0.2))
        return self.store.load()

    # --- the worker ---------------------------------------------------------------------------

    def _run(self, record: UpdateRecord | None) -> None:
        try:
            self._recover(record)
        except Exception:
            log.exception("recovering the update failed; the active slot is kept")
        while not self._stop.is_set():
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while self._pending is None and not self._stop.is_set():
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
                wire, self._pending = self._pending, None
                self._busy = True
            try:
                if wire is not None:
                    self._handle(wire)
            except Exception:
                log.exception("the update engine failed on a desired document")

    def _recover(self, record: UpdateRecord | None) -> None:
        action = recover(record, self.config.max_attempts)
        if record is None or action.kind is RecoveryKind.NOTHING:
            return
        log.warning(
            "found update %d of %s v%d in %s (attempt %d): %s",
            record.update_id,
            record.model,
            record.version,
            record.state,
            record.attempt,
            action.kind,
        )
        if action.kind is RecoveryKind.RESUME:
            assert action.state is not None
            if action.state is not record.state:
                resumed = replace(record, state=action.state, entered_at=self._clock())
                self._save(record, resumed, "resumed after a restart")
                record = resumed
        elif action.kind is RecoveryKind.ROLL_BACK:
            record = self._move(record, E.ROLL_BACK, action.reason)
        else:
            record = self._move(record, E.FAIL, action.reason)
        self._drive(record)

    def _save(self, before: UpdateRecord, after: UpdateRecord, note: str = "") -> None:
        self.store.save(after)
        self._send(before.state, after, note)
        self._pause(after.state)

    def _move(
        self, record: UpdateRecord, event: UpdateEvent, reason: str = "", note: str = ""
    ) -> UpdateRecord:
        after = record.moved(event, self._clock(), reason)
        self._save(record, after, note)
        log.info(
            "update %d %s v%d: %s -> %s%s",
            after.update_id,
            after.model,
            after.version,
            record.state,
            after.state,
            f" ({reason})" if reason else "",
        )
        return after

    def _send(self, from_state: UpdateState, record: UpdateRecord, note: str = "") -> None:
        reason = record.reason if record.state in (S.FAILED, S.ROLLING_BACK) else ""
        reason = reason or note
        try:
            body = UpdateBody(
                release=ModelRef(record.model, record.version),
                rollback=record.rollback,
                from_state=from_state.value,
                to_state=record.state.value,
                attempt=record.attempt,
                reason=reason[:2000] or None,
                elapsed_s={k: round(v, 6) for k, v in record.elapsed.items()},
            )
            self._report(body)
        except Exception:  # a report that cannot be queued must not stop the update
            log.exception("could not report the update transition to %s", record.state)

    def _pause(self, state: UpdateState) -> None:
        hook = self.config.pause
        if hook is None or hook.state != state.value:
            return
        hook.marker.write_text(state.value)
        log.warning("test hook: paused in %s until the process is killed", state)
        while not self._stop.wait(0.1):
            pass

    def _backoff(self, failures: int) -> bool:
        """Wait before retry ``failures``; False if the engine is stopping."""
        c = self.config
        delay = min(c.retry_max_seconds, c.retry_base_seconds * 2 ** max(0, failures - 1))
        return not self._stop.wait(delay)

    # --- accepting a desired document ---------------------------------------------------------

    def _handle(self, wire: bytes) -> None:
        digest = hashlib.sha256(wire).hexdigest()
        if digest == self.store.last_desired_sha256() or digest in self._refused:
            log.debug("desired document %s… already handled", digest[:12])
            return
        update_id = self.store.next_update_id()
        started = self._clock()  # "idle" in the timings: TUF refresh and document checks
        failures = 0
        while True:
            try:
                doc, accepted = self._accept(wire, update_id, started)
                break
            except TransientUpdateError as exc:
                failures += 1
                if failures < self.config.max_transient_failures and self._backoff(failures):
                    log.info("cannot check the desired document yet (%s); retrying", exc)
                    with self._cond:
                        if self._pending is not None:  # a newer document replaces this one
                            return
                    continue
                if self._stop.is_set():
                    with self._cond:  # hand it back: it is checked again at the next start
                        self._pending = self._pending or wire
                    return
                self._refuse(wire, digest, update_id, exc, started)
                return
            except (UpdateError, DesiredDocumentError) as exc:
                self._refuse(wire, digest, update_id, exc, started)
                return
        if accepted is None:  # already active: remember the serial, nothing to do
            self.store.accept(doc.serial, digest, None)
            log.info("desired %s v%d is already active", doc.model, doc.model_version)
            return
        # saved in downloading together with the accepted serial: a crash leaves both or neither
        record = accepted.moved(E.ACCEPTED, self._clock())
        self.store.accept(doc.serial, digest, record)
        self._send(S.IDLE, record)
        self._pause(record.state)
        self._drive(record)

    def _refuse(
        self, wire: bytes, digest: str, update_id: int, exc: Exception, started: float
    ) -> None:
        reason = getattr(exc, "reason", "refused")
        model, version, rollback, serial = _unverified_claim(wire)
        record = UpdateRecord(
            update_id=update_id,
            model=model,
            version=version,
            rollback=rollback,
            serial=serial,
            target_path="",
            state=S.IDLE,
            started_at=started,
            entered_at=started,
        )
        if not getattr(exc, "transient", False):  # a network give-up is tried again next time
            self._refused.add(digest)
        self._move(record, E.FAIL, f"{reason}: {exc}")

    def _accept(
        self, wire: bytes, update_id: int, started: float
    ) -> tuple[DesiredDocument, UpdateRecord | None]:
        """Check a desired document and its target; the document and the IDLE record of the
        update it starts (None when it names what is already active)."""
        try:
            self.client.refresh()
            root = self.client.trusted_root()
        except ReleaseError as exc:
            raise self._release_error(exc) from exc
        doc = verify_desired(
            wire,
            root,
            datetime.fromtimestamp(self._clock(), UTC),
            device_id=self.device_id,
            last_serial=self.store.last_serial(),
        )
        active = self.slots.active_release()
        installed = (
            None if active is None else Installed(active.release.name, active.release.version)
        )
        if not check_version(doc.model, doc.model_version, doc.rollback, installed):
            return doc, None
        try:
            info = self.client.target_info(doc.target_path)
        except ReleaseError as exc:
            raise self._release_error(exc) from exc
        custom_raw = info.unrecognized_fields.get("custom") or {}
        try:
            custom = parse_artifact_custom(custom_raw)
        except ProtocolError as exc:
            raise FatalUpdateError("bad_target", f"{doc.target_path}: {exc}") from exc
        p = self.profile
        check_artifact(
            doc.model,
            doc.model_version,
            custom.model,
            custom.version,
            custom.profiles,
            custom.runtime,
            info.length,
            p.name,
            p.runtimes,
            p.max_model_bytes,
        )
        refs = [TargetRef(info.path, info.length, info.hashes.get("sha256", ""))]
        for path, sha in (
            (custom.golden_path, custom.golden_sha256),
            (custom.reference_path, custom.reference_sha256),
        ):
            try:
                other = self.client.target_info(path)
            except ReleaseError as exc:
                raise self._release_error(exc) from exc
            if other.hashes.get("sha256") != sha:
                raise FatalUpdateError(
                    "mix_and_match",
                    f"{path} is signed with sha256 {other.hashes.get('sha256', '')[:12]}…, the "
                    f"artifact's metadata names {sha[:12]}…",
                )
            refs.append(TargetRef(other.path, other.length, sha))
        if len({PurePosixPath(r.path).name for r in refs}) != 3 or not all(r.sha256 for r in refs):
            raise FatalUpdateError(
                "bad_target", "artifact, golden set and reference need distinct file names"
            )
        return doc, UpdateRecord(
            update_id=update_id,
            model=doc.model,
            version=doc.model_version,
            rollback=doc.rollback,
            serial=doc.serial,
            target_path=doc.target_path,
            state=S.IDLE,
            started_at=started,
            entered_at=started,
            rollout_id=doc.rollout_id,
            custom_json=canonical_json(dict(custom_raw)).decode(),
            files=tuple(refs),
        )

    @staticmethod
    def _release_error(exc: ReleaseError) -> UpdateError:
        if exc.transient:
            return TransientUpdateError("unreachable", str(exc))
        return FatalUpdateError("verification", str(exc))

    # --- driving the table --------------------------------------------------------------------

    def _drive(self, record: UpdateRecord) -> None:
        steps: dict[UpdateState, Callable[[UpdateRecord], tuple[UpdateEvent, UpdateRecord]]] = {
            S.DOWNLOADING: self._download,
            S.VERIFYING: self._verify,
            S.INSTALLING: self._install,
            S.HEALTH_CHECK: self._health_check,
            S.SHADOW: self._shadow,
            S.ACTIVATING: self._activate,
            S.TRIAL: self._trial,
            S.ROLLING_BACK: self._roll_back,
        }
        failures = 0
        while record.state not in TERMINAL and not self._stop.is_set():
            state = record.state
            self._note = ""
            try:
                event, record = steps[state](record)
                reason = ""
            except TransientUpdateError as exc:
                failures += 1
                if failures < self.config.max_transient_failures:
                    log.info("%s: %s; retry %d", state, exc, failures)
                    if not self._backoff(failures):
                        return  # stopping: the saved state resumes at the next start
                    continue
                event, reason = self._exit_event(state), f"{exc.reason}: {exc}"
            except _Stopped:
                return
            except UpdateError as exc:
                event, reason = self._exit_event(state), f"{exc.reason}: {exc}"
            except (AgentError, ProtocolError, OSError) as exc:
                event, reason = self._exit_event(state), f"{state.value}: {exc}"
            except Exception as exc:  # a bug must not leave a live model without a way back
                log.exception("unexpected error in %s", state)
                event, reason = self._exit_event(state), f"internal error in {state.value}: {exc}"
            failures = 0
            record = self._move(record, event, reason, "" if reason else self._note)
        if record.state in TERMINAL:
            self._finish(record)

    @staticmethod
    def _exit_event(state: UpdateState) -> UpdateEvent:
        return E.ROLL_BACK if state in (S.ACTIVATING, S.TRIAL) else E.FAIL

    def _finish(self, record: UpdateRecord) -> None:
        self._drop_candidate()
        previous, self._previous = self._previous, None
        if previous is not None and previous is not self.service.current():
            self.service.retire(previous)
        shutil.rmtree(self._dir(record), ignore_errors=True)

    # --- the states' actions ------------------------------------------------------------------

    def _dir(self, record: UpdateRecord) -> Path:
        return self.config.downloads_dir / str(record.update_id)

    def _file(self, record: UpdateRecord, ref: TargetRef) -> Path:
        return self._dir(record) / PurePosixPath(ref.path).name

    def _custom(self, record: UpdateRecord) -> ArtifactTarget:
        return parse_artifact_custom(json.loads(record.custom_json))

    def _download(self, record: UpdateRecord) -> tuple[UpdateEvent, UpdateRecord]:
        for ref in record.files:
            try:
                self.client.download_target(ref.path, self._file(record, ref))
            except ReleaseError as exc:
                raise self._release_error(exc) from exc
        return E.DOWNLOADED, record

    def _verify(self, record: UpdateRecord) -> tuple[UpdateEvent, UpdateRecord]:
        for ref in record.files:
            path = self._file(record, ref)
            try:
                size = path.stat().st_size
                digest = _sha256_file(path)
            except FileNotFoundError:
                raise FatalUpdateError(
                    "missing_file", f"{path} is gone; the fleet must send the update again"
                ) from None
            if size != ref.length or digest != ref.sha256:
                path.unlink(missing_ok=True)
                raise FatalUpdateError(
                    "corrupt_file",
                    f"{path} has {size} bytes, sha256 {digest[:12]}…; signed: {ref.length} "
                    f"bytes, {ref.sha256[:12]}…",
                )
        custom = self._custom(record)
        _, golden_ref, reference_ref = record.files
        golden = GoldenSet.from_json(self._file(record, golden_ref).read_bytes())
        reference = ReferenceProfile.from_json(self._file(record, reference_ref).read_bytes())
        width = custom.input.shape[-1] if custom.input.shape else None
        if golden.n_features != reference.n_features or (width and width != golden.n_features):
            raise FatalUpdateError(
                "bad_release",
                f"golden set ({golden.n_features}), reference profile ({reference.n_features}) "
                f"and artifact input ({width}) disagree on the feature count",
            )
        active = self.slots.active()
        return E.VERIFIED, replace(record, from_slot=active, to_slot=self.slots.inactive())

    def _install(self, record: UpdateRecord) -> tuple[UpdateEvent, UpdateRecord]:
        custom = self._custom(record)
        artifact, golden, reference = record.files
        profile = ReferenceProfile.from_json(self._file(record, reference).read_bytes())
        names = [PurePosixPath(r.path).name for r in record.files]
        release = Release(
            name=custom.model,
            version=custom.version,
            runtime=custom.runtime,
            format=custom.format,
            quantization=custom.quantization,
            artifact=names[0],
            golden=names[1],
            reference=names[2],
            files={n: r.sha256 for n, r in zip(names, record.files, strict=True)},
            input=custom.input,
            output=custom.output,
            feature_names=tuple(f.name for f in profile.features),
            class_names=tuple(profile.classes),
            profile=self.profile.name,
            health=custom.health,
            source=record.target_path,
        )
        if self.slots.active() != record.from_slot or self.slots.inactive() != record.to_slot:
            raise FatalUpdateError(
                "slots_changed", "the active slot changed under the update; send it again"
            )
        files = {n: self._file(record, r) for n, r in zip(names, record.files, strict=True)}
        self.slots.install(release, files)
        return E.INSTALLED, record

    def _drop_candidate(self) -> None:
        candidate, self._candidate = self._candidate, None
        if candidate is not None:
            candidate[1].close()

    def _health_check(self, record: UpdateRecord) -> tuple[UpdateEvent, UpdateRecord]:
        installed = self._target_slot(record)
        shadow = self._custom(record).health.shadow_samples > 0
        self._drop_candidate()
        runtime = self.config.runtime_loader(
            installed.artifact_path, installed.release.runtime, self.config.threads
        )
        try:
            verdict = run_health_check(
                installed, self.config.threads, self.profile.latency_budget_ms, runtime
            )
        except BaseException:
            runtime.close()
            raise
        if not verdict.passed or not shadow:
            runtime.close()
        if not verdict.passed:
            raise FatalUpdateError("health_check", verdict.reason)
        log.info(
            "health check of %s v%d passed: max error %.3g, p95 %.2f ms",
            record.model,
            record.version,
            verdict.golden.max_abs_error,
            verdict.p95_ms or 0.0,
        )
        if shadow:
            self._candidate = (installed.slot, runtime)  # the shadow runs it; loaded once
            return E.HEALTHY_SHADOW, record
        return E.HEALTHY, record

    def _shadow(self, record: UpdateRecord) -> tuple[UpdateEvent, UpdateRecord]:
        h = self._custom(record).health
        installed = self._target_slot(record)
        candidate, self._candidate = self._candidate, None
        if candidate is not None and candidate[0] == installed.slot:
            runtime = candidate[1]
        else:  # after a restart: load it again from the installed slot
            if candidate is not None:
                candidate[1].close()
            runtime = self.config.runtime_loader(
                installed.artifact_path, installed.release.runtime, self.config.threads
            )
        try:
            active = self.service.current()
            if active is None or active.installed.slot != record.from_slot:
                # nothing serves (a first model, or the active one did not load): there is no
                # model to agree with and no live traffic to run on
                self._note = "shadow skipped: no active model serves on this device to compare with"
                log.warning("%s v%d: %s", record.model, record.version, self._note)
                return E.SHADOWED, record
            thresholds = ShadowThresholds(
                h.shadow_samples, h.min_shadow_agreement, self.config.shadow_max_seconds
            )
            figures = self._run_shadow(runtime, active, thresholds)
        finally:
            runtime.close()
        self._note = f"shadow passed: {figures}"
        log.info("%s v%d %s", record.model, record.version, self._note)
        return E.SHADOWED, record

    def _run_shadow(
        self, candidate: Runtime, active: LoadedModel, thresholds: ShadowThresholds
    ) -> str:
        """Run ``candidate`` beside ``active`` on its live rows until decided; the figures
        (:func:`agent.shadow.describe`) when it passes, :class:`FatalUpdateError` if not."""
        c = self.config
        # a private copy of the active model: the serving one must not be called from here
        # (LiteRT interpreters are not thread-safe), and it times both models on equal terms
        mirror = c.runtime_loader(active.installed.artifact_path, active.release.runtime, c.threads)
        tap = ShadowTap(active.n_features, c.shadow_buffer_rows)
        self.service.add_tap(active, tap)
        rows = agreed = 0
        candidate_s: list[float] = []
        active_s: list[float] = []
        started = time.monotonic()
        try:
            while True:
                tap.want(thresholds.samples - rows)
                self.service.flush_taps(active)
                drained = tap.drain()
                if drained is not None:
                    x, served = drained
                    x, served = x[: thresholds.samples - rows], served[: thresholds.samples - rows]
                    agreed += int((candidate.predict(x).argmax(axis=1) == served).sum())
                    rows += len(x)
                    for i in range(min(len(x), c.shadow_timed_rows)):
                        row = x[i : i + 1]
                        t0 = time.perf_counter()
                        candidate.predict(row)
                        t1 = time.perf_counter()
                        mirror.predict(row)
                        active_s.append(time.perf_counter() - t1)
                        candidate_s.append(t1 - t0)
                cand, act = median(candidate_s), median(active_s)
                stats = ShadowStats(
                    rows,
                    agreed,
                    None if cand is None else cand * 1000.0,
                    None if act is None else act * 1000.0,
                )
                decision = evaluate_shadow(stats, thresholds, time.monotonic() - started)
                if isinstance(decision, Fail):
                    raise FatalUpdateError("shadow", decision.reason)
                if not isinstance(decision, Continue):
                    return decision.note
                if self._stop.wait(c.shadow_sample_seconds):
                    raise _Stopped
        finally:
            self.service.remove_tap(active, tap)
            mirror.close()
            if tap.dropped:
                log.debug("shadow: %d live rows did not fit the tap", tap.dropped)

    def _target_slot(self, record: UpdateRecord) -> InstalledRelease:
        if record.to_slot is None:
            raise FatalUpdateError("slots_changed", "the record names no target slot")
        installed = self.slots.release(record.to_slot)
        if installed is None or (installed.release.name, installed.release.version) != (
            record.model,
            record.version,
        ):
            raise FatalUpdateError(
                "slots_changed",
                f"slot {record.to_slot} does not hold {record.model} v{record.version}",
            )
        return installed

    def _tapped_factory(self) -> DriftFactory | None:
        inner = self._drift_factory
        if inner is None:
            return None
        size = self.config.trial_sample_rows

        def factory(reference: ReferenceProfile) -> DriftSink:
            return TrialTap(inner(reference), size)

        return factory

    def _activate(self, record: UpdateRecord) -> tuple[UpdateEvent, UpdateRecord]:
        installed = self._target_slot(record)
        new = load_model(
            installed,
            self.config.threads,
            self._tapped_factory(),
            loader=self.config.runtime_loader,
        )
        current = self.service.current()
        baseline = record.baseline
        if current is not None and current.installed.slot == record.from_slot:
            st = current.state
            with st.lock:
                baseline = Baseline(st.requests, st.errors, st.latency.stats().p95)
        self.slots.activate(installed.slot)
        old = self.service.swap(new)
        if old is not None:
            if old.installed.slot == record.from_slot and self._previous is None:
                self._previous = old  # kept loaded: the trial's yardstick and rollback
            else:
                self.service.retire(old)
        return E.ACTIVATED, replace(record, baseline=baseline)

    def _previous_runtime(self, record: UpdateRecord) -> tuple[Runtime | None, bool]:
        """A runtime of the previous slot's model (and whether we own it)."""
        if self._previous is not None:
            return self._previous.runtime, False
        if record.from_slot is None:
            return None, False
        installed = self.slots.release(record.from_slot)
        if installed is None:
            return None, False
        try:
            return (
                self.config.runtime_loader(
                    installed.artifact_path, installed.release.runtime, self.config.threads
                ),
                True,
            )
        except AgentError as exc:
            log.warning("cannot load the previous model for the trial comparison: %s", exc)
            return None, False

    def _trial(self, record: UpdateRecord) -> tuple[UpdateEvent, UpdateRecord]:
        model = self.service.current()
        if model is None or model.installed.slot != record.to_slot:
            # after a restart: serve the new slot again (its load failing means roll back)
            model = load_model(
                self._target_slot(record),
                self.config.threads,
                self._tapped_factory(),
                loader=self.config.runtime_loader,
            )
            old = self.service.swap(model)
            if old is not None:
                self.service.retire(old)
        elif not isinstance(model.drift, TrialTap) and self._drift_factory is not None:
            tapped = load_model(
                model.installed,
                self.config.threads,
                self._tapped_factory(),
                loader=self.config.runtime_loader,
            )
            old = self.service.swap(tapped)
            if old is not None:
                self.service.retire(old)
            model = tapped
        h = self._custom(record).health
        thresholds = TrialThresholds(
            soak_seconds=h.trial_seconds,
            min_requests=h.trial_min_requests,
            max_error_rate=h.max_error_rate,
            max_latency_ratio=h.max_latency_ratio,
            max_output_js=self.config.max_output_js,
            output_alpha=self.config.output_alpha,
            max_seconds=max(h.trial_seconds, self.config.trial_max_seconds),
        )
        b = record.baseline
        previous = None if b is None else TrialStats(b.requests, b.errors, b.p95_seconds)
        prev_runtime, owned = self._previous_runtime(record)
        n_classes = len(model.release.class_names)
        started = time.monotonic()
        try:
            while True:
                st = model.state
                with st.lock:
                    if st.drift is not None:
                        st.drift.flush()  # the buffered rows reach the tap
                    new = TrialStats(st.requests, st.errors, st.latency.stats().p95)
                classes_new: tuple[int, ...] = ()
                classes_prev: tuple[int, ...] = ()
                tap = model.drift
                sample = tap.sample() if isinstance(tap, TrialTap) else None
                if sample is not None and prev_runtime is not None:
                    x, predicted = sample
                    prev = prev_runtime.predict(x).argmax(axis=1)
                    classes_new = tuple(np.bincount(predicted, minlength=n_classes).tolist())
                    classes_prev = tuple(np.bincount(prev, minlength=n_classes).tolist())
                elapsed = time.monotonic() - started
                decision = evaluate_trial(
                    new, previous, thresholds, elapsed, classes_new, classes_prev
                )
                if isinstance(decision, Fail):
                    raise FatalUpdateError("trial", decision.reason)
                if not isinstance(decision, Continue):
                    if decision.note:
                        log.warning(
                            "trial of %s v%d: %s", record.model, record.version, decision.note
                        )
                    return E.TRIAL_PASSED, record
                if self._stop.wait(self.config.trial_sample_seconds):
                    raise _Stopped
        finally:
            if owned and prev_runtime is not None:
                prev_runtime.close()

    def _roll_back(self, record: UpdateRecord) -> tuple[UpdateEvent, UpdateRecord]:
        current = self.service.current()
        if record.from_slot is None:
            # the device had no model before this update: back to none
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.slots.pointer)
            old = self.service.swap(None)
        else:
            previous = self._previous
            if previous is None or previous.installed.slot != record.from_slot:
                installed = self.slots.release(record.from_slot)
                if installed is None:
                    raise SlotError(f"the previous slot {record.from_slot} is empty")
                if current is not None and current.installed.slot == record.from_slot:
                    previous = current
                else:
                    previous = load_model(
                        installed,
                        self.config.threads,
                        self._drift_factory,
                        loader=self.config.runtime_loader,
                    )
            self.slots.activate(record.from_slot)
            old = self.service.swap(previous)
            self._previous = None
        if old is not None and old is not self.service.current():
            self.service.retire(old)
        return E.ROLLED_BACK, record


class _Stopped(Exception):
    """The engine is stopping inside a long action; the saved state resumes at next start."""
