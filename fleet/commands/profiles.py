"""``fleet profiles list``: the firmware profiles (device classes) releases can target.

Reads the profile files through :func:`firmware_profiles.load_profiles`; validation errors name
the file and the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from firmware_profiles import PROFILE_DIR, load_profiles

_COLUMNS = (
    "name",
    "arch",
    "cores",
    "ram MiB",
    "runtimes",
    "preferred",
    "threads",
    "budget ms",
    "max model",
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("profiles", help="firmware profiles (device classes)")
    sub = parser.add_subparsers(dest="profiles_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="list the firmware profiles")
    listing.add_argument(
        "--dir",
        type=Path,
        default=PROFILE_DIR,
        metavar="DIR",
        help="directory of profile files (default: the shipped profiles)",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=list_profiles)


def list_profiles(args: argparse.Namespace) -> int:
    profiles = load_profiles(args.dir)
    if args.json:
        print(json.dumps([dataclasses.asdict(p) for p in profiles.values()], indent=2))
        return 0
    rows = [
        (
            p.name,
            p.arch,
            str(p.cores),
            str(p.ram_mb),
            ",".join(p.runtimes),
            f"{p.preferred_format} {p.preferred_quantization}",
            str(p.inference_threads),
            f"{p.latency_budget_ms:g}",
            _size(p.max_model_bytes),
        )
        for p in profiles.values()
    ]
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    for row in [_COLUMNS, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"
