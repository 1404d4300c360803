"""The update state machine's rules: states, events, the transition table, the record, recovery.

After Mender's client: every transition is one row of :data:`TRANSITIONS` (``(state, event) ->
state``); the engine (:mod:`agent.updater`) saves the :class:`UpdateRecord` with the *target*
state before that state's action runs, so a power cut inside any action leaves the state whose
work was interrupted on disk; at start-up :func:`recover` maps that record to what to do next.
``record.attempt`` counts the starts that found the update unfinished (Mender's loop counter): past
:data:`MAX_ATTEMPTS` the update is given up instead of resumed again, so a model that crashes the
agent cannot trap the device in a boot loop.

::

    idle -> downloading -> verifying -> installing -> health_check -> activating -> trial
         -> committed
    health_check -> shadow -> activating  (only when the release's signed shadow_samples > 0)
    health_check | activating | trial -> rolling_back -> rolled_back
    idle | downloading | verifying | installing | health_check | shadow | rolling_back -> failed

``failed`` is not reachable from ``activating`` or ``trial``: once the new model may be live, the
only way out of trouble is back to the previous slot (``rolling_back``); ``rolling_back -> failed``
means the previous model could not be restored either (reported, the device needs a technician).
``shadow -> failed`` is right for the opposite reason: in shadow the candidate only runs beside
the active model on copies of live inputs, it never answers a request and the slot pointer was
never switched, so refusing it leaves nothing to undo.

Pure: no I/O, no clocks (times are passed in), no runtimes. The engine does the work; the error
classes here let it tell a retry (transient) from a refusal (fatal).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from agent.errors import AgentError

MAX_ATTEMPTS = 3  # starts of the agent that may resume one update before it is given up


class UpdateState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECK = "health_check"
    SHADOW = "shadow"  # the candidate runs beside the active model on live inputs, not serving
    ACTIVATING = "activating"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class UpdateEvent(StrEnum):
    ACCEPTED = "accepted"  # the desired document and its target passed every check
    DOWNLOADED = "downloaded"  # artifact, golden set and reference profile are on disk
    VERIFIED = "verified"  # the files on disk match the signed lengths and hashes
    INSTALLED = "installed"  # the inactive slot holds the release, fsynced
    HEALTHY = "healthy"  # golden set and latency budget passed in the runtime
    HEALTHY_SHADOW = "healthy_shadow"  # healthy, and the release asks for a shadow run first
    SHADOWED = "shadowed"  # the candidate agreed with the active model on enough live inputs
    ACTIVATED = "activated"  # the pointer names the new slot and the service serves it
    TRIAL_PASSED = "trial_passed"
    ROLL_BACK = "roll_back"  # the new model must go: back to the previous slot
    ROLLED_BACK = "rolled_back"  # the previous slot is active and serving again
    FAIL = "fail"  # refused or broken before anything went live (or the rollback failed)


S, E = UpdateState, UpdateEvent

TRANSITIONS: Mapping[tuple[UpdateState, UpdateEvent], UpdateState] = {
    (S.IDLE, E.ACCEPTED): S.DOWNLOADING,
    (S.IDLE, E.FAIL): S.FAILED,
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.DOWNLOADING, E.FAIL): S.FAILED,
    (S.VERIFYING, E.VERIFIED): S.INSTALLING,
    (S.VERIFYING, E.FAIL): S.FAILED,
    (S.INSTALLING, E.INSTALLED): S.HEALTH_CHECK,
    (S.INSTALLING, E.FAIL): S.FAILED,
    (S.HEALTH_CHECK, E.HEALTHY): S.ACTIVATING,
    (S.HEALTH_CHECK, E.FAIL): S.FAILED,
    (S.HEALTH_CHECK, E.ROLL_BACK): S.ROLLING_BACK,
    (S.HEALTH_CHECK, E.HEALTHY_SHADOW): S.SHADOW,
    (S.SHADOW, E.SHADOWED): S.ACTIVATING,
    (S.SHADOW, E.FAIL): S.FAILED,  # nothing went live: refusing is enough (module docstring)
    (S.ACTIVATING, E.ACTIVATED): S.TRIAL,
    (S.ACTIVATING, E.ROLL_BACK): S.ROLLING_BACK,
    (S.TRIAL, E.TRIAL_PASSED): S.COMMITTED,
    (S.TRIAL, E.ROLL_BACK): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.ROLLED_BACK): S.ROLLED_BACK,
    (S.ROLLING_BACK, E.FAIL): S.FAILED,
}

TERMINAL = frozenset({S.IDLE, S.COMMITTED, S.ROLLED_BACK, S.FAILED})
# states in which the new model may already be live: leaving them means rolling back
LIVE = frozenset({S.ACTIVATING, S.TRIAL, S.ROLLING_BACK})


class IllegalTransition(AgentError):
    """An (state, event) pair the table does not hold: a bug in the engine, not bad input."""


def next_state(state: UpdateState, event: UpdateEvent) -> UpdateState:
    """The state ``event`` leads to from ``state``; :class:`IllegalTransition` if none."""
    try:
        return TRANSITIONS[(UpdateState(state), UpdateEvent(event))]
    except (KeyError, ValueError):
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s == state)
        raise IllegalTransition(
            f"no transition from {state!s} on {event!s}; from {state!s} only "
            f"{', '.join(allowed) or 'nothing'} may happen"
        ) from None


# --- errors the engine raises inside a state's action -------------------------------------------


class UpdateError(AgentError):
    """A step of an update failed; ``reason`` is a short machine-readable cause for reports."""

    transient = False

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class TransientUpdateError(UpdateError):
    """Retry later with backoff, staying in the same state (network down, fleet busy)."""

    transient = True


class FatalUpdateError(UpdateError):
    """Retrying cannot help: refuse (``failed``) or, once the model is live, roll back."""


# --- the record ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRef:
    """One file of the release as the signed TUF metadata described it at acceptance."""

    path: str  # TUF target path
    length: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "length": self.length, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetRef:
        return cls(str(d["path"]), int(d["length"]), str(d["sha256"]))


@dataclass(frozen=True)
class Baseline:
    """The previous model's figures at activation, the yardstick of the trial."""

    requests: int
    errors: int
    p95_seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "p95_seconds": self.p95_seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Baseline:
        p95 = d.get("p95_seconds")
        return cls(int(d["requests"]), int(d["errors"]), None if p95 is None else float(p95))


