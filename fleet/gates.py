"""Rollout gates, pure: frozen input records in, one verdict per gate (with its reason) and a
stage decision out.

The gates of a stage (thresholds in :class:`GateConfig`, per rollout):

* ``updates`` — the current stage's devices: committed count as success; ``failed``,
  ``rolled_back`` and **stuck** devices (assigned, not finished, and no update report for
  ``stuck_timeout_s``) as failures. Fails once the failures exceed ``max_failures`` (when set)
  or make ``min_success_rate`` unreachable; waits while devices are still undecided.
* ``trial`` — devices of the rollout whose new release failed its trial on the device (the
  agent rolled back on its own): fails above ``max_trial_failures`` (default 0).
* ``latency`` — p95 latency of heartbeats from devices on the new release vs heartbeats from
  target devices still on the old release, same time window (the stage so far), each side
  summarised by its median: fails when the ratio exceeds ``latency_ratio`` (default 1.5); waits
  for ``min_latency_samples`` heartbeats a side; skipped when no device is left on the old
  release (the last stage: earlier stages judged it).
* ``drift`` — the canary cohort (target devices on the new release) vs the control cohort
  (target devices still on the old release), same window, drift counts merged per cohort. The
  output class distribution is always compared (:func:`protocol.drift_stats.compare`, unordered,
  χ² bound on PSI for the sample sizes); input features too when both cohorts were binned with
  the same reference profile (a dataset is drifted when at least half its features are).
  Levels are Bonferroni-divided by the number of tests. Waits until both sides have
  ``min_drift_n`` rows; skipped without a control cohort.
* ``reporting`` — optional: at least ``min_reporting`` devices of the stage have reported on
  their update since they were assigned (waits otherwise).

Decision (:func:`evaluate`): any failing gate fails the stage at once (no need to sit out the
soak); otherwise the stage waits for its soak time; then it passes when every gate passes (or is
skipped). A gate still waiting for data when the stage's ``max_wait_s`` is over fails the stage
("not enough data"), and the rollout's policy (pause or rollback) decides.

No I/O here: :mod:`fleet.rollouts` reads the stored reports into these records.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from fleet.errors import InvalidInputError
from protocol.drift_stats import compare


class GateConfigError(InvalidInputError):
    """Gate thresholds out of range (HTTP 422)."""


class Outcome(StrEnum):
    """Where one device of the rollout stands with the new release."""

    PENDING = "pending"  # its stage has not started, or assigned without a report yet
    UPDATING = "updating"  # reported a step of the update
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"  # the device reverted on its own, or the fleet rolled it back


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"
    SKIP = "skip"  # nothing to judge (counts as passing)


class Action(StrEnum):
    WAIT = "wait"
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True)
class GateConfig:
    """A rollout's gate thresholds. Times in seconds."""

    min_success_rate: float = 0.95
    max_failures: int | None = None
    max_trial_failures: int = 0
    latency_ratio: float = 1.5
    min_latency_samples: int = 3
    drift_alpha: float = 0.01
    min_drift_n: int = 1000
    min_reporting: int = 0
    stuck_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.min_success_rate <= 1.0:
            problems.append("min_success_rate must be within 0..1")
        if self.max_failures is not None and self.max_failures < 0:
            problems.append("max_failures must be >= 0")
        if self.max_trial_failures < 0:
            problems.append("max_trial_failures must be >= 0")
        if not (self.latency_ratio >= 1.0 and math.isfinite(self.latency_ratio)):
            problems.append("latency_ratio must be a finite number >= 1")
        if self.min_latency_samples < 1:
            problems.append("min_latency_samples must be >= 1")
        if not 0.0 < self.drift_alpha < 1.0:
            problems.append("drift_alpha must be within (0, 1)")
        if self.min_drift_n < 1:
            problems.append("min_drift_n must be >= 1")
        if self.min_reporting < 0:
            problems.append("min_reporting must be >= 0")
        if not self.stuck_timeout_s > 0:
            problems.append("stuck_timeout_s must be > 0")
        if problems:
            raise GateConfigError("invalid gate thresholds: " + "; ".join(problems))


@dataclass(frozen=True)
class DeviceProgress:
    """One device of the rollout: its stage, when it was assigned (None: not yet), what it last
    reported about the new release and when (the fleet's receipt time; heartbeats do not
    count: a device that runs but never moves its update is stuck). Times: epoch seconds."""

    device_id: str
    stage: int
    outcome: Outcome
    assigned_at: float | None = None
    last_report_at: float | None = None
    trial_failed: bool = False
    reason: str | None = None

    def stuck(self, now: float, timeout_s: float) -> bool:
        """Assigned, undecided, and silent for longer than ``timeout_s``."""
        if self.assigned_at is None or self.outcome not in (Outcome.PENDING, Outcome.UPDATING):
            return False
        last = max(self.assigned_at, self.last_report_at or self.assigned_at)
        return now - last > timeout_s


