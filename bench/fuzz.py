"""The long fuzz run: every fuzz target with 10,000 generated cases, and its figures.

Runs the fuzz tests (``tests/protocol/test_fuzz.py``: device reports, drift summaries, the
signed desired document, device request headers and keys, the release manifest;
``tests/fleet/test_fuzz_ingest.py``: the fleet's ingest path on SQLite;
``tests/agent/test_fuzz_desired.py``: the agent's reading of refused desired documents;
``tests/fleet/test_api_fuzz.py``: schemathesis against the fleet API over HTTP) under
``EDGEFLEET_FUZZ=long`` and prints, per target, the cases run (hypothesis' passing plus failing
examples over all phases), crashes (failing examples: an exception other than the documented
error, a broken property, a 5xx) and the time taken. CI runs the same tests with a few hundred
cases each. It asserts nothing; the exit status is pytest's.

    .venv/bin/python bench/fuzz.py [-k EXPR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = (
    "tests/protocol/test_fuzz.py",
    "tests/fleet/test_fuzz_ingest.py",
    "tests/agent/test_fuzz_desired.py",
    "tests/fleet/test_api_fuzz.py",
)
_TEST = re.compile(r"^(\S+::\S+):$")
_COUNTS = re.compile(
    r"(\d+) passing(?: examples)?, (\d+) failing(?: examples)?,(?: and)? (\d+) invalid"
)
_STOP = re.compile(r"^\s*- Stopped because (.*)$")


@dataclass
class Figures:
    cases: int = 0
    failing: int = 0
    invalid: int = 0
    stopped: str = ""
    seconds: float = 0.0
    outcome: str = "?"


def parse_statistics(text: str) -> dict[str, Figures]:
    """Per test id, hypothesis' ``--hypothesis-show-statistics`` figures summed over phases."""
    out: dict[str, Figures] = {}
    current: Figures | None = None
    for line in text.splitlines():
        if m := _TEST.match(line.strip()):
            current = out.setdefault(m.group(1), Figures())
        elif current is not None and (m := _COUNTS.search(line)):
            current.cases += int(m.group(1)) + int(m.group(2))
            current.failing += int(m.group(2))
            current.invalid += int(m.group(3))
        elif current is not None and (m := _STOP.match(line)):
            current.stopped = m.group(1)
    return out


def outcomes(junit: Path) -> dict[str, tuple[str, float]]:
    """Per test name, its outcome and seconds from pytest's JUnit XML."""
    out: dict[str, tuple[str, float]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        outcome = "FAILED" if failed else "skipped" if skipped else "passed"
        out[case.get("name", "")] = (outcome, float(case.get("time", 0.0)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-k", dest="keyword", help="only the fuzz tests matching (pytest -k)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "fuzz.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--hypothesis-show-statistics",
            f"--junitxml={junit}",
            "--timeout=7200",
            *(["-k", args.keyword] if args.keyword else []),
            *TARGETS,
        ]
        started = time.monotonic()
        done = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, "EDGEFLEET_FUZZ": "long"},
            capture_output=True,
            text=True,
        )
        took = time.monotonic() - started
        stats = parse_statistics(done.stdout)
        results = outcomes(junit) if junit.exists() else {}
    rows = []
    for test_id, fig in stats.items():
        fig.outcome, fig.seconds = results.get(test_id.split("::")[-1], ("?", 0.0))
        rows.append((test_id, fig))
    print(f"{'target':<62} {'cases':>7} {'crashes':>7} {'invalid':>7} {'seconds':>8}  result")
    for test_id, fig in rows:
        crashes = fig.failing + (1 if fig.outcome == "FAILED" and not fig.failing else 0)
        print(
            f"{test_id:<62} {fig.cases:>7} {crashes:>7} {fig.invalid:>7} {fig.seconds:>8.1f}  "
            f"{fig.outcome}"
        )
        if fig.stopped and "max_examples" not in fig.stopped:
            print(f"{'':<4}stopped because {fig.stopped}")
    api = [f for t, f in rows if "test_api_fuzz" in t]
    if api:
        print(f"fleet API 5xx responses: {'0' if api[0].outcome == 'passed' else 'see failure'}")
    total = sum(f.cases for _, f in rows)
    print(f"{len(rows)} targets, {total} cases in {took:.0f} s; pytest exit {done.returncode}")
    if done.returncode != 0:
        print(done.stdout[-6000:], file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
