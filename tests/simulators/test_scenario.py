"""Scenario files: the shipped ones parse; every kind of mistake is one sentence naming the file,
the key and what is allowed; fleet plans follow from the seed (profiles, streams, faults)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from simulators.__main__ import SCENARIOS, main
from simulators.run import plan_fleet, rollout_body
from simulators.scenario import ScenarioError, load_scenario, parse_scenario
from simulators.streams import Scenario

BASE = """
name = "t"
devices = 12
[[groups]]
name = "a"
profiles = { "x86_64-gateway" = 3, "rpi3-armv7l" = 1 }
[[groups]]
name = "hot"
share = 0.5
stream = "environment"
features = ["bearing_temp_c"]
shift_sigma = 2.0
[[releases]]
version = 2
kind = "v2"
[[rollouts]]
version = 2
group = "a"
stages = [{ percent = 50, soak_s = 1 }, { percent = 100 }]
gates = { min_drift_n = 100 }
expect = "completed"
[[faults]]
kind = "offline"
count = 2
group = "a"
[[faults]]
kind = "health_check_fails"
count = 1
"""


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_scenarios_parse(path: Path) -> None:
    spec = load_scenario(path)
    assert spec.rollouts and all(r.expect for r in spec.rollouts)
    assert len(plan_fleet(spec).devices) == spec.devices


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('name = "t"', 'name = "t"\ncolour = 1', "t.toml: colour is not a known key; use"),
        ("devices = 12", "devices = 0", "t.toml: devices is 0; use a whole number >= 1"),
        ("devices = 12", 'devices = "many"', "t.toml: devices is 'many'; use a whole number"),
        ('kind = "v2"', 'kind = "v9"', "releases[0].kind is 'v9'; use one of v1, v2, collapsed"),
        ('group = "a"\nstages', 'group = "b"\nstages', "rollouts[0].group is 'b'; use one of a"),
        ("min_drift_n = 100", "min_drift = 100", "rollouts[0].gates.min_drift is not a known key"),
        ('expect = "completed"', 'expect = "done"', "rollouts[0].expect is 'done'; use one of"),
        ("percent = 100 }", "percent = 150 }", "rollouts[0].stages[1].percent is 150.0; use a"),
        ('kind = "offline"', 'kind = "meteor"', "faults[0].kind is 'meteor'; use one of offline"),
        ("count = 2", "count = 20", "faults pick 21 devices of 12; lower the counts"),
        ('"rpi3-armv7l" = 1', '"rpi5" = 1', "groups[0].profiles.rpi5 is not a known key"),
        ('features = ["bearing_temp_c"]', "features = []", "groups[1].features is empty"),
        ('stream = "environment"', 'stream = "chaos"', "groups[1].stream is 'chaos'; use one of"),
        ("version = 2\ngroup", "version = 5\ngroup", "rollouts[0].version is 5; roll out one of"),
        ('name = "t"', 'name = "t', "t.toml is not valid TOML"),
    ],
)
def test_mistakes_are_one_clear_sentence(old: str, new: str, message: str) -> None:
    assert old in BASE
    with pytest.raises(ScenarioError) as err:
        parse_scenario(BASE.replace(old, new, 1).encode(), "t.toml")
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text


def test_the_plan_follows_the_seed() -> None:
    spec = parse_scenario(BASE.encode(), "t.toml")
    plan = plan_fleet(spec)
    assert plan == plan_fleet(spec)
    groups = Counter(d.group for d in plan.devices)
    assert groups == {"a": 8, "hot": 4}
    profiles = Counter(d.profile for d in plan.devices if d.group == "a")
    assert profiles == {"x86_64-gateway": 6, "rpi3-armv7l": 2}
    hot = [d for d in plan.devices if d.group == "hot"]
    indices = frozenset(int(d.name.split("-")[1]) for d in hot)
    for d in hot:
        assert d.stream.scenario is Scenario.ENVIRONMENT and d.stream.devices == indices
    assert all(d.stream.scenario is Scenario.STABLE for d in plan.devices if d.group == "a")
    offline = {o.name for o in plan.offline}
    broken = {d.name for d in plan.devices if d.broken_accelerator}
    assert len(offline) == 2 and len(broken) == 1 and not offline & broken
    assert offline <= {d.name for d in plan.devices if d.group == "a"}
    assert len(plan_fleet(spec, devices=40).devices) == 40
    body = rollout_body(spec, 0)
    assert body["target"] == {"kind": "group", "values": ["a"]}
    assert body["stages"][1] == {"percent": 100.0, "soak_s": 2.0, "max_wait_s": 120.0}


def test_check_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["check", "smoke", "faults"]) == 0
    out = capsys.readouterr().out
    assert "smoke: 12 devices" in out and "faults: 20 devices" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.replace("devices = 12", "devices = -1"))
    assert main(["run", str(bad)]) == 2
    assert "bad.toml: devices is -1" in capsys.readouterr().err
