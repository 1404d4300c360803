"""A release as TUF targets: target paths and the custom metadata of each model artifact.

Every file a device fetches for a release is a TUF target, so ngclient verifies each one:

* ``<model>/<version>/<artifact file>`` — one per artifact (``.onnx`` / ``.tflite``),
* ``<model>/<version>/<golden file>`` — the golden set of each artifact,
* ``<model>/<version>/<reference profile>`` — the drift baseline.

An artifact target's ``custom`` field carries what DESIGN.md lists (model name and version,
format, runtime, quantization, compatible profiles, input/output signature, the paths and sha256
of the reference profile and golden set, the health thresholds); golden and reference targets
carry only their kind, model and version. Floats are decimal strings because signed metadata is
canonical JSON (:mod:`protocol.canonical`).

This module builds and parses those values; it signs nothing and reads no files (the fleet's
:mod:`fleet.tuf_repo` signs, the agent's TUF client verifies).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocol.bundle import ArtifactInfo, BundleMetadata, HealthThresholds, TensorSpec
from protocol.canonical import float_from_wire, float_to_wire
from protocol.errors import ProtocolError, ReleaseTargetError

CUSTOM_FORMAT = "edgefleet-target/1"


class TargetKind(StrEnum):
    ARTIFACT = "artifact"
    GOLDEN = "golden"
    REFERENCE = "reference"


@dataclass(frozen=True)
class ReleaseTarget:
    """One file of a release to publish: its TUF target path, its path in the bundle, custom."""

    path: str
    bundle_file: str
    kind: TargetKind
    custom: Mapping[str, Any]


@dataclass(frozen=True)
class ArtifactTarget:
    """The parsed custom metadata of an artifact target, as the device reads it."""

    model: str
    version: int
    format: str
    runtime: str
    quantization: str
    profiles: tuple[str, ...]
    input: TensorSpec
    output: TensorSpec
    golden_path: str
    golden_sha256: str
    reference_path: str
    reference_sha256: str
    health: HealthThresholds


def target_path(model: str, version: int, file: str) -> str:
    """The TUF target path of ``file`` of release ``model`` v``version``."""
    if not model or "/" in model or model in (".", ".."):
        raise ReleaseTargetError(f"model name {model!r} cannot be a target path segment")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ReleaseTargetError(f"model version must be a positive integer, got {version!r}")
    parts = file.split("/")
    if not file or file.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ReleaseTargetError(f"{file!r} is not a plain relative file path")
    return f"{model}/{version}/{file}"


def release_prefix(model: str, version: int) -> str:
    """The target path prefix (``<model>/<version>/``) every file of a release has."""
    return target_path(model, version, "x")[:-1]


def _health_types() -> dict[str, type]:
    hints = typing.get_type_hints(HealthThresholds)
    return {f.name: hints[f.name] for f in dataclasses.fields(HealthThresholds)}


def _health_to_wire(health: HealthThresholds) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, typ in _health_types().items():
        value = getattr(health, name)
        out[name] = int(value) if typ is int else float_to_wire(value)
    return out


def _health_from_wire(doc: Mapping[str, Any]) -> HealthThresholds:
    kwargs: dict[str, Any] = {}
    for name, typ in _health_types().items():
        if name not in doc:
            raise ReleaseTargetError(f"health thresholds lack {name!r}")
        raw = doc[name]
        if typ is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ReleaseTargetError(f"health.{name} must be an integer, got {raw!r}")
            kwargs[name] = raw
        else:
            kwargs[name] = float_from_wire(raw)
    return HealthThresholds(**kwargs)


def artifact_custom(meta: BundleMetadata, artifact: ArtifactInfo) -> dict[str, Any]:
    """The ``custom`` field of ``artifact``'s TUF target (canonical-JSON safe)."""
    golden_sha, _ = meta.files[artifact.golden]
    reference_sha, _ = meta.files[meta.reference_profile]
    return {
        "format": CUSTOM_FORMAT,
        "kind": TargetKind.ARTIFACT.value,
        "model": meta.name,
        "version": meta.version,
        "artifact_format": artifact.format,
        "runtime": artifact.runtime,
        "quantization": artifact.quantization,
        "profiles": list(artifact.profiles),
        "input": meta.input.to_dict(),
        "output": meta.output.to_dict(),
        "golden": {
            "path": target_path(meta.name, meta.version, artifact.golden),
            "sha256": golden_sha,
        },
        "reference": {
            "path": target_path(meta.name, meta.version, meta.reference_profile),
            "sha256": reference_sha,
        },
        "health": _health_to_wire(meta.health),
    }


