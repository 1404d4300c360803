"""A run's report accounting: what an agent wrote and the fleet did not store is *pending* while it
is still in the device's outbox (the broker had not acknowledged it when the agent stopped: it goes
out at the next start), and *lost* only when it is in neither place.

Real agents in a :class:`~simulators.host.DeviceHost`, a real Mosquitto and fleet app: the broker
stops under running agents, so the reports they write from then on (heartbeats, the last drift
window at stop) stay in their outboxes, as a report does when a starved host's agent runs out of
shutdown flush time (the 1,000-device rollout bench counted 16 such reports, one on each of 16
devices, as lost).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from agent.config import TelemetryConfig
from simulators.host import DeviceHost, DeviceSpec, HostSettings
from simulators.releases import build_release
from simulators.run import count_reports
from simulators.stack import running_stack, wait_for
from simulators.streams import StreamSpec


def test_reports_left_in_an_outbox_are_pending_and_only_missing_ones_are_lost(
    tmp_path: Path,
) -> None:
    telemetry = TelemetryConfig(
        heartbeat_seconds=0.5,
        drift_window_seconds=1.0,
        drift_min_rows=10,
        shutdown_flush_seconds=1.0,
    )
    with running_stack(tmp_path / "stack") as stack:
        stack.upload(build_release("v1", 1, tmp_path / "b1"))
        token = stack.enrollment_token(uses=2)
        settings = HostSettings(stack.url, telemetry, time.time(), 60.0)
        with DeviceHost(tmp_path / "devices", settings) as host:
            for i in range(2):
                spec = DeviceSpec(f"d{i}", "x86_64-gateway", "g", StreamSpec.stable(5, i), 4, 0.05)
                host.enroll(spec, token)
            host.start_all()
            ids = [d.device_id for d in host.devices.values()]
            wait_for(
                "each device to have reports stored",
                lambda: all(len(s) >= 3 for s in stack.stored_seqs(ids).values()),
                60,
                0.2,
            )
            stack.broker.stop()  # from now on nothing the agents write is acknowledged
            wait_for(
                "reports to wait in both outboxes",
                lambda: all(len(s.pending) >= 2 for s in host.snapshots()),
                30,
                0.1,
            )
            host.stop_all()
            snaps = [dataclasses.asdict(s) for s in host.snapshots()]
        stack.broker.start()  # what it had acknowledged before it stopped reaches the fleet
        wait_for(
            "the fleet to store what the broker acknowledged",
            lambda: not count_reports(snaps, stack.stored_seqs(ids)).lost,
            30,
            0.2,
        )
        stored = stack.stored_seqs(ids)
        # what the fleet lacks is exactly what is still in the outboxes
        unstored = {d["device_id"]: set(d["sent"]) - stored[d["device_id"]] for d in snaps}
        assert all(unstored.values())  # sent minus stored alone would call these lost
        reports = count_reports(snaps, stored)
        assert reports.lost == {}
        assert reports.pending == unstored
        assert reports.sent == sum(len(d["sent"]) for d in snaps)
        assert reports.stored == reports.sent - sum(len(v) for v in unstored.values())

        # a report gone from the outbox that the fleet never stored is lost
        victim = snaps[0]
        gone = max(victim["pending"])
        db_path = tmp_path / "devices" / victim["name"] / "agent.db"
        with closing(sqlite3.connect(db_path)) as db, db:
            db.execute("DELETE FROM outbox WHERE seq = ?", (gone,))
            victim["pending"] = [seq for (seq,) in db.execute("SELECT seq FROM outbox")]
        reports = count_reports(snaps, stack.stored_seqs(ids))
        assert reports.lost == {victim["device_id"]: {gone}}
        assert gone not in reports.pending[victim["device_id"]]
