"""The agent's composition root: :class:`Agent` builds every part from the config and runs them.

``Agent(config).start()`` loads the active slot's model into the inference service (with the
firmware profile's thread count and a drift accumulator on the release's reference profile),
opens the outbox in ``agent.db``, starts the predict and health HTTP servers, connects the MQTT
link (birth and Last Will) and schedules the heartbeat and drift-window jobs on APScheduler.
It subscribes to the device's ``desired`` topic and hands new signed desired documents to the
update engine (:class:`agent.updater.Updater`), which it builds only when one arrives that was
not handled before, or at start when an update was left unfinished: TUF, the device key and
cryptography are imported then, not before. ``stop()`` undoes it all in the order that loses
nothing: stop accepting requests, stop the jobs and the update engine (an update under way
resumes at the next start), close the current drift window into the outbox, let the link flush
what it can within ``telemetry.shutdown_flush_seconds`` and publish the offline state, close the
outbox, close the model.

A simulator hosting many agents in one process passes a ``runtime_loader`` (one runtime per
artifact shared among them), a shared ``scheduler`` (each agent's jobs named after its device),
``serve_http=False`` (it calls the inference service directly) and the firmware ``profile``
(its latency budget widened: hundreds of agents share its cores); a device uses the defaults.

It gathers the figures the parts report (:mod:`agent.proc_stats` for the process and memory,
the disk's usage) for the heartbeat and the health snapshot; it contains no logic of its own
beyond wiring. Nothing here runs at import time, and nothing heavy is imported until ``start``
needs it (the runtime library of the active artifact only; no TUF until an update starts).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import AgentConfig
from agent.drift import DriftAccumulator, WindowPolicy
from agent.errors import AgentError
from agent.health import (
    DriftFigures,
    FeatureVerdict,
    HealthSnapshot,
    InferenceFigures,
    ModelFigures,
    SystemFigures,
    UpdateFigures,
    assemble,
)
from agent.http_server import HttpServer, health_server, predict_server
from agent.inference import InferenceService, LoadedModel, load_model
from agent.mqtt_link import LinkConfig, MqttLink
from agent.outbox import Outbox
from agent.proc_stats import CpuMeter, memory_bytes, rss_bytes
from agent.reporter import PeriodicJob, Reporter, start_periodic
from agent.runtimes import RuntimeLoader, load_runtime
from agent.slots import Slots
from agent.update_states import TERMINAL
from agent.update_store import UpdateStore
from agent.version import agent_version
from firmware_profiles import load_profile
from protocol.drift import DriftSummary
from protocol.messages import (
    ActiveModel,
    HeartbeatBody,
    Latency,
    ModelRef,
    StateBody,
    UpdateBody,
)
from protocol.profiles import FirmwareProfile
from protocol.topics import TopicKind, device_topic

log = logging.getLogger(__name__)

# update transitions after which another model serves (the retained state must say so)
MODEL_SWITCHED = frozenset({"trial", "rolled_back"})

UpdateStatusSource = Callable[[], UpdateFigures | None]


def drift_figures(summary: DriftSummary) -> DriftFigures:
    """The health page's view of a closed window."""
    return DriftFigures(
        window_end=summary.counts.end,
        rows=summary.counts.n,
        drifted=summary.verdict.drifted,
        features=tuple(
            FeatureVerdict(f.name, f.drifted, f.test.psi, f.test.js, f.test.ks)
            for f in summary.scores.features
        ),
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


class Agent:
    """One device agent (see the module docstring). ``start`` and ``stop`` are called once."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        update_status: UpdateStatusSource | None = None,
        clock: Callable[[], float] = time.time,
        runtime_loader: RuntimeLoader = load_runtime,
        scheduler: Any = None,
        serve_http: bool = True,
        profile: FirmwareProfile | None = None,
    ) -> None:
        self.config = config
        self.paths = config.paths
        self.profile: FirmwareProfile = profile or load_profile(config.device.profile)
        self.slots = Slots(self.paths.slots)
        self.service = InferenceService(config.http.nan_policy, config.http.max_batch_rows)
        self.window_policy = WindowPolicy(
            window_seconds=config.telemetry.drift_window_seconds,
            min_rows=config.telemetry.drift_min_rows,
            max_window_seconds=max(86400.0, config.telemetry.drift_window_seconds),
        )
        self._update_status = update_status
        # a simulator hosting many agents in one process shares runtimes and one scheduler
        # (apscheduler's BackgroundScheduler) among them, and feeds the inference service directly
        self._runtime_loader = runtime_loader
        self._shared_scheduler = scheduler
        self._serve_http = serve_http
        self.model_error: str | None = None  # why the active slot's model could not be loaded
        self._clock = clock
        self._cpu = CpuMeter()
        self._started_at = clock()
        self._window_start = self._started_at
        self._window_lock = threading.Lock()
        self._last_drift: DriftSummary | None = None
        self._window_model: LoadedModel | None = None  # whose drift window is open
        self.outbox: Outbox | None = None
        self.link: MqttLink | None = None
        self.reporter: Reporter | None = None
        self.update_store: UpdateStore | None = None
        self.updater: Any = None  # agent.updater.Updater, built on the first update
        self._updater_lock = threading.Lock()
        self.predict_http: HttpServer | None = None
        self.health_http: HttpServer | None = None
        self._scheduler: Any = None
        self._stopped = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model, open the outbox, serve HTTP, connect, schedule the jobs. If a part
        cannot start (a port in use, an unreadable database), what was started is stopped and
        the error is raised."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        config = self.config
        self._started_at = self._window_start = self._clock()
        self._cpu.reset()
        self._window_model = self.load_active_model()
        self.outbox = Outbox(
            self.paths.db, config.device.id, max_rows=config.telemetry.outbox_max_rows
        )
        if self._serve_http:
            self.predict_http = predict_server(
                config.http.predict_listen, self.service, config.http.max_body_bytes
            )
            self.health_http = health_server(config.http.health_listen, self.snapshot)
        self.update_store = UpdateStore(self.paths.db)
        self.link = MqttLink(self._link_config(), self.outbox, self._state)
        self.reporter = Reporter(self.outbox, self.link)
        record = self.update_store.load()
        if record is not None and record.state not in TERMINAL:
            log.info("update of %s v%d was left in %s", record.model, record.version, record.state)
            self._start_update_engine()  # it resumes or reverts the update
        self.link.subscribe(device_topic(config.device.id, TopicKind.DESIRED), self._on_desired)
        for server in (self.predict_http, self.health_http):
            if server is not None:  # None when serve_http is off
                server.start()
        self.link.start()
        telemetry = config.telemetry
        check_every = max(1.0, min(60.0, telemetry.drift_window_seconds / 5))
        self._scheduler = start_periodic(
            [
                PeriodicJob(
                    self._job("heartbeat"), telemetry.heartbeat_seconds, self.heartbeat, True
                ),
                PeriodicJob(self._job("drift-window"), check_every, self.close_drift_window),
            ],
            self._shared_scheduler,
        )
        log.info(
            "agent %s running as %s: predict on %s, health on %s, broker %s:%d",
            agent_version(),
            config.device.id,
            self.predict_http.url if self.predict_http else "(off)",
            self.health_http.url if self.health_http else "(off)",
            config.mqtt.host,
            config.mqtt.port,
        )

    def stop(self) -> None:
        """Stop cleanly; whatever the broker did not acknowledge stays in the outbox."""
        if self._stopped:
            return
        self._stopped = True
        self._close_servers()
        if self._scheduler is self._shared_scheduler and self._scheduler is not None:
            for name in ("heartbeat", "drift-window"):
                if self._scheduler.get_job(self._job(name)) is not None:
                    self._scheduler.remove_job(self._job(name))
        elif self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        if self.updater is not None:
            self.updater.stop()
        if self.reporter is not None:
            try:
                self.close_drift_window(force=True)
            except Exception:  # a failed window must not stop the rest of the shutdown
                log.exception("closing the last drift window failed")
        if self.link is not None:
            self.link.stop(timeout=self.config.telemetry.shutdown_flush_seconds)
        if self.outbox is not None:
            depth = self.outbox.depth()
            self.outbox.close()
            if depth:
                log.info("%d report(s) stay in the outbox for the next start", depth)
        if self.update_store is not None:
            self.update_store.close()
        self.service.close()
        log.info("agent stopped")

    def _close_servers(self) -> None:
        for server in (self.predict_http, self.health_http):
            if server is not None:
                server.stop()

    def _job(self, name: str) -> str:
        # a shared scheduler holds every hosted agent's jobs: their ids must not collide
        return name if self._shared_scheduler is None else f"{self.config.device.id}/{name}"

    def _link_config(self) -> LinkConfig:
        from agent.tls import mqtt_context

        mqtt = self.config.mqtt
        return LinkConfig(
            device_id=self.config.device.id,
            host=mqtt.host,
            port=mqtt.port,
            username=mqtt.username,
            password=mqtt.password,
            keepalive=mqtt.keepalive,
            tls_context=mqtt_context(mqtt),
        )

    # --- the model ----------------------------------------------------------------------------

    def load_active_model(self) -> LoadedModel | None:
        """Load the active slot's release and serve it; None (and ``model_error`` says why)
        when there is none or it cannot be loaded — the agent then answers 503 and keeps
        reporting."""
        try:
            installed = self.slots.active_release()
            if installed is None:
                log.warning(
                    "no model is installed: install one with `edge-agent model install "
                    "BUNDLE_DIR`, or wait for the fleet's first release"
                )
                self.model_error = None
                return None
            model = load_model(
                installed,
                self.profile.inference_threads,
                DriftAccumulator,
                loader=self._runtime_loader,
            )
        except (AgentError, OSError) as exc:
            self.model_error = str(exc)
            log.error("cannot load the active model: %s", exc)
            return None
        self.model_error = None
        old = self.service.swap(model)
        if old is not None:
            self.service.retire(old)
        log.info(
            "serving %s v%d from slot %s (%s, %d threads)",
            model.release.name,
            model.release.version,
            model.installed.slot,
            model.release.runtime,
            self.profile.inference_threads,
        )
        return model

    # --- updates ------------------------------------------------------------------------------

    def _on_desired(self, topic: str, payload: bytes) -> None:
        # on the link's inbound thread; the retained document comes again after every connect
        assert self.update_store is not None
        if hashlib.sha256(payload).hexdigest() == self.update_store.last_desired_sha256():
            log.debug("desired document already handled")
            return
        engine = self._start_update_engine()
        if engine is not None:
            engine.submit(payload)

    def _start_update_engine(self) -> Any:
        try:
            return self.update_engine()
        except (AgentError, OSError) as exc:  # serving goes on with the active slot
            log.error("cannot start the update engine: %s", exc)
            return None

    def update_engine(self) -> Any:
        """The update engine, built and started on first use (it imports TUF)."""
        with self._updater_lock:
            if self.updater is None:
                self.updater = self._build_updater()
                self.updater.start()
            return self.updater

    def _build_updater(self) -> Any:
        from agent.provision import load_private_key
        from agent.tls import https_context
        from agent.tuf_client import DeviceFetcher, ReleaseClient
        from agent.updater import PauseHook, Updater, UpdaterConfig
        from protocol.device_auth import sign_request

        assert self.update_store is not None and self.reporter is not None
        device_id = self.config.device.id
        key = load_private_key(self.paths)

        def auth(method: str, target: str) -> dict[str, str]:
            return {"Authorization": sign_request(key, device_id, method, target, time.time())}

        client = ReleaseClient(
            self.paths.trust_dir / "metadata",
            self.paths.root_json.read_bytes(),
            self.config.device.fleet_url.rstrip("/") + "/v1/repository",
            DeviceFetcher(auth=auth, ssl_context=https_context(self.config.device)),
        )
        return Updater(
            store=self.update_store,
            slots=self.slots,
            service=self.service,
            client=client,
            profile=self.profile,
            device_id=device_id,
            report=self._report_update,
            config=UpdaterConfig(
                downloads_dir=self.paths.root / "downloads",
                threads=self.profile.inference_threads,
                pause=PauseHook.from_env(os.environ),
                runtime_loader=self._runtime_loader,
            ),
            drift_factory=DriftAccumulator,
        )

    def _report_update(self, body: UpdateBody) -> None:
        """Report one update transition; when it switched the served model (into trial, back
        after a rollback), publish the retained state again so the fleet sees the running
        release now rather than at the next reconnect."""
        assert self.reporter is not None
        self.reporter.report_update(body)
        if body.to_state in MODEL_SWITCHED and self.link is not None:
            self.link.refresh_state()

    def update_status(self) -> UpdateFigures | None:
        """The current (or last) update for the health page."""
        if self._update_status is not None:
            return self._update_status()
        if self.updater is not None:
            figures: UpdateFigures | None = self.updater.figures()
            return figures
        if self.update_store is None:
            return None
        try:
            record = self.update_store.load()
        except AgentError as exc:
            return UpdateFigures("unknown", reason=str(exc))
        if record is None:
            return None
        result = f"{record.state.value} {record.model} v{record.version}"
        return UpdateFigures(
            record.state.value,
            result if record.state in TERMINAL else "",
            record.reason,
            record.entered_at,
        )

    # --- reports ------------------------------------------------------------------------------

    def _state(self) -> StateBody:
        # called on paho's network thread before each connect: cheap, never blocks
        model = self.service.current()
        active = None
        if model is not None:
            r = model.release
            active = ActiveModel(r.name, r.version, model.installed.slot, r.runtime)
        return StateBody(True, agent_version(), self.config.device.profile, active)

    def _system(self) -> SystemFigures:
        disk = shutil.disk_usage(self.paths.root)
        total, available = memory_bytes()
        return SystemFigures(
            rss_bytes=rss_bytes(),
            memory_total_bytes=total,
            memory_available_bytes=available,
            disk_total_bytes=disk.total,
            disk_free_bytes=disk.free,
            cpu_percent=self._cpu.percent(),
        )

    def heartbeat(self) -> None:
        """Report the vital signs (a periodic job)."""
        assert self.reporter is not None
        now = self._clock()
        system = self._system()
        stats = self.service.stats()
        model = self.service.current()
        latency = None
        if stats.p50 is not None and stats.p95 is not None and stats.p99 is not None:
            latency = Latency(stats.p50 * 1e3, stats.p95 * 1e3, stats.p99 * 1e3)
        body = HeartbeatBody(
            uptime_s=max(0.0, now - self._started_at),
            cpu_percent=system.cpu_percent,
            mem_rss_bytes=system.rss_bytes,
            mem_available_bytes=system.memory_available_bytes,
            disk_free_bytes=system.disk_free_bytes,
            outbox_depth=0,  # the reporter fills in the outbox's figures
            outbox_evicted_total=0,
            inferences_total=stats.requests,
            inference_errors_total=stats.errors,
            latency_ms=latency,
            model=None if model is None else ModelRef(model.release.name, model.release.version),
        )
        self.reporter.report_heartbeat(body, now)

    def _reportable(self, model: LoadedModel, policy: WindowPolicy) -> bool:
        rows = self.service.drift_rows(model)
        if rows and not policy.may_report(rows):
            log.info(
                "drift window of %d rows dropped: fewer than %d rows never leave the device",
                rows,
                policy.min_report_rows,
            )
        return policy.may_report(rows)

    def close_drift_window(self, force: bool = False) -> DriftSummary | None:
        """Close and report the drift window when the policy says so (or ``force``); a periodic
        job, and the last step before the link stops. When the served model changed (an update
        or a rollback) the old model's window ends at once. A window ended early (``force``, a
        model change) with fewer rows than the policy's privacy floor is dropped, not sent."""
        assert self.reporter is not None
        with self._window_lock:
            now = self._clock()
            model, current = self._window_model, self.service.current()
            start = self._window_start
            policy = self.window_policy
            if model is not current:
                self._window_model, self._window_start = current, now
                if model is None or not self._reportable(model, policy):
                    return None
            elif model is None:
                return None
            else:
                rows = self.service.drift_rows(model)
                due = (
                    self._reportable(model, policy)
                    if force
                    else policy.should_close(now, start, rows)
                )
                if not due:
                    return None
                self._window_start = now
            summary = self.service.close_drift_window(start, now, model)
            if summary is None:
                return None
        self.reporter.report_drift(summary, now)
        self._last_drift = summary
        log.info(
            "drift window closed: %d rows, %s",
            summary.counts.n,
            "DRIFT in " + ", ".join(summary.verdict.drifted_features)
            if summary.verdict.drifted
            else "no drift",
        )
        return summary

    # --- health -------------------------------------------------------------------------------

    def snapshot(self) -> HealthSnapshot:
        """The health endpoint's figures, gathered now."""
        now = self._clock()
        model = self.service.current()
        stats = self.service.stats()
        link = self.link.status() if self.link is not None else None
        outbox = self.outbox
        return assemble(
            agent_version=agent_version(),
            device_id=self.config.device.id,
            profile=self.config.device.profile,
            now=now,
            started_at=self._started_at,
            model=None
            if model is None
            else ModelFigures(
                model.release.name,
                model.release.version,
                model.installed.slot,
                model.release.runtime,
                model.release.format,
                model.loaded_at,
            ),
            broker_connected=bool(link and link.connected),
            outbox_depth=outbox.depth() if outbox is not None else 0,
            outbox_oldest_age_seconds=outbox.oldest_age(now) if outbox is not None else None,
            inference=InferenceFigures(
                requests=stats.requests,
                rows=stats.rows,
                rejected=stats.rejected,
                errors=stats.errors,
                p50_ms=_ms(stats.p50),
                p95_ms=_ms(stats.p95),
                p99_ms=_ms(stats.p99),
                latency_count=stats.latency_count,
                latency_seconds_total=stats.latency_seconds_total,
                latency_buckets=stats.latency_buckets,
            ),
            drift=None if self._last_drift is None else drift_figures(self._last_drift),
            update=self.update_status(),
            system=self._system(),
            model_error=self.model_error or "",
        )
