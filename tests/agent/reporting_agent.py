"""A minimal agent for the reporting tests: the real outbox, MQTT link, reporter and scheduler.

Reports a heartbeat every ``--interval`` seconds (an APScheduler job, as the agent's main does)
and prints each report's sequence number on stdout once the report is durably in the outbox.
SIGTERM stops it cleanly (flush, offline state, disconnect); tests also SIGKILL it. With
``--refresh-on-stdin`` each line read on stdin makes the running model's version one higher
(``vibration`` v1, v2, ...) and refreshes the retained state, as a committed update does.

    python tests/agent/reporting_agent.py --db DB --device ID --host H --port P [--interval S]
        [--refresh-on-stdin]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.mqtt_link import LinkConfig, MqttLink  # noqa: E402
from agent.outbox import Outbox  # noqa: E402
from agent.reporter import PeriodicJob, Reporter, start_periodic  # noqa: E402
from protocol.messages import ActiveModel, HeartbeatBody, StateBody  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--max-rows", type=int, default=100_000)
    parser.add_argument("--refresh-on-stdin", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    outbox = Outbox(args.db, args.device, max_rows=args.max_rows)
    state = StateBody(online=True, agent_version="test", profile="x86-generic")
    link = MqttLink(LinkConfig(args.device, args.host, args.port), outbox, lambda: state)
    reporter = Reporter(outbox, link)
    beats = 0

    def heartbeat() -> None:
        nonlocal beats
        beats += 1
        seq = reporter.report_heartbeat(HeartbeatBody(beats, 1.0, 1, 2, 3, 0, 0, beats, 0))
        print(seq, flush=True)

    def refresh_on_stdin() -> None:
        nonlocal state
        for version, _line in enumerate(sys.stdin, start=1):
            model = ActiveModel("vibration", version, "b", "litert")
            state = dataclasses.replace(state, model=model)
            link.refresh_state()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    link.start()
    if args.refresh_on_stdin:
        threading.Thread(target=refresh_on_stdin, daemon=True).start()
    scheduler = start_periodic([PeriodicJob("heartbeat", args.interval, heartbeat)])
    stop.wait()
    scheduler.shutdown(wait=True)
    link.stop(timeout=5.0)
    outbox.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
