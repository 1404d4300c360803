"""``edge-agent model install`` / ``model show``: the factory path with the committed bundles,
and every way a bundle can be refused (not a bundle, missing or tampered file, failing golden
set, downgrade)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from agent.bundle_install import InstallError, install_bundle
from agent.cli import main
from agent.slots import Slots
from firmware_profiles import load_profile
from protocol.bundle import METADATA_FILE, parse_bundle
from protocol.errors import BundleError

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "models" / "bundles" / "pdm-classifier"


def install(state: Path, bundle: Path, *extra: str) -> int:
    return main(["model", "install", str(bundle), "--state-dir", str(state), *extra])


@pytest.mark.parametrize(
    ("profile", "artifact", "runtime"),
    [
        ("x86_64-gateway", "model.int8.onnx", "onnxruntime"),
        ("rpi4-aarch64", "model.int8.tflite", "litert"),
    ],
)
def test_install_picks_the_profiles_artifact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], profile: str, artifact: str, runtime: str
) -> None:
    assert install(tmp_path, BUNDLES / "1", "--profile", profile) == 0
    out = capsys.readouterr().out
    assert (
        f"Installed pdm-classifier v1 ({artifact}, {runtime})" in out and "Slot a is active" in out
    )
    active = Slots(tmp_path / "slots").active_release()
    assert active is not None and active.slot == "a"
    r = active.release
    assert (r.artifact, r.runtime, r.profile, r.version) == (artifact, runtime, profile, 1)
    meta = parse_bundle((BUNDLES / "1" / METADATA_FILE).read_bytes())
    assert r.files[artifact] == meta.files[artifact][0]
    assert sorted(p.name for p in active.directory.iterdir()) == sorted(
        [artifact, f"{artifact}.json", "reference_profile.json", "release.json"]
    )
    # the same bundle again changes nothing
    assert install(tmp_path, BUNDLES / "1", "--profile", profile) == 0
    assert "already active in slot a; nothing changed" in capsys.readouterr().out


def test_upgrade_downgrade_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = ("--profile", "x86_64-gateway")
    assert install(tmp_path, BUNDLES / "1", *p) == 0
    assert install(tmp_path, BUNDLES / "2", *p) == 0
    capsys.readouterr()
    assert install(tmp_path, BUNDLES / "1", *p) == 2
    err = capsys.readouterr().err
    assert "v2 is active and this bundle is the older v1; pass --allow-downgrade" in err
    assert install(tmp_path, BUNDLES / "1", *p, "--allow-downgrade", "--no-activate") == 0
    assert "left inactive" in capsys.readouterr().out
    assert main(["model", "show", "--state-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  slot a: pdm-classifier v1")
    assert lines[1].startswith("* slot b: pdm-classifier v2 (model.int8.onnx, onnxruntime")


def test_show_on_an_empty_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "show", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "slot a: empty" in out and "edge-agent model install BUNDLE_DIR" in out


def copy_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLES / "1", bundle)
    return bundle


def test_not_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path / "state", tmp_path) == 2
    assert "is not a model bundle (no bundle.json)" in capsys.readouterr().err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = copy_bundle(tmp_path)
    (bundle / "model.int8.onnx").unlink()
    assert install(tmp_path / "state", bundle, "--profile", "x86_64-gateway") == 2
    assert "model.int8.onnx is missing; copy the whole bundle directory again" in (
        capsys.readouterr().err
    )


def test_tampered_file_installs_nothing(tmp_path: Path) -> None:
    bundle = copy_bundle(tmp_path)
    data = bytearray((bundle / "model.int8.tflite").read_bytes())
    data[-20] ^= 0xFF
    (bundle / "model.int8.tflite").write_bytes(bytes(data))
    slots = Slots(tmp_path / "slots")
    with pytest.raises(BundleError, match="sha256 does not match bundle.json"):
        install_bundle(bundle, slots, load_profile("x86_64-gateway"))  # even another artifact
    assert slots.active() is None and not (tmp_path / "slots").exists()


def test_failing_golden_set_activates_nothing(tmp_path: Path) -> None:
    bundle = copy_bundle(tmp_path)
    golden_path = bundle / "golden" / "model.int8.onnx.json"
    golden = json.loads(golden_path.read_bytes())
    golden["expected"] = [list(reversed(row)) for row in golden["expected"]]  # wrong answers
    data = json.dumps(golden).encode()
    golden_path.write_bytes(data)
    meta = parse_bundle((bundle / METADATA_FILE).read_bytes())
    files = dict(meta.files)
    files["golden/model.int8.onnx.json"] = (hashlib.sha256(data).hexdigest(), len(data))
    (bundle / METADATA_FILE).write_bytes(dataclasses.replace(meta, files=files).to_json())
    slots = Slots(tmp_path / "slots")
    with pytest.raises(InstallError, match="failed its golden set on this device: .*nothing was"):
        install_bundle(bundle, slots, load_profile("x86_64-gateway"))
    assert slots.active() is None


def test_profile_from_agent_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.config import AgentConfig, DeviceConfig, MqttConfig, save_config

    save_config(
        AgentConfig(tmp_path, DeviceConfig("dev-1", "rpi4-aarch64", "http://f"), MqttConfig("b"))
    )
    assert install(tmp_path, BUNDLES / "1") == 0
    assert "for profile rpi4-aarch64" in capsys.readouterr().out
    assert os.readlink(tmp_path / "slots" / "active") == "a"
