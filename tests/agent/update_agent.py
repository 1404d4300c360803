"""A device agent cut down to the update engine, for the power-loss tests.

Builds the real parts from a state directory (A/B slots, inference service serving the active
slot, SQLite update store, TUF client with device credentials), starts the engine (which resumes
or reverts what it finds), feeds it ``desired.bin`` as the MQTT retained message would be after
every connect, serves live traffic (golden inputs, one row at a time) and exits 0 once no update is
under way, printing the final state. ``EDGEFLEET_TEST_PAUSE_IN`` / ``EDGEFLEET_TEST_PAUSE_MARKER``
make it block inside a state so the test can SIGKILL it there.

    python tests/agent/update_agent.py STATE_DIR BASE_URL TOKEN
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.drift import DriftAccumulator  # noqa: E402
from agent.inference import InferenceService, load_model  # noqa: E402
from agent.slots import Slots  # noqa: E402
from agent.tuf_client import DeviceFetcher, ReleaseClient, RetryPolicy  # noqa: E402
from agent.update_store import UpdateStore  # noqa: E402
from agent.updater import PauseHook, Updater, UpdaterConfig  # noqa: E402
from firmware_profiles import load_profile  # noqa: E402
from protocol.golden import GoldenSet  # noqa: E402


def main() -> int:
    root, base_url, token = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    profile = dataclasses.replace(load_profile("x86_64-gateway"), latency_budget_ms=1000.0)
    slots = Slots(root / "slots")
    service = InferenceService()
    installed = slots.active_release()
    if installed is not None:
        try:
            service.swap(load_model(installed, 1, DriftAccumulator))
        except Exception as exc:  # noqa: BLE001 - as the agent's main: keep going, recover
            logging.error("cannot load the active model: %s", exc)
    store = UpdateStore(root / "agent.db")
    fetcher = DeviceFetcher(
        auth=lambda method, target: {"Authorization": f"Bearer {token}"},
        retry=RetryPolicy(attempts=2, base_delay=0.0, jitter=0.0, timeout=5.0),
    )
    client = ReleaseClient(
        root / "trust" / "metadata", (root / "trust" / "root.json").read_bytes(), base_url, fetcher
    )
    updater = Updater(
        store=store,
        slots=slots,
        service=service,
        client=client,
        profile=profile,
        device_id=sys.argv[4] if len(sys.argv) > 4 else "dev-1",
        report=lambda body: print(f"REPORT {body.from_state} {body.to_state}", flush=True),
        config=UpdaterConfig(
            downloads_dir=root / "downloads",
            retry_base_seconds=0.01,
            max_transient_failures=3,
            trial_sample_seconds=0.05,
            trial_max_seconds=2.0,
            pause=PauseHook.from_env(os.environ),
        ),
        drift_factory=DriftAccumulator,
    )
    golden = GoldenSet.from_json((root / "traffic.json").read_bytes())
    stop = threading.Event()

    def traffic() -> None:
        for i in itertools.cycle(range(golden.n)):
            if stop.wait(0.002):
                return
            try:
                service.predict(golden.inputs[i : i + 1])
            except Exception:  # noqa: BLE001, S112 - no model for a moment is not the test
                continue

    traffic_thread = threading.Thread(target=traffic, daemon=True)
    traffic_thread.start()
    updater.start()
    desired = root / "desired.bin"
    if desired.exists():
        updater.submit(desired.read_bytes())
    record = updater.wait_settled(120.0)
    stop.set()
    traffic_thread.join()
    updater.stop()
    service.close()  # runtimes closed before the interpreter tears down their libraries
    store.close()
    print(f"FINAL {record.state if record else 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
