"""A/B slots on disk: install into the inactive slot only, atomic activation, honest errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.slots import Release, SlotError, Slots
from protocol.bundle import HealthThresholds, TensorSpec


def release(version: int, files: dict[str, bytes]) -> Release:
    return Release(
        name="pdm-classifier",
        version=version,
        runtime="onnxruntime",
        format="onnx",
        quantization="int8",
        artifact="model.onnx",
        golden="golden.json",
        reference="reference.json",
        files={name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        input=TensorSpec("x", "float32", (None, 3)),
        output=TensorSpec("y", "float32", (None, 2)),
        feature_names=("a", "b", "c"),
        class_names=("ok", "fault"),
        profile="x86_64-gateway",
        health=HealthThresholds(trial_seconds=5.0),
        source="bundle:/tmp/b",
    )


def files(tag: bytes) -> dict[str, bytes]:
    return {"model.onnx": b"model " + tag, "golden.json": b"golden " + tag, "reference.json": tag}


def test_empty_device(tmp_path: Path) -> None:
    slots = Slots(tmp_path / "slots")
    assert slots.active() is None
    assert slots.inactive() == "a"
    assert slots.active_release() is None
    assert slots.release("a") is None


def test_install_activate_alternate(tmp_path: Path) -> None:
    slots = Slots(tmp_path / "slots")
    one = slots.install(release(1, files(b"1")), files(b"1"))
    assert one.slot == "a" and slots.active() is None  # installing does not activate
    slots.activate("a")
    assert slots.active() == "a" and slots.inactive() == "b"
    two = slots.install(release(2, files(b"2")), files(b"2"))
    assert two.slot == "b"
    # the active slot is untouched by an install into the other one
    active = slots.active_release()
    assert active is not None and active.release.version == 1
    assert (active.directory / "model.onnx").read_bytes() == b"model 1"
    slots.activate("b")
    active = slots.active_release()
    assert active is not None and active.release.version == 2 and active.slot == "b"
    assert active.artifact_path.read_bytes() == b"model 2"
    # the previous slot stays intact until something else is installed over it
    previous = slots.release("a")
    assert previous is not None and previous.release.version == 1
    three = slots.install(release(3, files(b"3")), files(b"3"))
    assert three.slot == "a" and slots.active() == "b"
    assert sorted(p.name for p in (tmp_path / "slots").iterdir()) == ["a", "active", "b"]
    assert os.readlink(tmp_path / "slots" / "active") == "b"


def test_release_json_round_trip(tmp_path: Path) -> None:
    r = release(7, files(b"x"))
    assert Release.from_json(r.to_json()) == r


def test_install_from_paths(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files(b"p").items():
        (src / name).write_bytes(data)
    slots = Slots(tmp_path / "slots")
    installed = slots.install(release(1, files(b"p")), {n: src / n for n in files(b"p")})
    assert (installed.directory / "golden.json").read_bytes() == b"golden p"


def test_corrupt_file_refused_and_slot_kept(tmp_path: Path) -> None:
    slots = Slots(tmp_path / "slots")
    slots.install(release(1, files(b"1")), files(b"1"))
    slots.activate("a")
    slots.install(release(2, files(b"2")), files(b"2"))
    bad = files(b"3") | {"model.onnx": b"tampered"}
    with pytest.raises(SlotError, match="model.onnx: sha256 .* corrupt"):
        slots.install(release(3, files(b"3")), bad)
    kept = slots.release("b")
    assert kept is not None and kept.release.version == 2  # the failed install changed nothing
    assert not [p for p in (tmp_path / "slots").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"model.onnx": b"m", "golden.json": b"g"}, "missing"),
        (files(b"1") | {"extra.bin": b"e"}, "do not match"),
    ],
)
def test_wrong_file_sets(tmp_path: Path, given: dict[str, bytes], says: str) -> None:
    with pytest.raises(SlotError, match=says):
        Slots(tmp_path / "slots").install(release(1, files(b"1")), given)


def test_unsafe_names_refused(tmp_path: Path) -> None:
    r = release(1, files(b"1"))
    evil = Release(**{**r.__dict__, "files": {**r.files, "../x": "0" * 64}})
    with pytest.raises(SlotError, match="not allowed"):
        Slots(tmp_path / "slots").install(evil, {**files(b"1"), "../x": b""})


def test_activate_empty_slot_refused(tmp_path: Path) -> None:
    with pytest.raises(SlotError, match="slot b is empty"):
        Slots(tmp_path / "slots").activate("b")
    with pytest.raises(SlotError, match="no slot 'c'"):
        Slots(tmp_path / "slots").activate("c")


def test_bad_pointer_named(tmp_path: Path) -> None:
    root = tmp_path / "slots"
    root.mkdir()
    os.symlink("/etc", root / "active")
    with pytest.raises(SlotError, match="points at '/etc'"):
        Slots(root).active()


def test_stale_temp_pointer_is_harmless(tmp_path: Path) -> None:
    slots = Slots(tmp_path / "slots")
    slots.install(release(1, files(b"1")), files(b"1"))
    os.symlink("b", tmp_path / "slots" / f".active.tmp{os.getpid()}")  # a crash mid-activation
    slots.activate("a")
    assert slots.active() == "a"
