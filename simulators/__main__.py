"""``python -m simulators``: run a scenario of virtual devices, or check a scenario file.

* ``python -m simulators run SCENARIO [--devices N] [--processes K] [--workdir DIR]`` starts
  its own Mosquitto and fleet manager in a temp directory (or DIR, kept afterwards), runs the
  scenario (:mod:`simulators.run`), prints what happened as it happens and a summary, and exits
  1 when an expected outcome was not met (2 for a bad scenario file). With ``--fleet-url URL``
  it runs against that fleet manager instead (and the broker it enrolls devices with), given an
  admin's and an operator's API token in ``$FLEET_ADMIN_TOKEN`` and ``$FLEET_OPERATOR_TOKEN``.
* ``python -m simulators check SCENARIO...`` parses the files and says what each would run.

``SCENARIO`` is a path or the name of a file in ``simulators/scenarios/`` (without ``.toml``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from simulators.scenario import ScenarioError, ScenarioSpec, load_scenario

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
TOKEN_ENVS = ("FLEET_ADMIN_TOKEN", "FLEET_OPERATOR_TOKEN")


def find_scenario(name: str) -> Path:
    """A path as given, else ``simulators/scenarios/NAME.toml``."""
    path = Path(name)
    if path.exists() or path.suffix == ".toml":
        return path
    return SCENARIOS / f"{name}.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulators", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario against its own broker and fleet manager")
    run.add_argument("scenario", help="a scenario file, or a name in simulators/scenarios/")
    run.add_argument("--devices", type=int, help="fleet size (default: the scenario's)")
    run.add_argument("--processes", type=int, help="host processes (default: the scenario's)")
    run.add_argument("--workdir", type=Path, help="keep the run's files here (default: a temp dir)")
    run.add_argument(
        "--fleet-url",
        help="run against this fleet manager (tokens in $FLEET_ADMIN_TOKEN, $FLEET_OPERATOR_TOKEN)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log the fleet's warnings too")
    check = sub.add_parser("check", help="check scenario files without running them")
    check.add_argument("scenario", nargs="+")
    return parser


def _describe(spec: ScenarioSpec) -> str:
    rollouts = ", ".join(f"v{r.version} -> {r.expect}" for r in spec.rollouts) or "none"
    faults = ", ".join(f"{f.count} {f.kind}" for f in spec.faults) or "none"
    return (
        f"{spec.source}: {spec.name}: {spec.devices} devices in {len(spec.groups)} group(s) over "
        f"{spec.processes} process(es); rollouts {rollouts}; faults {faults}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            for name in args.scenario:
                print(_describe(load_scenario(find_scenario(name))))
            return 0
        spec = load_scenario(find_scenario(args.scenario))
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.devices is not None and args.devices < 1:
        print("error: --devices must be at least 1", file=sys.stderr)
        return 2
    if args.processes is not None:
        spec = dataclasses.replace(spec, processes=max(1, args.processes))
    tokens = (os.environ.get(TOKEN_ENVS[0], ""), os.environ.get(TOKEN_ENVS[1], ""))
    if args.fleet_url and not all(tokens):
        print(
            f"error: --fleet-url needs an admin's and an operator's API token in ${TOKEN_ENVS[0]} "
            f"and ${TOKEN_ENVS[1]} (`fleet tokens create`)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from simulators.run import run_scenario
    from simulators.stack import connect_fleet

    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    say(_describe(spec))
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    fleet = connect_fleet(args.fleet_url, *tokens) if args.fleet_url else None
    try:
        result = run_scenario(spec, args.workdir, devices=args.devices, say=say, fleet=fleet)
    finally:
        if fleet is not None:
            fleet.close()
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
