"""``fleet alert``: read and acknowledge the fleet's alerts, run the rules now.

* ``fleet alert list [--state open|resolved|all] [--kind KIND]`` — one line per alert
* ``fleet alert show ID [--json]`` — one alert and its webhook deliveries
* ``fleet alert ack ID`` — acknowledge (operator)
* ``fleet alert evaluate`` — run the alert rules at once (operator)

They talk HTTP to ``--server`` / ``$EDGEFLEET_SERVER`` with ``--token`` / ``$EDGEFLEET_TOKEN``,
like ``fleet release``; a refusal prints the server's reason and exits 2.
"""

from __future__ import annotations

import argparse
import json

from fleet.alerts import AlertKind
from fleet.commands.release import add_server_flags, call, client


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("alert", help="the fleet's alerts")
    sub = parser.add_subparsers(dest="alert_command", metavar="ACTION", required=True)

    listing = sub.add_parser("list", help="list alerts, newest first")
    add_server_flags(listing)
    listing.add_argument("--state", choices=("open", "resolved", "all"), default="open")
    listing.add_argument("--kind", choices=[k.value for k in AlertKind], default=None)
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(handler=list_alerts)

    show = sub.add_parser("show", help="one alert and its webhook deliveries")
    add_server_flags(show)
    show.add_argument("alert_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print it as JSON")
    show.set_defaults(handler=show_alert)

    ack = sub.add_parser("ack", help="acknowledge an alert (operator)")
    add_server_flags(ack)
    ack.add_argument("alert_id", metavar="ID")
    ack.set_defaults(handler=ack_alert)

    evaluate = sub.add_parser("evaluate", help="run the alert rules now (operator)")
    add_server_flags(evaluate)
    evaluate.set_defaults(handler=evaluate_alerts)


def _line(a: dict[str, object]) -> str:
    state = "resolved" if a["resolved_at"] else ("acked" if a["acknowledged_at"] else "OPEN")
    opened = str(a["opened_at"])[:16].replace("T", " ")
    return f"{a['id']:<16} {state:<8} {a['severity']:<8} {a['kind']:<22} {opened}  {a['message']}"


def list_alerts(args: argparse.Namespace) -> int:
    params: dict[str, str | int] = {"state": args.state, "limit": args.limit}
    if args.kind:
        params["kind"] = args.kind
    with client(args) as http:
        alerts = call(http, "GET", "/v1/alerts", params=params)
    print(f"{'ID':<16} {'STATE':<8} {'SEVERITY':<8} {'KIND':<22} {'OPENED':<17} MESSAGE")
    for a in alerts:
        print(_line(a))
    return 0


def show_alert(args: argparse.Namespace) -> int:
    with client(args) as http:
        got = call(http, "GET", f"/v1/alerts/{args.alert_id}")
    if args.json:
        print(json.dumps(got, indent=2, sort_keys=True))
        return 0
    a = got["alert"]
    print(_line(a))
    print(f"key {a['key']}; opened {a['opened_at']}; resolved {a['resolved_at'] or '-'}")
    if a["acknowledged_at"]:
        print(f"acknowledged {a['acknowledged_at']} by {a['acknowledged_by']}")
    for key, value in sorted(a["details"].items()):
        print(f"  {key} = {value}")
    for d in got["deliveries"]:
        status = "delivered" if d["delivered_at"] else ("gave up" if d["gave_up_at"] else "pending")
        print(
            f"  webhook {d['webhook_id']} {d['event']}: {status} after {d['attempts']} "
            f"attempt(s){'; ' + d['last_error'] if d['last_error'] else ''}"
        )
    return 0


def ack_alert(args: argparse.Namespace) -> int:
    with client(args) as http:
        a = call(http, "POST", f"/v1/alerts/{args.alert_id}/acknowledge")
    print(f"acknowledged {a['id']} ({a['message']})")
    return 0


def evaluate_alerts(args: argparse.Namespace) -> int:
    with client(args) as http:
        r = call(http, "POST", "/v1/alerts/evaluate")
    print(f"{r['open']} alert(s) open; opened {len(r['opened'])}, resolved {len(r['resolved'])}")
    return 0