@dataclass(frozen=True)
class LatencyInput:
    """p95 latencies (ms) of heartbeats in the window: from devices on the new release, from
    target devices on the old one; ``control_devices``: target devices still on the old one."""

    new_p95: tuple[float, ...] = ()
    old_p95: tuple[float, ...] = ()
    control_devices: int = 0


@dataclass(frozen=True)
class DriftInput:
    """Merged drift counts of both cohorts in the window. ``features`` holds per input feature
    (canary counts, control counts), only when both cohorts share one reference profile."""

    canary_classes: tuple[int, ...] = ()
    control_classes: tuple[int, ...] = ()
    canary_n: int = 0
    control_n: int = 0
    control_devices: int = 0
    features: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    feature_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageInputs:
    stage: int
    stage_started_at: float
    soak_s: float
    max_wait_s: float
    devices: tuple[DeviceProgress, ...]  # the devices of this stage
    trial_failures: tuple[str, ...] = ()  # devices of the whole rollout whose trial failed
    latency: LatencyInput = field(default_factory=LatencyInput)
    drift: DriftInput = field(default_factory=DriftInput)


@dataclass(frozen=True)
class GateVerdict:
    gate: str
    status: Status
    reason: str
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class StageDecision:
    action: Action
    reason: str
    verdicts: tuple[GateVerdict, ...]


# --- the gates --------------------------------------------------------------------------------


def updates_gate(
    config: GateConfig, devices: tuple[DeviceProgress, ...], now: float
) -> GateVerdict:
    total = len(devices)
    if total == 0:
        return GateVerdict("updates", Status.SKIP, "no devices in this stage")
    committed = sum(1 for d in devices if d.outcome is Outcome.COMMITTED)
    stuck = [d.device_id for d in devices if d.stuck(now, config.stuck_timeout_s)]
    failed = [d.device_id for d in devices if d.outcome in (Outcome.FAILED, Outcome.ROLLED_BACK)]
    failures = len(failed) + len(stuck)
    undecided = total - committed - failures
    named = ", ".join((failed + [f"{s} (stuck)" for s in stuck])[:5])
    if config.max_failures is not None and failures > config.max_failures:
        return GateVerdict(
            "updates",
            Status.FAIL,
            f"{failures} device(s) failed the update, more than the {config.max_failures} "
            f"allowed: {named}",
            float(failures),
            float(config.max_failures),
        )
    best_rate = (total - failures) / total
    if best_rate < config.min_success_rate:
        return GateVerdict(
            "updates",
            Status.FAIL,
            f"{failures} of {total} device(s) failed the update ({named}); success rate at most "
            f"{best_rate:.0%}, below {config.min_success_rate:.0%}",
            best_rate,
            config.min_success_rate,
        )
    if undecided:
        return GateVerdict(
            "updates",
            Status.WAIT,
            f"{committed} of {total} committed, {failures} failed, {undecided} still updating",
            committed / total,
            config.min_success_rate,
        )
    return GateVerdict(
        "updates",
        Status.PASS,
        f"{committed} of {total} committed ({committed / total:.0%}), {failures} failed",
        committed / total,
        config.min_success_rate,
    )


def trial_gate(config: GateConfig, trial_failures: tuple[str, ...]) -> GateVerdict:
    n = len(trial_failures)
    if n > config.max_trial_failures:
        return GateVerdict(
            "trial",
            Status.FAIL,
            f"{n} device(s) failed the trial of the new release and rolled back on their own "
            f"({', '.join(trial_failures[:5])}); at most {config.max_trial_failures} allowed",
            float(n),
            float(config.max_trial_failures),
        )
    return GateVerdict(
        "trial", Status.PASS, f"{n} trial failure(s)", float(n), float(config.max_trial_failures)
    )


def latency_gate(config: GateConfig, latency: LatencyInput) -> GateVerdict:
    new, old = latency.new_p95, latency.old_p95
    if latency.control_devices == 0 and len(old) < config.min_latency_samples:
        return GateVerdict("latency", Status.SKIP, "no device left on the old release to compare")
    if len(new) < config.min_latency_samples or len(old) < config.min_latency_samples:
        return GateVerdict(
            "latency",
            Status.WAIT,
            f"not enough data yet: {len(new)} heartbeat(s) from updated devices, {len(old)} from "
            f"devices on the old release; {config.min_latency_samples} needed on each side",
            None,
            config.latency_ratio,
        )
    new_p95, old_p95 = statistics.median(new), statistics.median(old)
    ratio = new_p95 / old_p95 if old_p95 > 0 else (math.inf if new_p95 > 0 else 1.0)
    text = (
        f"p95 {new_p95:.2f} ms on the new release vs {old_p95:.2f} ms on the old "
        f"({ratio:.2f}x; limit {config.latency_ratio:g}x)"
    )
    status = Status.FAIL if ratio > config.latency_ratio else Status.PASS
    return GateVerdict("latency", status, text, ratio, config.latency_ratio)


