"""Broker revocation benchmark: how long from rewriting the password file and SIGHUP until a
decommissioned device is kicked and refused, with many device users in the file and many of
them connected, against a baseline reload that changes nothing.

It runs a real Mosquitto shaped like ``deploy/mosquitto.conf`` (password and ACL files, no
anonymous; no TLS, which costs the same before and after a reload) and
:class:`fleet.broker_auth.BrokerAuthFiles`' file rendering. Figures: file write time, reload to
kick, reload to refused reconnect, and a still-valid device's connect time during the reload.

Run: ``.venv/bin/python -m bench.broker_revocation [--users 5000] [--connected 200]``.
Figures depend on the machine; compare them with the baseline of the same run.
"""

from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.atomic import write_atomic
from fleet.broker_auth import render_acl, render_passwords
from fleet.mqtt_credentials import mosquitto_hash
from simulators.broker import BrokerAuth, MosquittoBroker

PASSWORD = "bench-password"


class Device:
    def __init__(self, port: int, name: str) -> None:
        self.connack: queue.Queue[ReasonCode] = queue.Queue()
        self.gone: queue.Queue[float] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(name, PASSWORD)
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.client.on_disconnect = lambda c, u, f, rc, p: self.gone.put(time.monotonic())
        self.client.reconnect_delay_set(600, 600)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def accepted(self) -> bool:
        return not self.connack.get(timeout=30).is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--connected", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-revocation-"))
    auth = BrokerAuth(work / "passwd", work / "acl")
    names = [f"dev-{i:06d}" for i in range(args.users)]
    started = time.perf_counter()
    # one hash for all: the broker's cost of a line does not depend on its salt
    encoded = mosquitto_hash(PASSWORD)
    credentials = [(n, encoded) for n in names]
    write_atomic(auth.password_file, render_passwords(credentials).encode(), 0o640)
    write_atomic(auth.acl_file, render_acl("edgefleet-fleet").encode(), 0o640)
    print(f"password file: {args.users} users, {auth.password_file.stat().st_size} bytes")
    broker = MosquittoBroker(work / "mosquitto", auth=auth)
    with broker:
        devices = [Device(broker.port, n) for n in names[: args.connected]]
        assert all(d.accepted() for d in devices)
        print(f"{args.connected} devices connected ({time.perf_counter() - started:.1f} s setup)")

        # baseline: a reload that changes nothing
        t0 = time.perf_counter()
        write_atomic(auth.password_file, render_passwords(credentials).encode(), 0o640)
        write = time.perf_counter() - t0
        t0 = time.monotonic()
        broker.reload()
        probe = Device(broker.port, names[-1])
        assert probe.accepted()
        baseline = time.monotonic() - t0
        probe.close()
        print(f"rewrite the password file: {write * 1e3:.1f} ms")
        print(f"baseline: reload without change, then a valid connect: {baseline * 1e3:.1f} ms")

        # revoke the first connected device
        victim = devices[0]
        t0 = time.monotonic()
        write_atomic(auth.password_file, render_passwords(credentials[1:]).encode(), 0o640)
        broker.reload()
        kicked = victim.gone.get(timeout=60) - t0
        while True:
            again = Device(broker.port, names[0])
            refused = not again.accepted()
            again.close()
            if refused:
                break
        refused_after = time.monotonic() - t0
        probe = Device(broker.port, names[-1])
        assert probe.accepted()
        valid_after = time.monotonic() - t0
        probe.close()
        still = sum(1 for d in devices[1:] if d.gone.empty())
        print(
            f"revocation: kicked after {kicked * 1e3:.1f} ms, reconnect refused after "
            f"{refused_after * 1e3:.1f} ms, a valid device connected after "
            f"{valid_after * 1e3:.1f} ms; {still}/{len(devices) - 1} others stayed connected"
        )
        print(f"ratio revocation/baseline: {refused_after / baseline:.2f}")
        for d in devices[1:]:
            d.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
