"""Scenario files: what a simulated run does, parsed and checked before anything starts.

A scenario is a TOML file (examples in ``simulators/scenarios/``)::

    name = "good-rollout"        # required
    description = "..."
    seed = 7                     # devices' streams, profile mix and fault picks follow from it
    devices = 24                 # fleet size (``--devices`` overrides it)
    processes = 2                # host processes the devices are spread over

    [timing]                     # all optional
    heartbeat_s = 1.0            # the agents' telemetry
    drift_window_s = 2.0
    drift_min_rows = 50
    predict_every_s = 0.2        # each device sends a batch this often...
    batch_rows = 4               # ...of this many rows
    time_scale = 60.0            # stream seconds per real second (gradual drift in minutes)
    latency_budget_scale = 10.0  # the profiles' latency budgets widened (agents share cores)
    warmup_s = 2.0               # devices report before the first rollout
    timeout_s = 300.0            # the whole run

    [[groups]]                   # at least one; devices are dealt by share
    name = "plant-a"
    share = 3                    # relative size
    profiles = { "x86_64-gateway" = 2, "rpi4-aarch64" = 1 }   # the firmware profile mix
    stream = "stable"            # stable | gradual | sudden | environment
    features = []                # the drifting features (gradual, sudden, environment)
    shift_sigma = 0.0            # sudden: the step; environment: the offset (in feature σ)
    sigma_per_hour = 0.0         # gradual: growth per stream hour
    at_s = 0.0                   # sudden: when the step happens; gradual: when drift starts

    [[releases]]                 # uploaded before the run (v1, the factory model, always is)
    version = 2
    kind = "v2"                  # v1 | v2 | collapsed (fails trial) | slow (fails health check)

    [[rollouts]]                 # run one after the other
    version = 2
    after_s = 0.0                # wait after the previous one ended (or the warmup)
    group = ""                   # target this group (default: every device)...
    profiles = []                # ...or these firmware profiles
    stages = [{ percent = 25, soak_s = 2 }, { percent = 100, soak_s = 2 }]
    gates = { min_drift_n = 200 }    # fleet.gates.GateConfig fields
    policy = "rollback"          # rollback | pause
    expect = "completed"         # completed | rolled_back | paused
    timeout_s = 120.0

    [[faults]]
    kind = "offline"             # offline | killed_mid_update | slow_download |
                                 # failing_download | health_check_fails
    count = 2                    # devices, picked by the seed (each device gets one fault)
    group = ""                   # pick among this group only
    at_s = 1.0                   # offline: seconds after the first rollout started
    for_s = 8.0                  # offline: how long
    state = "downloading"        # killed_mid_update: the update state the power is cut in
    rate = 4000                  # slow_download: bytes per second
    cuts = 2                     # failing_download: connections dropped...
    cut_after = 2000             # ...after this many bytes each

    [expect]
    versions = { "2" = 22, "1" = 2 }   # exact device counts per served version (optional)

Every key is checked: an unknown key or a bad value is a :class:`ScenarioError` whose one
sentence names the file, the key and what is allowed. Pure: parses bytes into frozen
dataclasses; running them is :mod:`simulators.run`'s job.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.update_states import UpdateState
from fleet.gates import GateConfig
from models.pdm_data import FEATURE_NAMES
from simulators.releases import KINDS
from simulators.streams import Scenario as StreamKind

PROFILES = ("jetson-aarch64", "rpi3-armv7l", "rpi4-aarch64", "x86_64-gateway")
FAULT_KINDS = (
    "offline",
    "killed_mid_update",
    "slow_download",
    "failing_download",
    "health_check_fails",
)
KILL_STATES = tuple(
    s.value
    for s in (
        UpdateState.DOWNLOADING,
        UpdateState.VERIFYING,
        UpdateState.INSTALLING,
        UpdateState.HEALTH_CHECK,
        UpdateState.ACTIVATING,
        UpdateState.TRIAL,
    )
)
ROLLOUT_EXPECT = ("completed", "rolled_back", "paused")
BAD_KINDS = frozenset({"collapsed", "slow"})


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Timing:
    heartbeat_s: float = 1.0
    drift_window_s: float = 2.0
    drift_min_rows: int = 50
    predict_every_s: float = 0.2
    batch_rows: int = 4
    time_scale: float = 60.0
    latency_budget_scale: float = 10.0
    warmup_s: float = 2.0
    timeout_s: float = 300.0


@dataclass(frozen=True)
class Group:
    name: str
    share: float = 1.0
    profiles: tuple[tuple[str, float], ...] = (("x86_64-gateway", 1.0),)
    stream: str = "stable"
    features: tuple[str, ...] = ()
    shift_sigma: float = 0.0
    sigma_per_hour: float = 0.0
    at_s: float = 0.0


@dataclass(frozen=True)
class ReleaseSpec:
    version: int
    kind: str


@dataclass(frozen=True)
class Stage:
    percent: float
    soak_s: float = 2.0
    max_wait_s: float = 120.0


@dataclass(frozen=True)
class RolloutSpec:
    version: int
    stages: tuple[Stage, ...]
    expect: str
    after_s: float = 0.0
    group: str = ""
    profiles: tuple[str, ...] = ()
    gates: tuple[tuple[str, Any], ...] = ()
    policy: str = "rollback"
    timeout_s: float = 120.0


@dataclass(frozen=True)
class Fault:
    kind: str
    count: int = 1
    group: str = ""
    at_s: float = 0.0
    for_s: float = 5.0
    state: str = "downloading"
    rate: float = 4000.0
    cuts: int = 2
    cut_after: int = 2000


@dataclass(frozen=True)
class Expect:
    versions: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    source: str
    groups: tuple[Group, ...]
    description: str = ""
    seed: int = 0
    devices: int = 10
    processes: int = 1
    timing: Timing = field(default_factory=Timing)
    releases: tuple[ReleaseSpec, ...] = ()
    rollouts: tuple[RolloutSpec, ...] = ()
    faults: tuple[Fault, ...] = ()
    expect: Expect = field(default_factory=Expect)

    def bad_versions(self) -> frozenset[int]:
        return frozenset(r.version for r in self.releases if r.kind in BAD_KINDS)


# --- checking -------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, what: str) -> ScenarioError:
        return ScenarioError(f"{self.source}: {key} {what}")

    def table(self, doc: Any, key: str, allowed: Mapping[str, object]) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise self.fail(key, "must be a table")
        unknown = sorted(set(doc) - set(allowed))
        if unknown:
            raise self.fail(
                f"{key}.{unknown[0]}" if key else unknown[0],
                f"is not a known key; use {', '.join(sorted(allowed))}",
            )
        return doc

    def number(
        self,
        doc: Mapping[str, Any],
        key: str,
        where: str,
        default: float,
        low: float = 0,
        strict: bool = False,
    ) -> float:
        value = doc.get(key, default)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < low or (strict and value <= low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise self.fail(f"{where}{key}", f"is {value!r}; use a number {bound}")
        return float(value)

    def integer(
        self, doc: Mapping[str, Any], key: str, where: str, default: int, low: int = 0
    ) -> int:
        value = doc.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(f"{where}{key}", f"is {value!r}; use a whole number >= {low}")
        return value

    def choice(
        self, doc: Mapping[str, Any], key: str, where: str, default: str, allowed: tuple[str, ...]
    ) -> str:
        value = doc.get(key, default)
        if value not in allowed:
            raise self.fail(f"{where}{key}", f"is {value!r}; use one of {', '.join(allowed)}")
        return str(value)

    def text(self, doc: Mapping[str, Any], key: str, where: str, default: str = "") -> str:
        value = doc.get(key, default)
        if not isinstance(value, str):
            raise self.fail(f"{where}{key}", f"is {value!r}; use a string")
        return value

    def strings(
        self, doc: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...] | None = None
    ) -> tuple[str, ...]:
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{where}{key}", f"is {value!r}; use a list of strings")
        if allowed is not None:
            for v in value:
                if v not in allowed:
                    raise self.fail(
                        f"{where}{key}", f"names {v!r}; use names from {', '.join(allowed)}"
                    )
        return tuple(value)

    def array(self, doc: Mapping[str, Any], key: str) -> list[Any]:
        value = doc.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, f"must be an array of tables ([[{key}]])")
        return value


def _fields(cls: type) -> dict[str, object]:
    return {f.name: None for f in dataclasses.fields(cls)}


def parse_scenario(data: bytes, source: str = "<scenario>") -> ScenarioSpec:
    """Parse and check a scenario file's bytes; ``source`` names it in errors."""
    c = _Checker(source)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{source} is not valid TOML ({exc}); fix the syntax") from None
    top = {
        "name",
        "description",
        "seed",
        "devices",
        "processes",
        "timing",
        "groups",
        "releases",
        "rollouts",
        "faults",
        "expect",
    }
    c.table(doc, "", dict.fromkeys(top))
    if not isinstance(doc.get("name"), str) or not doc["name"]:
        raise c.fail("name", "is missing; give the scenario a name")
    t = c.table(doc.get("timing", {}), "timing", _fields(Timing))
    d = Timing()
    timing = Timing(
        heartbeat_s=c.number(t, "heartbeat_s", "timing.", d.heartbeat_s, strict=True),
        drift_window_s=c.number(t, "drift_window_s", "timing.", d.drift_window_s, strict=True),
        drift_min_rows=c.integer(t, "drift_min_rows", "timing.", d.drift_min_rows, 1),
        predict_every_s=c.number(t, "predict_every_s", "timing.", d.predict_every_s, strict=True),
        batch_rows=c.integer(t, "batch_rows", "timing.", d.batch_rows, 1),
        time_scale=c.number(t, "time_scale", "timing.", d.time_scale, strict=True),
        latency_budget_scale=c.number(
            t, "latency_budget_scale", "timing.", d.latency_budget_scale, strict=True
        ),
        warmup_s=c.number(t, "warmup_s", "timing.", d.warmup_s),
        timeout_s=c.number(t, "timeout_s", "timing.", d.timeout_s, strict=True),
    )
    groups = tuple(_group(c, g, i) for i, g in enumerate(c.array(doc, "groups")))
    if not groups:
        raise c.fail("groups", "is missing; add at least one [[groups]] table")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise c.fail("groups", f"repeat a name ({names}); name each group once")
    releases = tuple(_release(c, r, i) for i, r in enumerate(c.array(doc, "releases")))
    versions = {1} | {r.version for r in releases}
    if len(versions) != len(releases) + 1:
        raise c.fail("releases", "repeat a version (or use 1, the factory model's); use each once")
    rollouts = tuple(
        _rollout(c, r, i, versions, set(names)) for i, r in enumerate(c.array(doc, "rollouts"))
    )
    faults = tuple(_fault(c, f, i, set(names)) for i, f in enumerate(c.array(doc, "faults")))
    e = c.table(doc.get("expect", {}), "expect", _fields(Expect))
    counts = e.get("versions", {})
    c.table(counts, "expect.versions", {str(v): None for v in sorted(versions)})
    expect = Expect(
        tuple((int(k), c.integer(counts, k, "expect.versions.", 0)) for k in sorted(counts))
    )
    spec = ScenarioSpec(
        name=doc["name"],
        source=source,
        groups=groups,
        description=c.text(doc, "description", ""),
        seed=c.integer(doc, "seed", "", 0),
        devices=c.integer(doc, "devices", "", 10, 1),
        processes=c.integer(doc, "processes", "", 1, 1),
        timing=timing,
        releases=releases,
        rollouts=rollouts,
        faults=faults,
        expect=expect,
    )
    faulty = sum(f.count for f in faults)
    if faulty > spec.devices:
        raise c.fail("faults", f"pick {faulty} devices of {spec.devices}; lower the counts")
    return spec


