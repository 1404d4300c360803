"""Reporting: put a report into the outbox, wake the link, and run the periodic report jobs.

:class:`Reporter` is what the rest of the agent calls to report something. A report is durable
once a ``report_*`` method returns (it is in the outbox with its sequence number); the link
sends it when it can. :func:`start_periodic` wires periodic jobs (heartbeat, drift window
close) onto an APScheduler ``BackgroundScheduler``.

This module does not gather the figures that go into a heartbeat (the agent's main does, from
psutil and the inference service) and does not compute drift (:mod:`agent.drift`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler

from protocol.messages import Body, DriftSummary, HeartbeatBody, UpdateBody
from protocol.topics import TopicKind

log = logging.getLogger(__name__)


class ReportStore(Protocol):
    """What the reporter needs of :class:`agent.outbox.Outbox`."""

    def put(self, kind: TopicKind, body: Body, now: float | None = None) -> int: ...

    def depth(self) -> int: ...

    def evicted_total(self) -> int: ...


class Wakeable(Protocol):
    """What the reporter needs of :class:`agent.mqtt_link.MqttLink`."""

    def notify(self) -> None: ...


class Reporter:
    """Writes reports to the outbox and wakes the link; every method returns the report's seq."""

    def __init__(self, outbox: ReportStore, link: Wakeable | None = None) -> None:
        self._outbox = outbox
        self._link = link

    def report(self, kind: TopicKind, body: Body, now: float | None = None) -> int:
        seq = self._outbox.put(kind, body, now)
        if self._link is not None:
            self._link.notify()
        return seq

    def report_heartbeat(self, body: HeartbeatBody, now: float | None = None) -> int:
        """Report a heartbeat; its ``outbox_depth`` and ``outbox_evicted_total`` are replaced by
        the outbox's own figures at this moment (the caller may leave them 0)."""
        body = dataclasses.replace(
            body,
            outbox_depth=self._outbox.depth(),
            outbox_evicted_total=self._outbox.evicted_total(),
        )
        return self.report(TopicKind.HEARTBEAT, body, now)

    def report_drift(self, summary: DriftSummary, now: float | None = None) -> int:
        """Report one closed drift window (a :class:`protocol.drift.DriftSummary`)."""
        return self.report(TopicKind.DRIFT, summary, now)

    def report_update(self, body: UpdateBody, now: float | None = None) -> int:
        """Report one transition of the update state machine."""
        return self.report(TopicKind.UPDATE, body, now)


@dataclass(frozen=True)
class PeriodicJob:
    """``func`` every ``every_s`` seconds; ``at_start`` also runs it right away."""

    name: str
    every_s: float
    func: Callable[[], Any]
    at_start: bool = False


def _guarded(job: PeriodicJob) -> Callable[[], None]:
    def run() -> None:
        try:
            job.func()
        except Exception:  # one failed run must not stop the schedule
            log.exception("periodic job %r failed; it runs again in %.0f s", job.name, job.every_s)

    return run


def start_periodic(
    jobs: Sequence[PeriodicJob], scheduler: BackgroundScheduler | None = None
) -> BackgroundScheduler:
    """Schedule ``jobs`` on ``scheduler`` (a new ``BackgroundScheduler`` if None) and start it.

    Runs never overlap (one instance per job) and missed runs collapse into one: a device that
    was suspended for an hour sends one heartbeat on waking, not sixty. Stop it with
    ``scheduler.shutdown()``.
    """
    scheduler = scheduler or BackgroundScheduler(timezone=UTC)
    for job in jobs:
        if job.every_s <= 0:
            raise ValueError(f"periodic job {job.name!r} needs every_s > 0, got {job.every_s}")
        options: dict[str, Any] = {}
        if job.at_start:  # (passing next_run_time=None would add the job paused)
            options["next_run_time"] = datetime.now(UTC)
        scheduler.add_job(
            _guarded(job),
            "interval",
            seconds=job.every_s,
            id=job.name,
            name=job.name,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(job.every_s)),
            **options,
        )
    if not scheduler.running:
        scheduler.start()
    return scheduler
