"""The fleet manager's background jobs: one APScheduler ``BackgroundScheduler`` per app.

:func:`lifespan` (entered by :mod:`fleet.routes.repository`'s router lifespan, so the app starts
and stops it) builds the scheduler, registers the jobs and puts it on ``app.state.scheduler``;
later parts add their jobs there from their own router lifespan (entered after this one when
the module name sorts after ``repository``) or call :func:`add_job`. Jobs take the app's clock,
so tests drive them with a fixed ``now`` by calling the job functions directly.

Jobs registered here:

* ``refresh_timestamp`` — re-signs the TUF timestamp (and snapshot/targets) before it expires:
  runs at start (a server that was down may hold stale metadata) and then every
  :func:`refresh_interval`, a small fraction of the timestamp's lifetime.

This module schedules; the work itself lives in the services (:mod:`fleet.tuf_repo`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import FastAPI

from fleet.dependencies import AppContext, Clock
from fleet.errors import FleetError
from fleet.registry import signing_repository
from fleet.settings import FleetSettings
from fleet.tuf_repo import TufRepository

log = logging.getLogger(__name__)

REFRESH_TIMESTAMP = "refresh_timestamp"
MIN_INTERVAL = timedelta(seconds=30)
MAX_INTERVAL = timedelta(minutes=10)


def refresh_interval(settings: FleetSettings) -> timedelta:
    """How often the timestamp job runs: 1/24 of the timestamp's lifetime, 30 s to 10 min (a
    1-day timestamp is refreshed once under 12 h remain, so many runs get the chance)."""
    return max(MIN_INTERVAL, min(MAX_INTERVAL, settings.timestamp_expiry / 24))


def refresh_timestamp(settings: FleetSettings, now: datetime) -> list[str]:
    """The ``refresh_timestamp`` job: re-sign what is close to expiry; return the roles
    re-signed. A fleet without a repository yet is skipped; missing keys are logged."""
    if not TufRepository(settings.tuf_dir, {}).is_initialized():
        log.debug("no TUF repository in %s yet; nothing to refresh", settings.tuf_dir)
        return []
    try:
        repo = signing_repository(settings)
        if not repo.needs_timestamp_refresh(now):
            return []
        written = repo.refresh_timestamp(now)
    except FleetError as exc:
        log.error("cannot refresh the TUF timestamp: %s", exc)
        return []
    log.info("re-signed TUF %s", ", ".join(written))
    return written


def build_scheduler(settings: FleetSettings, clock: Clock) -> BackgroundScheduler:
    """A scheduler (not started) with the fleet's jobs registered."""
    scheduler = BackgroundScheduler(
        timezone=UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
    )
    add_job(
        scheduler,
        REFRESH_TIMESTAMP,
        lambda: refresh_timestamp(settings, clock()),
        refresh_interval(settings),
        run_now=True,
    )
    return scheduler


def add_job(
    scheduler: BackgroundScheduler,
    job_id: str,
    func: Callable[[], Any],
    every: timedelta,
    *,
    run_now: bool = False,
) -> None:
    """Run ``func`` every ``every`` (and once at start if ``run_now``), one run at a time."""
    # APScheduler reads an explicit next_run_time=None as "paused": pass it only to run now
    extra: dict[str, Any] = {"next_run_time": datetime.now(UTC)} if run_now else {}
    scheduler.add_job(
        func,
        "interval",
        seconds=every.total_seconds(),
        id=job_id,
        name=job_id,
        replace_existing=True,
        **extra,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the scheduler with the app, stop it (waiting for a running job) with the app."""
    ctx: AppContext = app.state.fleet
    scheduler = build_scheduler(ctx.settings, ctx.clock)
    scheduler.start()
    app.state.scheduler = scheduler
    try:
        yield
    finally:
        scheduler.shutdown(wait=True)
        log.debug("scheduler stopped")
