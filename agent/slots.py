"""The two model slots (A/B) on disk and the pointer that says which one is active.

Layout under ``slots/``: ``a/`` and ``b/`` each hold one release (the model artifact, its golden
set, its reference profile and ``release.json`` describing them); ``active`` is a symlink to
``a`` or ``b``. Installing writes into the *inactive* slot only (staged in a hidden directory,
every file and the directory fsynced, then renamed into place), so the running model's slot is
never touched. Activation replaces the ``active`` symlink with a new one through ``os.replace``,
which is atomic: after a power cut the pointer names the old slot or the new one, never neither.

Why a symlink rather than a small pointer file: ``rename(2)`` of a symlink is just as atomic,
a symlink cannot be half-written or hold garbage (``readlink`` returns ``a``, ``b`` or something
we refuse), and ``ls -l slots/`` shows a technician which slot is live.

This module stores and points; it does not verify signatures or run golden sets (the callers do
that before installing) and it loads no model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.atomic import fsync_dir, write_atomic
from agent.errors import AgentError
from protocol.bundle import HealthThresholds, TensorSpec

SLOTS = ("a", "b")
POINTER = "active"
RELEASE_FILE = "release.json"
RELEASE_FORMAT = "edgefleet-release/1"


class SlotError(AgentError):
    """A slot cannot be installed, activated or read; the message says what to do."""


@dataclass(frozen=True)
class Release:
    """What one slot holds: ``release.json``."""

    name: str
    version: int
    runtime: str  # "onnxruntime" | "litert"
    format: str  # "onnx" | "tflite"
    quantization: str
    artifact: str  # file names inside the slot
    golden: str
    reference: str
    files: Mapping[str, str]  # file name -> sha256 of every file above
    input: TensorSpec
    output: TensorSpec
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    profile: str = ""  # the firmware profile the artifact was chosen for
    health: HealthThresholds = field(default_factory=HealthThresholds)
    source: str = ""  # where it came from: "bundle:<dir>" (factory) or a TUF target path

    def to_json(self) -> bytes:
        doc = {
            "format": RELEASE_FORMAT,
            "name": self.name,
            "version": self.version,
            "runtime": self.runtime,
            "model_format": self.format,
            "quantization": self.quantization,
            "artifact": self.artifact,
            "golden": self.golden,
            "reference": self.reference,
            "files": dict(sorted(self.files.items())),
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "feature_names": list(self.feature_names),
            "class_names": list(self.class_names),
            "profile": self.profile,
            "health": self.health.to_dict(),
            "source": self.source,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = RELEASE_FILE) -> Release:
        try:
            doc: dict[str, Any] = json.loads(data)
            if doc.get("format") != RELEASE_FORMAT:
                raise SlotError(f"{where} is not an {RELEASE_FORMAT} document")

            def spec(d: Mapping[str, Any]) -> TensorSpec:
                shape = tuple(None if x is None else int(x) for x in d["shape"])
                return TensorSpec(str(d["name"]), str(d["dtype"]), shape)

            return cls(
                name=str(doc["name"]),
                version=int(doc["version"]),
                runtime=str(doc["runtime"]),
                format=str(doc["model_format"]),
                quantization=str(doc["quantization"]),
                artifact=str(doc["artifact"]),
                golden=str(doc["golden"]),
                reference=str(doc["reference"]),
                files={str(k): str(v) for k, v in doc["files"].items()},
                input=spec(doc["input"]),
                output=spec(doc["output"]),
                feature_names=tuple(str(n) for n in doc["feature_names"]),
                class_names=tuple(str(n) for n in doc["class_names"]),
                profile=str(doc.get("profile", "")),
                health=HealthThresholds(**doc.get("health", {})),
                source=str(doc.get("source", "")),
            )
        except SlotError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SlotError(
                f"{where} is malformed ({type(exc).__name__}: {exc}); reinstall the model"
            ) from exc


@dataclass(frozen=True)
class InstalledRelease:
    """A release as it sits in a slot: where its files are."""

    slot: str
    directory: Path
    release: Release

    def file(self, name: str) -> Path:
        return self.directory / name

    @property
    def artifact_path(self) -> Path:
        return self.directory / self.release.artifact


def _plain_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name == RELEASE_FILE:
        raise SlotError(f"slot file name {name!r} is not allowed: use a plain file name")
    return name


class Slots:
    """The A/B slots under one directory (``<state dir>/slots``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def pointer(self) -> Path:
        return self.root / POINTER

    def path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise SlotError(f"no slot {slot!r}; slots are {', '.join(SLOTS)}")
        return self.root / slot

    def active(self) -> str | None:
        """The active slot, or None when no model was ever activated."""
        try:
            target = os.readlink(self.pointer)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SlotError(
                f"{self.pointer} is not a symlink ({exc}); reinstall the model"
            ) from exc
        if target not in SLOTS:
            raise SlotError(f"{self.pointer} points at {target!r}, not a slot; reinstall the model")
        return target

    def inactive(self) -> str:
        """The slot an install goes into: the one that is not active (``a`` on a new device)."""
        active = self.active()
        return "a" if active in (None, "b") else "b"

    def release(self, slot: str) -> InstalledRelease | None:
        """The release held by ``slot``, or None if the slot is empty."""
        directory = self.path(slot)
        try:
            data = (directory / RELEASE_FILE).read_bytes()
        except FileNotFoundError:
            return None
        return InstalledRelease(slot, directory, Release.from_json(data, str(directory)))

    def active_release(self) -> InstalledRelease | None:
        """The active slot's release, or None when no model is installed."""
        slot = self.active()
        if slot is None:
            return None
        installed = self.release(slot)
        if installed is None:
            raise SlotError(
                f"the active slot {self.path(slot)} holds no {RELEASE_FILE}; reinstall the model"
            )
        return installed

    def install(self, release: Release, files: Mapping[str, bytes | Path]) -> InstalledRelease:
        """Write ``files`` (name -> bytes or a source path) and ``release.json`` into the
        inactive slot, replacing what it held; returns where it went. Not activated.

        Every file's sha256 must equal ``release.files``; a mismatch raises and leaves the
        slot as it was. The caller decides when installing is allowed: during an update's trial
        the inactive slot is the rollback target and must not be overwritten.
        """
        names = {release.artifact, release.golden, release.reference}
        missing = sorted(names - set(files))
        if missing:
            raise SlotError(f"release {release.name} v{release.version} is missing {missing}")
        if set(files) != set(release.files):
            raise SlotError(
                f"files {sorted(files)} do not match release.json's {sorted(release.files)}"
            )
        for name in files:
            _plain_name(name)
        slot = self.inactive()
        target = self.path(slot)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{slot}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for name, source in files.items():
                data = source if isinstance(source, bytes) else Path(source).read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if digest != release.files[name]:
                    raise SlotError(
                        f"{name}: sha256 {digest[:12]}… is not the {release.files[name][:12]}… "
                        "the release names; the file is corrupt — download or copy it again"
                    )
                write_atomic(staging / name, data)
            write_atomic(staging / RELEASE_FILE, release.to_json())
            fsync_dir(staging)
            old = self.root / f".old-{slot}"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            os.replace(staging, target)
            fsync_dir(self.root)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return InstalledRelease(slot, target, release)

    def activate(self, slot: str) -> None:
        """Point ``active`` at ``slot`` atomically; the other slot is left intact."""
        if self.release(slot) is None:
            raise SlotError(f"slot {slot} is empty; install a release into it before activating")
        tmp = self.root / f".{POINTER}.tmp{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(slot, tmp)
        os.replace(tmp, self.pointer)
        fsync_dir(self.root)
