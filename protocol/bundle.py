"""Model bundle metadata (``bundle.json``): what a bundle holds and how to check its files.

A bundle is a directory: ``bundle.json`` plus the artifacts (``.onnx``/``.tflite``), the
reference profile and one golden set per artifact. ``bundle.json`` records the model's name and
version, its input/output signature, every artifact's format/runtime/quantization and golden
file, the health thresholds, the training metrics, and the sha256 and length of every other file.
This module parses that document and checks file bytes against it; it reads no files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import BundleError

FORMAT = "edgefleet-bundle/1"
METADATA_FILE = "bundle.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | None, ...]  # None = any size (the batch axis)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ArtifactInfo:
    file: str
    format: str  # "onnx" | "tflite"
    runtime: str  # "onnxruntime" | "litert"
    quantization: str  # "fp32" | "int8"
    golden: str  # golden-set file of this artifact
    sha256: str
    length: int
    profiles: tuple[str, ...] = ()  # compatible profiles; empty = any that has the runtime


@dataclass(frozen=True)
class HealthThresholds:
    """What a device checks before and after activating a release."""

    golden_atol: float = 0.05  # max |output - expected| per value on the golden set
    golden_min_agreement: float = 1.0  # share of golden rows whose argmax must match
    trial_seconds: float = 30.0  # soak period of the trial state
    trial_min_requests: int = 20  # trial passes only after this many live predictions
    max_error_rate: float = 0.01  # inference errors / requests during trial
    max_latency_ratio: float = 2.0  # trial p95 latency / previous model's p95
    shadow_samples: int = 0  # 0 = no shadow step
    min_shadow_agreement: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BundleMetadata:
    name: str
    version: int
    description: str
    input: TensorSpec
    output: TensorSpec
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    artifacts: tuple[ArtifactInfo, ...]
    reference_profile: str
    health: HealthThresholds
    files: Mapping[str, tuple[str, int]]  # relative path -> (sha256, length)
    metrics: Mapping[str, Any] = field(default_factory=dict)

    def artifact(self, file: str) -> ArtifactInfo:
        for a in self.artifacts:
            if a.file == file:
                return a
        raise BundleError(f"bundle {self.name} v{self.version} has no artifact {file!r}")

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "feature_names": list(self.feature_names),
            "class_names": list(self.class_names),
            "artifacts": [
                {
                    "file": a.file,
                    "format": a.format,
                    "runtime": a.runtime,
                    "quantization": a.quantization,
                    "golden": a.golden,
                    "profiles": list(a.profiles),
                }
                for a in self.artifacts
            ],
            "reference_profile": self.reference_profile,
            "health": self.health.to_dict(),
            "metrics": dict(self.metrics),
            "files": {
                path: {"sha256": sha, "length": length}
                for path, (sha, length) in sorted(self.files.items())
            },
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spec(doc: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=str(doc["name"]),
        dtype=str(doc["dtype"]),
        shape=tuple(None if d is None else int(d) for d in _array(doc, "shape")),
    )


def _array(doc: Mapping[str, Any], key: str, default: Any = None) -> list[Any]:
    value = doc.get(key, default) if default is not None else doc[key]
    if not isinstance(value, list):
        raise BundleError(f"{METADATA_FILE}: {key!r} must be a list, got {type(value).__name__}")
    return value


def _metrics(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BundleError(
            f"{METADATA_FILE}: 'metrics' must be an object, got {type(value).__name__}"
        )
    return value


def _safe_relpath(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise BundleError(
            f"bundle names the file {path!r}: only plain relative paths inside the bundle "
            "are allowed"
        )
    return path


def parse_bundle(data: bytes) -> BundleMetadata:
    """Parse and validate ``bundle.json``; raises :class:`BundleError` saying what is wrong."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BundleError(
                f"{METADATA_FILE} is not an {FORMAT} document; build bundles with "
                "`fleet models build`"
            )
        files = {
            _safe_relpath(str(p)): (str(v["sha256"]), int(v["length"]))
            for p, v in doc["files"].items()
        }
        artifacts = []
        for a in doc["artifacts"]:
            file = _safe_relpath(str(a["file"]))
            golden = _safe_relpath(str(a["golden"]))
            for needed in (file, golden):
                if needed not in files:
                    raise BundleError(f"{METADATA_FILE} lists {needed!r} but has no hash for it")
            sha, length = files[file]
            artifacts.append(
                ArtifactInfo(
                    file=file,
                    format=str(a["format"]),
                    runtime=str(a["runtime"]),
                    quantization=str(a["quantization"]),
                    golden=golden,
                    sha256=sha,
                    length=length,
                    profiles=tuple(str(p) for p in _array(a, "profiles", [])),
                )
            )
        reference = _safe_relpath(str(doc["reference_profile"]))
        if reference not in files:
            raise BundleError(f"{METADATA_FILE} lists {reference!r} but has no hash for it")
        version = doc["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise BundleError(f"bundle version must be a positive integer, got {version!r}")
        meta = BundleMetadata(
            name=str(doc["name"]),
            version=version,
            description=str(doc.get("description", "")),
            input=_spec(doc["input"]),
            output=_spec(doc["output"]),
            feature_names=tuple(str(n) for n in _array(doc, "feature_names")),
            class_names=tuple(str(n) for n in _array(doc, "class_names")),
            artifacts=tuple(artifacts),
            reference_profile=reference,
            health=HealthThresholds(**doc.get("health", {})),
            files=files,
            metrics=_metrics(doc.get("metrics", {})),
        )
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise BundleError(
            f"{METADATA_FILE} is malformed ({type(exc).__name__}: {exc}); rebuild the bundle "
            "with `fleet models build`"
        ) from exc
    if not meta.artifacts:
        raise BundleError(f"bundle {meta.name} v{meta.version} has no artifacts")
    if not meta.input.shape or not meta.output.shape:
        raise BundleError("the input and output signatures need at least one dimension each")
    if len(meta.feature_names) != meta.input.shape[-1]:
        raise BundleError("feature_names do not match the input signature's last dimension")
    if len(meta.class_names) != meta.output.shape[-1]:
        raise BundleError("class_names do not match the output signature's last dimension")
    return meta


def check_file(meta: BundleMetadata, path: str, data: bytes) -> None:
    """Raise :class:`BundleError` unless ``data`` is exactly the file ``bundle.json`` records."""
    if path not in meta.files:
        raise BundleError(f"{path!r} is not part of bundle {meta.name} v{meta.version}")
    sha, length = meta.files[path]
    if len(data) != length:
        raise BundleError(
            f"{path}: {len(data)} bytes, bundle.json says {length}; the file is truncated or "
            "replaced — rebuild or re-download the bundle"
        )
    if sha256_hex(data) != sha:
        raise BundleError(
            f"{path}: sha256 does not match bundle.json; the file is corrupt or was tampered "
            "with — rebuild or re-download the bundle"
        )
