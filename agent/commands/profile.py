"""``edge-agent profile show``: the machine's facts and the firmware profile chosen for it.

Reads the profile files (:mod:`firmware_profiles`) and probes the machine
(:mod:`agent.machine`); the choice itself is :func:`protocol.profiles.select_profile`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from agent.machine import probe
from firmware_profiles import PROFILE_DIR, load_profiles
from protocol.cli import CommandError
from protocol.profiles import FirmwareProfile, select_profile


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("profile", help="firmware profiles of this device")
    sub = parser.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    show = sub.add_parser(
        "show",
        help="show the profile for this machine (detected) or a named one",
        description="Without --profile, probe this machine, print its facts and the profile "
        "chosen for it.",
    )
    show.add_argument("--profile", metavar="NAME", help="show this profile instead of detecting")
    show.add_argument(
        "--dir",
        type=Path,
        default=PROFILE_DIR,
        metavar="DIR",
        help="directory of profile files (default: the shipped profiles)",
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=show_profile)


def show_profile(args: argparse.Namespace) -> int:
    profiles = load_profiles(args.dir)
    facts = None
    if args.profile is not None:
        if args.profile not in profiles:
            raise CommandError(
                f"no profile named {args.profile!r} in {args.dir}; known profiles: "
                f"{', '.join(profiles)} (see `fleet profiles list`)"
            )
        profile = profiles[args.profile]
    else:
        facts = probe()
        profile = select_profile(profiles.values(), facts)
    if args.json:
        doc = {
            "machine": None if facts is None else dataclasses.asdict(facts),
            "profile": dataclasses.asdict(profile),
            "detected": facts is not None,
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    if facts is not None:
        print("machine")
        print(f"  {'arch':<12} {facts.arch}")
        print(f"  {'cores':<12} {facts.cores}")
        print(f"  {'ram':<12} {facts.ram_mb} MiB")
        print(f"  {'board':<12} {facts.board or '(unknown)'}")
    print(f"profile {profile.name}" + (" (detected)" if facts is not None else ""))
    for line in profile_lines(profile):
        print(f"  {line}")
    return 0


def profile_lines(profile: FirmwareProfile) -> list[str]:
    """A profile as aligned ``field  value`` lines."""
    rows = [
        ("description", profile.description),
        ("arch", profile.arch),
        ("cores", str(profile.cores)),
        ("ram", f"{profile.ram_mb} MiB"),
        ("storage", f"{profile.storage_mb} MiB"),
        ("runtimes", ", ".join(profile.runtimes)),
        ("preferred", f"{profile.preferred_format} {profile.preferred_quantization}"),
        ("threads", str(profile.inference_threads)),
        ("latency", f"{profile.latency_budget_ms:g} ms budget"),
        ("max model", f"{profile.max_model_bytes} bytes"),
        ("board", ", ".join(profile.board_markers) or "-"),
    ]
    return [f"{key:<12} {value}" for key, value in rows]
