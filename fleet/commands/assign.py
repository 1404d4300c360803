"""``fleet assign`` and ``fleet device updates``: give devices a release, read their updates.

* ``fleet assign DEVICE --model M --version N [--rollback]`` and ``fleet assign --group G ...``
  post to ``/v1/devices/{id}/assignment`` / ``/v1/groups/{g}/assignment`` (operator token):
  the fleet signs a desired document per device and publishes it retained; a refusal prints
  the server's reason and exits 2. Documents the broker has not acknowledged yet are listed as
  pending (the fleet retries them).
* ``fleet device updates DEVICE`` prints the device's current update state and its update
  history (viewer token).

Both talk HTTP like ``fleet release`` (``--server``/``$EDGEFLEET_SERVER``,
``--token``/``$EDGEFLEET_TOKEN``) and reuse its client.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from fleet.commands.release import add_server_flags, call, client
from protocol.cli import CommandError, command_group


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "assign",
        help="assign a release (or a signed rollback) to a device or a group",
        description="Sign and publish a desired-release document for DEVICE, or for every "
        "active device of --group. The version must be newer than each device's current one; "
        "with --rollback it must be an older published version (an explicit, signed rollback).",
    )
    add_server_flags(parser)
    parser.add_argument("device", nargs="?", metavar="DEVICE", help="the device id")
    parser.add_argument("--group", default=None, help="every active device of this group")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--version", required=True, type=int, help="model version")
    parser.add_argument(
        "--rollback", action="store_true", help="go back to an older version (signed rollback)"
    )
    parser.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    parser.set_defaults(handler=assign)

    device = command_group(subparsers, "device", "read devices' update state")
    updates = device.add_parser(
        "updates", help="a device's update state and history (newest first)"
    )
    add_server_flags(updates)
    updates.add_argument("device", metavar="DEVICE")
    updates.add_argument("--limit", type=int, default=50, help="transitions to show")
    updates.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    updates.set_defaults(handler=show_updates)


def assign(args: argparse.Namespace) -> int:
    if bool(args.device) == bool(args.group):
        raise CommandError("name either a DEVICE or --group GROUP (one of them)")
    body = {"model": args.model, "version": args.version, "rollback": args.rollback}
    path = (
        f"/v1/groups/{args.group}/assignment"
        if args.group
        else (f"/v1/devices/{args.device}/assignment")
    )
    with client(args) as http:
        result = call(http, "POST", path, json=body)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    published = set(result["published"])
    what = "rollback to" if args.rollback else "assigned"
    print(f"{what} {args.model} v{args.version}: {len(result['assignments'])} device(s)")
    print(f"{'DEVICE':<40} {'SERIAL':>6} {'ARTIFACT':<24} STATE")
    for a in result["assignments"]:
        state = "published" if a["device_id"] in published else "pending"
        print(f"{a['device_id']:<40} {a['serial']:>6} {a['artifact']:<24} {state}")
    if result["pending"]:
        print(
            f"{len(result['pending'])} document(s) not published yet ({result['publish_error']});"
            " they are stored and the fleet retries them"
        )
    return 0


def _when(text: str | None) -> str:
    return datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M:%S") if text else "-"


def _release(model: Any, version: Any, rollback: Any = False) -> str:
    return f"{model} v{version}{' (rollback)' if rollback else ''}" if model else "-"


def show_updates(args: argparse.Namespace) -> int:
    with client(args) as http:
        got = call(http, "GET", f"/v1/devices/{args.device}/updates", params={"limit": args.limit})
    if args.json:
        print(json.dumps(got, indent=2, sort_keys=True))
        return 0
    cur = got["current"]
    desired = cur["desired"]
    print(
        f"device   {cur['device_id']} ({cur['status']}, {'online' if cur['online'] else 'offline'})"
    )
    if desired:
        state = "published" if desired["published"] else "not yet published"
        print(
            f"desired  {_release(desired['model'], desired['version'], desired['rollback'])}, "
            f"serial {desired['serial']}, {state}, expires {_when(desired['expires'])}"
        )
    else:
        print("desired  - (no assignment)")
    print(f"running  {_release(cur['running_model'], cur['running_version'])}")
    last = cur["last_transition"]
    if last:
        print(
            f"update   {_release(last['model'], last['version'], last['rollback'])}: "
            f"{last['to_state']}{' (' + last['reason'] + ')' if last['reason'] else ''}"
        )
    print(f"in sync  {'yes' if cur['in_sync'] else 'no'}")
    print(f"\nhistory ({len(got['history'])} of {got['total']} transitions, newest first)")
    print(f"{'TIME (device)':<19} {'RELEASE':<28} {'FROM':<13} {'TO':<13} {'TRY':>3} REASON")
    for t in got["history"]:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(t["elapsed_s"].items()))
        reason = (t["reason"] or "") + (f" [{steps}]" if steps else "")
        print(
            f"{_when(t['at']):<19} {_release(t['model'], t['version'], t['rollback']):<28} "
            f"{t['from_state']:<13} {t['to_state']:<13} {t['attempt']:>3} {reason}"
        )
    return 0
