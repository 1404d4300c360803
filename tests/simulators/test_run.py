"""Whole scenarios with faults, run as ``python -m simulators run`` runs them: real broker, real
fleet app, real agents in host processes. Each asserts what the issue asks: every device ends
on a working model, every rollout in its expected state, no report lost, and that the faults
really happened."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.settings import ENV_PREFIX
from simulators.__main__ import find_scenario, main
from simulators.run import RunResult, run_scenario
from simulators.scenario import load_scenario
from simulators.stack import running_stack


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    yield


def _run(name: str, tmp_path: Path) -> RunResult:
    lines: list[str] = []
    result = run_scenario(load_scenario(find_scenario(name)), tmp_path, say=lines.append)
    assert result.ok, result.summary() + "\n" + "\n".join(lines)
    return result


def _by_name(result: RunResult) -> dict[str, dict]:
    return {d["name"]: d for d in result.snapshots}


def test_good_release_through_every_fault(tmp_path: Path) -> None:
    result = _run("faults", tmp_path)
    (rollout,) = result.rollouts
    assert rollout.state == "completed"
    devices = _by_name(result)
    faults = dict(line.split(" on ", 1) for line in result.faults)
    broken = faults["health_check_fails"].split(":")[0]
    assert devices[broken]["version"] == 1
    assert devices[broken]["update_state"] == "failed"
    assert "health_check" in devices[broken]["update_reason"], devices[broken]
    for kind in ("killed_mid_update", "slow_download", "failing_download"):
        name = faults[kind].split(":")[0]
        assert devices[name]["version"] == 2, (kind, devices[name])
    killed = faults["killed_mid_update"].split(":")[0]
    assert any(f"{killed} killed" in e and "installing" in e for e in result.fault_events)
    offline = faults["offline"].split(":")[0].split(", ")
    for name in offline:
        assert devices[name]["offline_total"] == 1 and devices[name]["version"] == 2
        assert any(f"{name} online" in e for e in result.fault_events)
    assert result.versions == {"1": 1, "2": 19}
    assert result.sent > 20 * 5 and result.stored == result.sent and result.lost == 0
    assert result.prediction_errors == 0 and result.predictions > 20 * 50


def test_bad_release_is_rolled_back_everywhere(tmp_path: Path) -> None:
    result = _run("bad-release", tmp_path)
    (rollout,) = result.rollouts
    assert rollout.state == "rolled_back"
    assert rollout.stages[0]["rolled_back"] == 16 and rollout.stages[0]["committed"] == 0
    assert result.versions == {"1": 16}
    killed = result.faults[0].split(" on ")[1].split(":")[0]
    assert any(f"{killed} killed" in e and "trial" in e for e in result.fault_events)
    assert result.lost == 0 and result.stored == result.sent > 0


def test_cli_against_a_fleet_manager_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--fleet-url``: no broker or fleet of its own; the reports are counted over HTTP."""
    with running_stack(tmp_path / "elsewhere") as stack:
        assert main(["run", "smoke", "--devices", "6", "--fleet-url", stack.url]) == 2
        assert "FLEET_ADMIN_TOKEN" in capsys.readouterr().err
        monkeypatch.setenv("FLEET_ADMIN_TOKEN", stack.admin["Authorization"].split()[1])
        monkeypatch.setenv("FLEET_OPERATOR_TOKEN", stack.operator["Authorization"].split()[1])
        code = main(
            ["run", "smoke", "--devices", "6", "--processes", "1", "--fleet-url", stack.url]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"fleet at {stack.url}\n" in out and "broker at" not in out
        assert "every expected outcome met" in out and ", 0 lost" in out
        sent = int(out.split(" sent by agents")[0].rsplit(" ", 1)[1])
        devices = stack.devices()
        assert len(devices) == 6 and sent > 6 * 3
        stored = stack.stored_seqs([d["id"] for d in devices])
        assert sum(len(s) for s in stored.values()) == sent
