"""``fleet rollout``: start staged rollouts, watch them, and steer them.

* ``fleet rollout create --model M --version N [--group G | --tags a,b | --profiles p,q]``
  with ``--stages 1,10,50,100``, ``--soak 10m``, ``--max-wait 6h``, ``--policy
  pause|rollback`` and gate thresholds (``--min-success-rate``, ``--max-failures``,
  ``--latency-ratio``, ``--min-drift-n``, ``--drift-alpha``, ``--stuck-timeout``,
  ``--min-reporting``) posts to ``/v1/rollouts`` (operator token).
* ``fleet rollout list`` / ``fleet rollout show ID`` read rollouts (viewer); ``fleet rollout
  watch ID`` redraws a progress bar per stage (pending / updating / committed / failed /
  rolled back) and the gate verdicts until the rollout ends (exit 0 completed, 1 rolled back).
* ``fleet rollout pause|resume|promote|abort ID [--reason TEXT]`` (operator).

Tables by default, ``--json`` for scripts. HTTP like ``fleet release`` (``--server`` /
``$EDGEFLEET_SERVER``, ``--token`` / ``$EDGEFLEET_TOKEN``); a refusal prints the server's reason
and exits 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from fleet.commands.release import add_server_flags, call, client

BAR_WIDTH = 30
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
ENDED = ("completed", "rolled_back")


def duration(text: str) -> float:
    """Seconds of ``90``, ``90s``, ``10m``, ``6h``, ``1d``."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 90s, 10m, 6h")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def percents(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of percentages; write e.g. 1,10,50,100"
        ) from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("rollout", help="staged rollouts: create, watch, steer")
    sub = parser.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)

    create = sub.add_parser(
        "create",
        help="start a staged rollout of a release",
        description="Roll MODEL v VERSION out to a target (default: every active device) in "
        "stages; each stage soaks, then its gates (update success, trial failures, latency vs "
        "the old release, drift of canaries vs control) decide: next stage, or the policy.",
    )
    add_server_flags(create)
    create.add_argument("--model", required=True)
    create.add_argument("--version", required=True, type=int)
    target = create.add_mutually_exclusive_group()
    target.add_argument("--group", default=None, help="the devices of this group")
    target.add_argument("--tags", default=None, help="devices with all these tags (a,b)")
    target.add_argument("--profiles", default=None, help="devices of these profiles (p,q)")
    create.add_argument(
        "--stages", type=percents, default=None, help="cumulative percentages (1,10,50,100)"
    )
    create.add_argument("--soak", type=duration, default=None, help="minimum time per stage")
    create.add_argument(
        "--max-wait", type=duration, default=None, help="how long a stage waits for data"
    )
    create.add_argument("--policy", choices=("pause", "rollback"), default="rollback")
    create.add_argument("--min-success-rate", type=float, default=None)
    create.add_argument("--max-failures", type=int, default=None)
    create.add_argument("--max-trial-failures", type=int, default=None)
    create.add_argument("--latency-ratio", type=float, default=None)
    create.add_argument("--min-drift-n", type=int, default=None)
    create.add_argument("--drift-alpha", type=float, default=None)
    create.add_argument("--min-reporting", type=int, default=None)
    create.add_argument("--stuck-timeout", type=duration, default=None)
    create.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    create.set_defaults(handler=create_rollout)

    listing = sub.add_parser("list", help="list rollouts, newest first")
    add_server_flags(listing)
    listing.add_argument("--state", default=None, help="only rollouts in this state")
    listing.add_argument("--model", default=None, help="only this model's rollouts")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=list_rollouts)

    show = sub.add_parser("show", help="a rollout: stages, gate verdicts, history")
    add_server_flags(show)
    show.add_argument("rollout_id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=show_rollout)

    watch = sub.add_parser("watch", help="live progress per stage and gate verdicts")
    add_server_flags(watch)
    watch.add_argument("rollout_id", metavar="ID")
    watch.add_argument("--interval", type=duration, default=2.0, help="seconds between frames")
    watch.add_argument("--once", action="store_true", help="print one frame and exit")
    watch.set_defaults(handler=watch_rollout)

    for action, text in (
        ("pause", "pause a running rollout"),
        ("resume", "resume a paused rollout (the stage's soak starts over)"),
        ("promote", "start the next stage now, whatever the gates say"),
        ("abort", "roll back every device the rollout assigned"),
    ):
        p = sub.add_parser(action, help=text)
        add_server_flags(p)
        p.add_argument("rollout_id", metavar="ID")
        p.add_argument("--reason", default="", help="why (kept in the audit log)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=control_rollout, action=action)


def _body(args: argparse.Namespace) -> dict[str, Any]:
    target: dict[str, Any] = {"kind": "all", "values": []}
    if args.group:
        target = {"kind": "group", "values": [args.group]}
    elif args.tags:
        target = {"kind": "tags", "values": [t for t in args.tags.split(",") if t]}
    elif args.profiles:
        target = {"kind": "profiles", "values": [p for p in args.profiles.split(",") if p]}
    body: dict[str, Any] = {
        "model": args.model,
        "version": args.version,
        "target": target,
        "policy": args.policy,
    }
    if args.stages or args.soak is not None or args.max_wait is not None:
        stages = []
        for p in args.stages or [1.0, 10.0, 50.0, 100.0]:
            stage: dict[str, Any] = {"percent": p}
            if args.soak is not None:
                stage["soak_s"] = args.soak
            if args.max_wait is not None:
                stage["max_wait_s"] = args.max_wait
            stages.append(stage)
        body["stages"] = stages
    gates = {
        "min_success_rate": args.min_success_rate,
        "max_failures": args.max_failures,
        "max_trial_failures": args.max_trial_failures,
        "latency_ratio": args.latency_ratio,
        "min_drift_n": args.min_drift_n,
        "drift_alpha": args.drift_alpha,
        "min_reporting": args.min_reporting,
        "stuck_timeout_s": args.stuck_timeout,
    }
    body["gates"] = {k: v for k, v in gates.items() if v is not None}
    return body


def _target(r: dict[str, Any]) -> str:
    t = r["target"]
    return "all" if t["kind"] == "all" else f"{t['kind']}:{','.join(t['values'])}"


def _print_rollout(r: dict[str, Any]) -> None:
    stages = " -> ".join(f"{s['percent']:g}%" for s in r["stages"])
    print(f"rollout {r['id']}: {r['model']} v{r['version']} to {_target(r)}")
    print(f"state   {r['state']}, stage {r['stage'] + 1} of {len(r['stages'])} ({stages})")
    print(f"policy  {r['policy']} on a failing gate")
    if r["reason"]:
        print(f"reason  {r['reason']}")


def create_rollout(args: argparse.Namespace) -> int:
    with client(args) as http:
        r = call(http, "POST", "/v1/rollouts", json=_body(args))
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return 0
    _print_rollout(r)
    return 0


def list_rollouts(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("state", args.state), ("model", args.model)) if v}
    with client(args) as http:
        rollouts = call(http, "GET", "/v1/rollouts", params=params)
    if args.json:
        print(json.dumps(rollouts, indent=2, sort_keys=True))
        return 0
    print(
        f"{'ID':<16} {'MODEL':<20} {'VERSION':>7} {'TARGET':<20} {'STATE':<13} {'STAGE':>5} CREATED"
    )
    for r in rollouts:
        print(
            f"{r['id']:<16} {r['model']:<20} {r['version']:>7} {_target(r):<20} "
            f"{r['state']:<13} {r['stage'] + 1:>2}/{len(r['stages']):<2} "
            f"{r['created_at'][:16].replace('T', ' ')}"
        )
    return 0


def _bar(stage: dict[str, Any]) -> str:
    """A bar of committed (#), failed (!), rolled back (<), updating (~), pending (.)."""
    total = stage["devices"]
    if total == 0:
        return " " * BAR_WIDTH
    parts = [
        ("#", stage["committed"]),
        ("!", stage["failed"]),
        ("<", stage["rolled_back"]),
        ("~", stage["updating"]),
    ]
    bar = ""
    for char, count in parts:
        bar += char * round(BAR_WIDTH * count / total)
    return (bar + "." * BAR_WIDTH)[:BAR_WIDTH]


def render(status: dict[str, Any]) -> str:
    """One frame of ``watch`` / the body of ``show``."""
    r = status["rollout"]
    lines = [
        f"rollout {r['id']}: {r['model']} v{r['version']} to {_target(r)} — {r['state']}, "
        f"stage {r['stage'] + 1}/{len(r['stages'])}, policy {r['policy']}",
        f"{'STAGE':<11} {'':<{BAR_WIDTH + 2}} {'DEVICES':>7} {'PEND':>5} {'UPD':>5} "
        f"{'OK':>5} {'FAIL':>5} {'RB':>5}  STATUS",
    ]
    for s in status["stages"]:
        lines.append(
            f"{s['index'] + 1:>2} {s['percent']:>6g}%  [{_bar(s)}] {s['devices']:>7} "
            f"{s['pending']:>5} {s['updating']:>5} {s['committed']:>5} {s['failed']:>5} "
            f"{s['rolled_back']:>5}  {s['status']}"
        )
    lines.append("gates:")
    for v in r["verdicts"] or []:
        lines.append(f"  {v['gate']:<10} {v['status'].upper():<5} {v['reason']}")
    if not r["verdicts"]:
        lines.append("  (not evaluated yet)")
    if r["reason"]:
        lines.append(f"now: {r['reason']}")
    return "\n".join(lines)


def show_rollout(args: argparse.Namespace) -> int:
    with client(args) as http:
        status = call(http, "GET", f"/v1/rollouts/{args.rollout_id}")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(render(status))
    print("\nhistory:")
    for e in status["events"]:
        frm = e["from_state"] or "-"
        print(
            f"  {e['ts'][:19].replace('T', ' ')}  {e['event']:<21} {frm:>12} -> "
            f"{e['to_state']:<12} stage {e['stage'] + 1}  {e['actor']}  {e['reason']}"
        )
    return 0


def watch_rollout(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    with client(args) as http:
        while True:
            status = call(http, "GET", f"/v1/rollouts/{args.rollout_id}")
            frame = render(status)
            if tty:
                print("\x1b[2J\x1b[H" + frame, flush=True)
            else:
                print(frame + "\n", flush=True)
            state = status["rollout"]["state"]
            if args.once or state in ENDED:
                return 1 if state == "rolled_back" else 0
            time.sleep(args.interval)


def control_rollout(args: argparse.Namespace) -> int:
    with client(args) as http:
        r = call(
            http,
            "POST",
            f"/v1/rollouts/{args.rollout_id}/{args.action}",
            json={"reason": args.reason},
        )
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return 0
    _print_rollout(r)
    return 0
