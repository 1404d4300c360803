"""``fleet device list`` and ``fleet device show``: the device registry from the command line.

* ``fleet device list [--group G] [--tag T]... [--profile P] [--online|--offline] [--status S]
  [--search TEXT] [--limit N]`` prints a table of devices (``GET /v1/devices``, viewer).
* ``fleet device show ID`` prints one device with what it last reported: running model, last
  heartbeat's latency and load, its newest update transition (``GET /v1/devices/{id}`` and
  ``/v1/devices/{id}/telemetry``).

Both join the ``fleet device`` group (``fleet device updates`` lives in
:mod:`fleet.commands.assign`), talk HTTP like ``fleet release`` and take ``--json``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fleet.commands.release import add_server_flags, call, client
from protocol.cli import command_group


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    device = command_group(subparsers, "device", "read devices and their update state")
    listing = device.add_parser("list", help="list devices (filter by group, tag, profile)")
    add_server_flags(listing)
    listing.add_argument("--group", default=None)
    listing.add_argument("--tag", action="append", default=[], help="repeat; all must match")
    listing.add_argument("--profile", default=None)
    listing.add_argument("--status", choices=("active", "decommissioned"), default=None)
    online = listing.add_mutually_exclusive_group()
    online.add_argument("--online", dest="online", action="store_true", default=None)
    online.add_argument("--offline", dest="online", action="store_false")
    listing.add_argument("--search", default=None, help="device id substring")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    listing.set_defaults(handler=list_devices)

    show = device.add_parser("show", help="one device and what it last reported")
    add_server_flags(show)
    show.add_argument("device", metavar="ID")
    show.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    show.set_defaults(handler=show_device)


def _when(text: str | None) -> str:
    return text[:19].replace("T", " ") if text else "-"


def list_devices(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    for key in ("group", "profile", "status", "search"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.tag:
        params["tag"] = args.tag
    if args.online is not None:
        params["online"] = str(args.online).lower()
    with client(args) as http:
        page = call(http, "GET", "/v1/devices", params=params)
    if args.json:
        print(json.dumps(page, indent=2, sort_keys=True))
        return 0
    print(f"{'DEVICE':<40} {'PROFILE':<16} {'GROUP':<12} {'STATUS':<14} {'ONLINE':<6} LAST SEEN")
    for d in page["items"]:
        print(
            f"{d['id']:<40} {d['profile']:<16} {d['group'] or '-':<12} {d['status']:<14} "
            f"{'yes' if d['online'] else 'no':<6} {_when(d['last_seen'])}"
        )
    shown = len(page["items"])
    if page["total"] > shown:
        print(f"({shown} of {page['total']}; --limit to see more)")
    return 0


def show_device(args: argparse.Namespace) -> int:
    with client(args) as http:
        device = call(http, "GET", f"/v1/devices/{args.device}")
        telemetry = call(http, "GET", f"/v1/devices/{args.device}/telemetry")
    if args.json:
        print(json.dumps({"device": device, "telemetry": telemetry}, indent=2, sort_keys=True))
        return 0
    online = "online" if device["online"] else "offline"
    print(f"device   {device['id']} ({device['status']}, {online})")
    print(f"profile  {device['profile']}  agent {device['agent_version'] or '-'}")
    print(f"group    {device['group'] or '-'}  tags {', '.join(device['tags']) or '-'}")
    print(f"enrolled {_when(device['enrolled_at'])}  last seen {_when(device['last_seen'])}")
    state = telemetry.get("state")
    model = state and state.get("model")
    print(
        "running  "
        + (
            f"{model['name']} v{model['version']} (slot {model['slot']}, {model['runtime']})"
            if model
            else "-"
        )
    )
    beat = telemetry.get("last_heartbeat")
    if beat:
        m = beat["metrics"]
        print("load     " + ", ".join(f"{k} {v:g}" for k, v in sorted(m.items()) if v is not None))
    update = telemetry.get("last_update")
    if update:
        reason = f" ({update['reason']})" if update["reason"] else ""
        print(
            f"update   {update['release_name']} v{update['release_version']}"
            f"{' (rollback)' if update['rollback'] else ''}: {update['from_state']} -> "
            f"{update['to_state']}{reason}"
        )
    return 0