def _plain_custom(meta: BundleMetadata, kind: TargetKind) -> dict[str, Any]:
    return {
        "format": CUSTOM_FORMAT,
        "kind": kind.value,
        "model": meta.name,
        "version": meta.version,
    }


def release_targets(meta: BundleMetadata) -> list[ReleaseTarget]:
    """Every TUF target of a release: artifacts, their golden sets, the reference profile."""
    out: list[ReleaseTarget] = []
    seen: set[str] = set()

    def add(file: str, kind: TargetKind, custom: dict[str, Any]) -> None:
        if file in seen:
            return
        seen.add(file)
        out.append(ReleaseTarget(target_path(meta.name, meta.version, file), file, kind, custom))

    for artifact in meta.artifacts:
        add(artifact.file, TargetKind.ARTIFACT, artifact_custom(meta, artifact))
    for artifact in meta.artifacts:
        add(artifact.golden, TargetKind.GOLDEN, _plain_custom(meta, TargetKind.GOLDEN))
    add(meta.reference_profile, TargetKind.REFERENCE, _plain_custom(meta, TargetKind.REFERENCE))
    return out


def _str(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise ReleaseTargetError(f"target custom field {key!r} must be a non-empty string")
    return value


def _spec(doc: Any, key: str) -> TensorSpec:
    if not isinstance(doc, Mapping):
        raise ReleaseTargetError(f"target custom field {key!r} must be an object")
    shape = doc.get("shape")
    if not isinstance(shape, list) or not all(
        d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in shape
    ):
        raise ReleaseTargetError(f"{key}.shape must be a list of integers or null")
    return TensorSpec(name=_str(doc, "name"), dtype=_str(doc, "dtype"), shape=tuple(shape))


def _file_ref(doc: Any, key: str, prefix: str) -> tuple[str, str]:
    if not isinstance(doc, Mapping):
        raise ReleaseTargetError(f"target custom field {key!r} must be an object")
    path, sha = _str(doc, "path"), _str(doc, "sha256")
    if not path.startswith(prefix):
        raise ReleaseTargetError(f"{key}.path {path!r} is not part of release {prefix!r}")
    return path, sha


def parse_artifact_custom(custom: Any) -> ArtifactTarget:
    """Parse an artifact target's ``custom`` field; :class:`ReleaseTargetError` if malformed."""
    if not isinstance(custom, Mapping) or custom.get("format") != CUSTOM_FORMAT:
        raise ReleaseTargetError(
            f"target custom metadata is not {CUSTOM_FORMAT}; the release was not published by "
            "a compatible fleet manager"
        )
    if custom.get("kind") != TargetKind.ARTIFACT.value:
        raise ReleaseTargetError(f"target is a {custom.get('kind')!r}, not a model artifact")
    version = custom.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ReleaseTargetError(f"model version must be a positive integer, got {version!r}")
    model = _str(custom, "model")
    prefix = release_prefix(model, version)
    profiles = custom.get("profiles")
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        raise ReleaseTargetError("target custom field 'profiles' must be a list of strings")
    health = custom.get("health")
    if not isinstance(health, Mapping):
        raise ReleaseTargetError("target custom field 'health' must be an object")
    golden_path, golden_sha = _file_ref(custom.get("golden"), "golden", prefix)
    reference_path, reference_sha = _file_ref(custom.get("reference"), "reference", prefix)
    try:
        thresholds = _health_from_wire(health)
    except ReleaseTargetError:
        raise
    except ProtocolError as exc:
        raise ReleaseTargetError(f"health thresholds: {exc}") from exc
    return ArtifactTarget(
        model=model,
        version=version,
        format=_str(custom, "artifact_format"),
        runtime=_str(custom, "runtime"),
        quantization=_str(custom, "quantization"),
        profiles=tuple(profiles),
        input=_spec(custom.get("input"), "input"),
        output=_spec(custom.get("output"), "output"),
        golden_path=golden_path,
        golden_sha256=golden_sha,
        reference_path=reference_path,
        reference_sha256=reference_sha,
        health=thresholds,
    )
