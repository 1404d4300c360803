"""Health check of an installed slot: golden replay in the real runtime, latency budget."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from agent.bundle_install import install_bundle
from agent.errors import ModelLoadError
from agent.health_check import evaluate_health, run_health_check
from agent.slots import InstalledRelease, Slots
from firmware_profiles import load_profile
from protocol.golden import GoldenResult

BUNDLES = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier"
PASSED = GoldenResult(True, 0.001, 1.0, "")


def installed(
    tmp_path: Path, profile: str = "x86_64-gateway", version: int = 2
) -> InstalledRelease:
    slots = Slots(tmp_path / "slots")
    return install_bundle(
        BUNDLES / str(version), slots, load_profile(profile), activate=False
    ).installed


def swap_file(inst: InstalledRelease, name: str, data: bytes) -> InstalledRelease:
    """The same slot with one file replaced (release.json updated to match, as an installer
    that trusted a bad release would have written it)."""
    path = inst.file(name)
    path.write_bytes(data)
    files = dict(inst.release.files, **{name: hashlib.sha256(data).hexdigest()})
    return dataclasses.replace(inst, release=dataclasses.replace(inst.release, files=files))


@pytest.mark.parametrize("profile", ["x86_64-gateway", "rpi3-armv7l"])
def test_committed_bundle_passes(tmp_path: Path, profile: str) -> None:
    inst = installed(tmp_path, profile)
    verdict = run_health_check(inst, 1, budget_ms=1000.0)
    assert verdict.passed, verdict.reason
    assert verdict.golden.agreement == 1.0
    assert verdict.p95_ms is not None and 0 < verdict.p95_ms < 1000


def test_golden_set_of_another_version_fails(tmp_path: Path) -> None:
    inst = installed(tmp_path)
    v1_golden = (BUNDLES / "1" / "golden" / inst.release.golden).read_bytes()
    bad = swap_file(inst, inst.release.golden, v1_golden)
    verdict = run_health_check(bad, 1, budget_ms=1000.0)
    assert not verdict.passed
    assert "golden set failed" in verdict.reason


def test_latency_budget(tmp_path: Path) -> None:
    verdict = run_health_check(installed(tmp_path), 1, budget_ms=1e-6)
    assert not verdict.passed
    assert "over the profile's budget" in verdict.reason


def test_corrupt_artifact_raises_model_load_error(tmp_path: Path) -> None:
    inst = installed(tmp_path)
    bad = swap_file(inst, inst.release.artifact, b"not a model")
    with pytest.raises(ModelLoadError):
        run_health_check(bad, 1, budget_ms=1000.0)


def test_evaluate_health_pure() -> None:
    assert evaluate_health(PASSED, [0.001] * 20, 5.0).passed
    slow = evaluate_health(PASSED, [0.001] * 18 + [0.01, 0.01], 5.0)
    assert not slow.passed and slow.p95_ms == pytest.approx(10.0)
    failed = evaluate_health(GoldenResult(False, 0.5, 0.2, "off"), [0.001], 5.0)
    assert failed.reason.startswith("golden set failed: off")
    assert not evaluate_health(PASSED, [], 5.0).passed
