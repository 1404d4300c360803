"""``edge-agent provision``: enroll this device with the fleet manager (see :mod:`agent.provision`).

Detects the firmware profile unless ``--profile`` names one, gathers the machine's facts, enrolls
and stores the identity in the state directory; ``--systemd-unit PATH`` also writes a unit file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from agent.config import ConfigError, HttpConfig, Listen, add_state_dir_argument, resolve_state_dir
from agent.errors import AgentError
from agent.machine import probe
from agent.version import agent_version
from firmware_profiles import load_profiles
from protocol.cli import CommandError
from protocol.profiles import select_profile

TOKEN_ENV = "EDGEFLEET_ENROLL_TOKEN"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "provision",
        help="enroll this device with the fleet manager",
        description="Generate this device's Ed25519 key (it never leaves the device), enroll "
        "with the fleet manager using an enrollment token, and store the device id, MQTT "
        "credentials, broker address and pinned TUF root in the state directory. Re-running on "
        "a provisioned device changes nothing unless --force.",
    )
    parser.add_argument("--fleet", required=True, metavar="URL", help="the fleet manager's URL")
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"the enrollment token (or set ${TOKEN_ENV}, which keeps it out of shell history)",
    )
    parser.add_argument("--profile", metavar="NAME", help="firmware profile (default: detected)")
    add_state_dir_argument(parser)
    parser.add_argument("--force", action="store_true", help="enroll again with a new key")
    parser.add_argument(
        "--systemd-unit",
        type=Path,
        metavar="PATH",
        help="also write a systemd unit running `edge-agent run` to PATH",
    )
    parser.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help=f"address of the health page (default {HttpConfig().health_listen}: the LAN)",
    )
    parser.add_argument(
        "--predict-listen",
        metavar="HOST:PORT",
        help=f"address of the predict API (default {HttpConfig().predict_listen}: loopback)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="enrollment timeout (seconds)"
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="the fleet CA to verify an https:// --fleet URL with at enrollment (default: the "
        "system's CAs); the CA the fleet returns is pinned afterwards",
    )
    parser.set_defaults(handler=run_provision)


def present_runtimes() -> list[str]:
    """The model runtimes installed here, found without importing them."""
    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append("onnxruntime")
    if any(importlib.util.find_spec(m) is not None for m in ("ai_edge_litert", "tflite_runtime")):
        found.append("litert")
    return found


def run_provision(args: argparse.Namespace) -> int:
    # imported here: cryptography costs ~8 MiB that `edge-agent run` must not carry
    from agent.provision import (
        AlreadyProvisionedError,
        device_facts,
        provision,
        write_systemd_unit,
    )

    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise CommandError(f"no enrollment token: pass --token TOKEN or set ${TOKEN_ENV}")
    state_dir = resolve_state_dir(args.state_dir, os.environ)
    facts = probe()
    profiles = load_profiles()
    if args.profile:
        if args.profile not in profiles:
            raise CommandError(
                f"no firmware profile named {args.profile!r}; known profiles: {', '.join(profiles)}"
            )
        profile = args.profile
    else:
        profile = select_profile(profiles.values(), facts).name
    try:
        config = provision(
            state_dir,
            args.fleet,
            token,
            profile,
            device_facts(facts, agent_version(), present_runtimes()),
            force=args.force,
            predict_listen=Listen.parse(args.predict_listen) if args.predict_listen else None,
            health_listen=Listen.parse(args.health_listen) if args.health_listen else None,
            timeout=args.timeout,
            ca_file=args.ca_file,
        )
    except AlreadyProvisionedError as exc:
        print(str(exc)[0].upper() + str(exc)[1:] + ".")
        return 0
    except (AgentError, ConfigError) as exc:
        raise CommandError(str(exc)) from None
    print(
        f"Provisioned as {config.device.id} (profile {profile}) with {config.device.fleet_url}; "
        f"broker {config.mqtt.host}:{config.mqtt.port}; state in {state_dir}."
    )
    if args.systemd_unit:
        try:
            write_systemd_unit(args.systemd_unit, state_dir)
        except AgentError as exc:
            raise CommandError(str(exc)) from None
        print(f"Wrote {args.systemd_unit}; enable it with `systemctl enable --now edge-agent`.")
    print(
        "Next: install the first model with `edge-agent model install BUNDLE_DIR` (factory) "
        "or let the fleet send one, then start the agent with `edge-agent run`.",
        file=sys.stdout,
    )
    return 0