@dataclass(frozen=True)
class UpdateRecord:
    """One update of one release, as saved before each state's action."""

    update_id: int
    model: str
    version: int
    rollback: bool  # a signed order to go back to an older version
    serial: int  # of the desired document that asked for it
    target_path: str
    state: UpdateState
    started_at: float  # wall clock
    entered_at: float  # wall clock when ``state`` was entered
    attempt: int = 1  # starts that found this update unfinished, plus one
    reason: str = ""  # why it failed or rolled back (empty otherwise)
    rollout_id: str | None = None
    elapsed: Mapping[str, float] = field(default_factory=dict)  # state -> seconds spent
    custom_json: str = ""  # the artifact target's signed custom metadata (canonical JSON)
    files: tuple[TargetRef, ...] = ()  # artifact, golden set, reference profile
    from_slot: str | None = None  # the slot that was active before (the rollback target)
    to_slot: str | None = None  # the slot the release went into
    baseline: Baseline | None = None

    def moved(self, event: UpdateEvent, now: float, reason: str = "") -> UpdateRecord:
        """The record after ``event``: the next state, the time spent in this one added."""
        target = next_state(self.state, event)
        spent = dict(self.elapsed)
        spent[self.state.value] = spent.get(self.state.value, 0.0) + max(0.0, now - self.entered_at)
        return replace(
            self,
            state=target,
            entered_at=now,
            elapsed=spent,
            reason=reason or self.reason,
        )

    def to_json(self) -> str:
        doc = {
            "update_id": self.update_id,
            "model": self.model,
            "version": self.version,
            "rollback": self.rollback,
            "serial": self.serial,
            "target_path": self.target_path,
            "state": self.state.value,
            "started_at": self.started_at,
            "entered_at": self.entered_at,
            "attempt": self.attempt,
            "reason": self.reason,
            "rollout_id": self.rollout_id,
            "elapsed": dict(self.elapsed),
            "custom_json": self.custom_json,
            "files": [f.to_dict() for f in self.files],
            "from_slot": self.from_slot,
            "to_slot": self.to_slot,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
        }
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UpdateRecord:
        try:
            d = json.loads(text)
            baseline = d.get("baseline")
            return cls(
                update_id=int(d["update_id"]),
                model=str(d["model"]),
                version=int(d["version"]),
                rollback=bool(d["rollback"]),
                serial=int(d["serial"]),
                target_path=str(d["target_path"]),
                state=UpdateState(d["state"]),
                started_at=float(d["started_at"]),
                entered_at=float(d["entered_at"]),
                attempt=int(d["attempt"]),
                reason=str(d["reason"]),
                rollout_id=d.get("rollout_id"),
                elapsed={str(k): float(v) for k, v in d["elapsed"].items()},
                custom_json=str(d["custom_json"]),
                files=tuple(TargetRef.from_dict(f) for f in d["files"]),
                from_slot=d.get("from_slot"),
                to_slot=d.get("to_slot"),
                baseline=None if baseline is None else Baseline.from_dict(baseline),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AgentError(
                f"the saved update record is unreadable ({type(exc).__name__}: {exc}); the "
                "agent keeps the active slot — clear it with `edge-agent update reset`"
            ) from exc


# --- recovery -----------------------------------------------------------------------------------


class RecoveryKind(StrEnum):
    NOTHING = "nothing"  # no update under way
    RESUME = "resume"  # run ``state``'s action again
    ROLL_BACK = "roll_back"  # go to rolling_back with ``reason``
    FAIL = "fail"  # go to failed with ``reason``


@dataclass(frozen=True)
class RecoveryAction:
    kind: RecoveryKind
    state: UpdateState | None = None  # the state to resume in (RESUME only)
    reason: str = ""


def recover(record: UpdateRecord | None, max_attempts: int = MAX_ATTEMPTS) -> RecoveryAction:
    """What to do at start-up with the record found on disk (``attempt`` already counts this
    start). Each case says why."""
    if record is None:
        return RecoveryAction(RecoveryKind.NOTHING)
    state = record.state
    if state in TERMINAL:
        # idle / committed / rolled_back / failed: the last update finished; nothing to do.
        return RecoveryAction(RecoveryKind.NOTHING)
    if state is S.ROLLING_BACK:
        # Finish the rollback whatever the count: it only points at and loads the old slot,
        # which was serving before the update and is intact.
        return RecoveryAction(RecoveryKind.RESUME, S.ROLLING_BACK)
    if record.attempt > max_attempts:
        why = (
            f"the agent restarted {record.attempt - 1} times during this update (last in "
            f"{state.value}); giving up to avoid a restart loop"
        )
        # Mender's loop counter: a model that kills the agent would loop forever otherwise.
        if state in LIVE:
            return RecoveryAction(RecoveryKind.ROLL_BACK, reason=why)
        return RecoveryAction(RecoveryKind.FAIL, reason=why)
    if state is S.DOWNLOADING:
        # Resume: the .part files stay and are continued with HTTP Range.
        return RecoveryAction(RecoveryKind.RESUME, S.DOWNLOADING)
    if state in (S.VERIFYING, S.INSTALLING):
        # Restart from verifying: the downloaded files are re-checked against the signed
        # lengths and hashes (a power cut may have torn them), then installed again — the
        # install replaces the inactive slot as a whole, so a half-written one is harmless.
        return RecoveryAction(RecoveryKind.RESUME, S.VERIFYING)
    if state is S.HEALTH_CHECK:
        # Redo the check: it only reads the inactive slot; the active one was never touched.
        return RecoveryAction(RecoveryKind.RESUME, S.HEALTH_CHECK)
    if state is S.SHADOW:
        # Redo the shadow from zero: its samples and counts died with the process, the
        # candidate never served and the active slot was never touched; the engine loads the
        # candidate from the installed slot again.
        return RecoveryAction(RecoveryKind.RESUME, S.SHADOW)
    if state is S.ACTIVATING:
        # The pointer names the old slot or the new one (its switch is atomic). Activating again
        # is idempotent: the engine loads the new slot's model (failing that -> roll back to the
        # other slot), points at it and serves it.
        return RecoveryAction(RecoveryKind.RESUME, S.ACTIVATING)
    if state is S.TRIAL:
        # The soak restarts from zero with the new model: the counters died with the process.
        return RecoveryAction(RecoveryKind.RESUME, S.TRIAL)
    # Unknown state (cannot happen with a StrEnum field, kept for future states): be safe.
    return RecoveryAction(RecoveryKind.ROLL_BACK, reason=f"unknown saved state {state!s}")


# --- our own rules on a verified desired document -----------------------------------------------


class Refusal(StrEnum):
    """Why a signed desired document or its target was refused (beyond the signature checks of
    :class:`protocol.desired.DesiredFailure`)."""

    WRONG_MODEL = "wrong_model"  # another model than the one installed
    DOWNGRADE = "downgrade"  # version not above the installed one, and not a signed rollback
    ROLLBACK_NOT_OLDER = "rollback_not_older"  # a "rollback" to a version that is not older
    MIX_AND_MATCH = "mix_and_match"  # the target's signed metadata names another release
    WRONG_PROFILE = "wrong_profile"  # the artifact is not for this device's profile
    RUNTIME_UNAVAILABLE = "runtime_unavailable"
    TOO_LARGE = "too_large"  # bigger than the profile's model size cap


@dataclass(frozen=True)
class Installed:
    name: str
    version: int


def check_version(model: str, version: int, rollback: bool, installed: Installed | None) -> bool:
    """Apply the version rule; True if there is something to do, False if ``model`` v``version``
    is already installed. Raises :class:`FatalUpdateError` (reason a :class:`Refusal`)."""
    if installed is None:
        return True  # a device's first model: any signed release
    if model != installed.name:
        raise FatalUpdateError(
            Refusal.WRONG_MODEL,
            f"the document names model {model!r}, this device runs {installed.name!r}; a device "
            "changes models only by re-provisioning",
        )
    if version == installed.version:
        return False
    if rollback and version > installed.version:
        raise FatalUpdateError(
            Refusal.ROLLBACK_NOT_OLDER,
            f"a rollback to v{version} is not older than the installed v{installed.version}",
        )
    if not rollback and version < installed.version:
        raise FatalUpdateError(
            Refusal.DOWNGRADE,
            f"v{version} is older than the installed v{installed.version} and the document is "
            "not a signed rollback; publish a new version or a rollback document",
        )
    return True


def check_artifact(
    model: str,
    version: int,
    target_model: str,
    target_version: int,
    profiles: tuple[str, ...],
    runtime: str,
    length: int,
    profile_name: str,
    profile_runtimes: tuple[str, ...],
    max_bytes: int,
) -> None:
    """The signed target must be the release the document names, for this device's profile,
    in a runtime it has, within its size cap. Raises :class:`FatalUpdateError`."""
    if (target_model, target_version) != (model, version):
        raise FatalUpdateError(
            Refusal.MIX_AND_MATCH,
            f"the document names {model} v{version} but its target is signed as "
            f"{target_model} v{target_version}",
        )
    if profiles and profile_name not in profiles:
        raise FatalUpdateError(
            Refusal.WRONG_PROFILE,
            f"the artifact is built for profiles {', '.join(profiles)}, this device is "
            f"{profile_name}; the fleet must send this profile's artifact",
        )
    if runtime not in profile_runtimes:
        raise FatalUpdateError(
            Refusal.RUNTIME_UNAVAILABLE,
            f"the artifact needs runtime {runtime}, {profile_name} has "
            f"{', '.join(profile_runtimes)}",
        )
    if length > max_bytes:
        raise FatalUpdateError(
            Refusal.TOO_LARGE,
            f"the artifact is {length} bytes, over {profile_name}'s cap of {max_bytes}",
        )