def _padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    # a release may add output classes: a class one side never saw counts as zero there
    size = max(len(a), len(b))
    return (
        np.pad(np.asarray(a, dtype=np.float64), (0, size - len(a))),
        np.pad(np.asarray(b, dtype=np.float64), (0, size - len(b))),
    )


def drift_gate(config: GateConfig, drift: DriftInput) -> GateVerdict:
    if drift.control_devices == 0 and drift.control_n < config.min_drift_n:
        return GateVerdict("drift", Status.SKIP, "no control cohort left on the old release")
    if drift.canary_n < config.min_drift_n or drift.control_n < config.min_drift_n:
        return GateVerdict(
            "drift",
            Status.WAIT,
            f"not enough data yet: {drift.canary_n} canary row(s), {drift.control_n} control "
            f"row(s); {config.min_drift_n} needed on each side",
        )
    tests = 1 + len(drift.features)
    alpha = config.drift_alpha / tests
    a, b = _padded(drift.canary_classes, drift.control_classes)
    out = compare(a, b, alpha, ordered=False)
    drifted_features = []
    for i, (fa, fb) in enumerate(drift.features):
        if compare(*_padded(fa, fb), alpha).drifted:
            names = drift.feature_names
            drifted_features.append(names[i] if i < len(names) else f"feature {i}")
    dataset = bool(drift.features) and 2 * len(drifted_features) >= len(drift.features)
    what = (
        f"output classes PSI {out.psi:.4f} (bound {out.psi_bound:.4f} for n={out.n}, m={out.m})"
        if out.psi is not None and out.psi_bound is not None
        else "output classes not comparable"
    )
    if drift.features:
        what += f"; {len(drifted_features)} of {len(drift.features)} input features drifted"
        if drifted_features:
            what += f" ({', '.join(drifted_features[:5])})"
    else:
        what += "; input features not compared (different reference profiles)"
    failed = out.drifted or dataset
    return GateVerdict(
        "drift",
        Status.FAIL if failed else Status.PASS,
        ("canaries drifted from the control cohort: " if failed else "no drift: ") + what,
        out.psi,
        out.psi_bound,
    )


def reporting_gate(config: GateConfig, devices: tuple[DeviceProgress, ...]) -> GateVerdict | None:
    if config.min_reporting == 0:
        return None
    needed = min(config.min_reporting, len(devices))
    reporting = sum(
        1
        for d in devices
        if d.assigned_at is not None
        and d.last_report_at is not None
        and d.last_report_at >= d.assigned_at
    )
    status = Status.PASS if reporting >= needed else Status.WAIT
    return GateVerdict(
        "reporting",
        status,
        f"{reporting} device(s) of the stage reported since assignment; {needed} needed",
        float(reporting),
        float(needed),
    )


# --- the decision -----------------------------------------------------------------------------


def evaluate(config: GateConfig, inputs: StageInputs, now: float) -> StageDecision:
    """Every gate's verdict and what the stage does now (see the module docstring)."""
    verdicts = [
        updates_gate(config, inputs.devices, now),
        trial_gate(config, inputs.trial_failures),
        latency_gate(config, inputs.latency),
        drift_gate(config, inputs.drift),
    ]
    reporting = reporting_gate(config, inputs.devices)
    if reporting is not None:
        verdicts.append(reporting)
    failing = [v for v in verdicts if v.status is Status.FAIL]
    if failing:
        reason = "; ".join(f"{v.gate} gate failed: {v.reason}" for v in failing)
        return StageDecision(Action.FAIL, reason, tuple(verdicts))
    soaked = inputs.stage_started_at + inputs.soak_s
    if now < soaked:
        return StageDecision(
            Action.WAIT,
            f"soaking, {soaked - now:.0f}s left of {inputs.soak_s:.0f}s",
            tuple(verdicts),
        )
    waiting = [v for v in verdicts if v.status is Status.WAIT]
    if waiting:
        listed = "; ".join(f"{v.gate}: {v.reason}" for v in waiting)
        if now >= inputs.stage_started_at + inputs.max_wait_s:
            return StageDecision(
                Action.FAIL,
                f"gates still waiting after the stage's max wait of {inputs.max_wait_s:.0f}s: "
                f"{listed}",
                tuple(verdicts),
            )
        return StageDecision(Action.WAIT, f"waiting for data: {listed}", tuple(verdicts))
    return StageDecision(Action.PASS, "every gate passed after the soak", tuple(verdicts))