def load_scenario(path: Path) -> ScenarioSpec:
    """Read and check a scenario file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ScenarioError(
            f"cannot read the scenario {path} ({exc.strerror}); check the path"
        ) from None
    return parse_scenario(data, str(path))


def _group(c: _Checker, doc: Any, i: int) -> Group:
    where = f"groups[{i}]."
    g = c.table(doc, f"groups[{i}]", _fields(Group))
    name = c.text(g, "name", where)
    if not name:
        raise c.fail(f"{where}name", "is missing; name the group")
    profiles_doc = g.get("profiles", {"x86_64-gateway": 1})
    c.table(profiles_doc, f"{where}profiles", dict.fromkeys(PROFILES))
    profiles = tuple(
        (p, c.number(profiles_doc, p, f"{where}profiles.", 1.0, strict=True))
        for p in sorted(profiles_doc)
    )
    if not profiles:
        raise c.fail(f"{where}profiles", f"is empty; weigh some of {', '.join(PROFILES)}")
    stream = c.choice(g, "stream", where, "stable", tuple(s.value for s in StreamKind))
    features = c.strings(g, "features", where, FEATURE_NAMES)
    if stream != "stable" and not features:
        raise c.fail(f"{where}features", f"is empty; a {stream} stream needs drifting features")
    return Group(
        name=name,
        share=c.number(g, "share", where, 1.0, strict=True),
        profiles=profiles,
        stream=stream,
        features=features,
        shift_sigma=c.number(g, "shift_sigma", where, 0.0, low=-1e9),
        sigma_per_hour=c.number(g, "sigma_per_hour", where, 0.0, low=-1e9),
        at_s=c.number(g, "at_s", where, 0.0),
    )


def _release(c: _Checker, doc: Any, i: int) -> ReleaseSpec:
    where = f"releases[{i}]."
    r = c.table(doc, f"releases[{i}]", _fields(ReleaseSpec))
    return ReleaseSpec(c.integer(r, "version", where, 0, 2), c.choice(r, "kind", where, "", KINDS))


def _rollout(c: _Checker, doc: Any, i: int, versions: set[int], groups: set[str]) -> RolloutSpec:
    where = f"rollouts[{i}]."
    r = c.table(doc, f"rollouts[{i}]", _fields(RolloutSpec))
    version = c.integer(r, "version", where, 0, 1)
    if version not in versions:
        raise c.fail(f"{where}version", f"is {version}; roll out one of {sorted(versions)}")
    stages_doc = r.get("stages", [{"percent": 100}])
    if not isinstance(stages_doc, list) or not stages_doc:
        raise c.fail(f"{where}stages", "must be a non-empty list of {percent, soak_s, max_wait_s}")
    stages = []
    for j, s in enumerate(stages_doc):
        sw = f"{where}stages[{j}]."
        s = c.table(s, f"{where}stages[{j}]", _fields(Stage))
        percent = c.number(s, "percent", sw, 0.0, strict=True)
        if percent > 100:
            raise c.fail(f"{sw}percent", f"is {percent}; use a share of the target up to 100")
        stages.append(
            Stage(percent, c.number(s, "soak_s", sw, 2.0), c.number(s, "max_wait_s", sw, 120.0))
        )
    gates = c.table(r.get("gates", {}), f"{where}gates", _fields(GateConfig))
    group = c.text(r, "group", where)
    if group and group not in groups:
        raise c.fail(f"{where}group", f"is {group!r}; use one of {', '.join(sorted(groups))}")
    profiles = c.strings(r, "profiles", where, PROFILES)
    if group and profiles:
        raise c.fail(f"{where}profiles", "cannot go with group; target a group or profiles")
    return RolloutSpec(
        version=version,
        stages=tuple(stages),
        expect=c.choice(r, "expect", where, "", ROLLOUT_EXPECT),
        after_s=c.number(r, "after_s", where, 0.0),
        group=group,
        profiles=profiles,
        gates=tuple(sorted(gates.items())),
        policy=c.choice(r, "policy", where, "rollback", ("rollback", "pause")),
        timeout_s=c.number(r, "timeout_s", where, 120.0, strict=True),
    )


def _fault(c: _Checker, doc: Any, i: int, groups: set[str]) -> Fault:
    where = f"faults[{i}]."
    f = c.table(doc, f"faults[{i}]", _fields(Fault))
    group = c.text(f, "group", where)
    if group and group not in groups:
        raise c.fail(f"{where}group", f"is {group!r}; use one of {', '.join(sorted(groups))}")
    d = Fault("offline")
    return Fault(
        kind=c.choice(f, "kind", where, "", FAULT_KINDS),
        count=c.integer(f, "count", where, 1, 1),
        group=group,
        at_s=c.number(f, "at_s", where, d.at_s),
        for_s=c.number(f, "for_s", where, d.for_s, strict=True),
        state=c.choice(f, "state", where, d.state, KILL_STATES),
        rate=c.number(f, "rate", where, d.rate, strict=True),
        cuts=c.integer(f, "cuts", where, d.cuts, 1),
        cut_after=c.integer(f, "cut_after", where, d.cut_after, 1),
    )
