"""Firmware profiles: parse and validate them, pick the one for a machine, pick an artifact.

A profile describes a device class (arch, cores, RAM, storage, runtimes present, preferred format
and quantization, inference threads, latency budget, max model size). This module takes the
profile files' bytes and the machine's facts as values; reading the files and probing the
machine are the callers' business (:mod:`firmware_profiles`, :mod:`agent.machine`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.bundle import ArtifactInfo
from protocol.errors import ProfileError

ARCHES = ("x86_64", "aarch64", "armv7l")
RUNTIMES = ("onnxruntime", "litert")
FORMATS = ("onnx", "tflite")
QUANTIZATIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class FirmwareProfile:
    name: str
    description: str
    arch: str
    cores: int
    ram_mb: int
    storage_mb: int
    runtimes: tuple[str, ...]
    preferred_format: str
    preferred_quantization: str
    inference_threads: int
    latency_budget_ms: float
    max_model_bytes: int
    board_markers: tuple[str, ...] = ()


@dataclass(frozen=True)
class MachineFacts:
    """What the running machine says about itself (see :func:`agent.machine.probe`)."""

    arch: str
    cores: int
    ram_mb: int
    board: str = ""  # device-tree model / Tegra release text, lower-cased; "" when unknown


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "description": str,
    "arch": str,
    "cores": int,
    "ram_mb": int,
    "storage_mb": int,
    "runtimes": list,
    "preferred_format": str,
    "preferred_quantization": str,
    "inference_threads": int,
    "latency_budget_ms": (int, float),
    "max_model_bytes": int,
}


def _choice(source: str, field: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ProfileError(
            f"{source}: field {field!r} is {value!r}; use one of {', '.join(allowed)}"
        )
    return value


def parse_profile(source: str, data: bytes) -> FirmwareProfile:
    """Parse one profile file's bytes; ``source`` (the file name) appears in every error."""
    try:
        doc: dict[str, Any] = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{source}: not valid TOML ({exc}); fix the file's syntax") from exc
    for field, kind in _FIELDS.items():
        if field not in doc:
            raise ProfileError(f"{source}: missing required field {field!r}")
        value = doc[field]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ProfileError(
                f"{source}: field {field!r} is {type(value).__name__} {value!r}, "
                f"expected {getattr(kind, '__name__', 'number')}"
            )
    unknown = set(doc) - set(_FIELDS) - {"board_markers"}
    if unknown:
        raise ProfileError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}; remove them")
    for field in ("cores", "ram_mb", "storage_mb", "inference_threads", "max_model_bytes"):
        if doc[field] <= 0:
            raise ProfileError(f"{source}: field {field!r} must be positive, got {doc[field]}")
    if doc["latency_budget_ms"] <= 0:
        raise ProfileError(f"{source}: field 'latency_budget_ms' must be positive")
    if doc["inference_threads"] > doc["cores"]:
        raise ProfileError(
            f"{source}: field 'inference_threads' is {doc['inference_threads']} but the device "
            f"has {doc['cores']} cores; use at most {doc['cores']}"
        )
    runtimes = tuple(doc["runtimes"])
    if not runtimes:
        raise ProfileError(f"{source}: field 'runtimes' is empty; list at least one runtime")
    for rt in runtimes:
        _choice(source, "runtimes", rt, RUNTIMES)
    markers = doc.get("board_markers", [])
    if not isinstance(markers, list) or not all(isinstance(m, str) for m in markers):
        raise ProfileError(f"{source}: field 'board_markers' must be a list of strings")
    return FirmwareProfile(
        name=doc["name"],
        description=doc["description"],
        arch=_choice(source, "arch", doc["arch"], ARCHES),
        cores=doc["cores"],
        ram_mb=doc["ram_mb"],
        storage_mb=doc["storage_mb"],
        runtimes=runtimes,
        preferred_format=_choice(source, "preferred_format", doc["preferred_format"], FORMATS),
        preferred_quantization=_choice(
            source, "preferred_quantization", doc["preferred_quantization"], QUANTIZATIONS
        ),
        inference_threads=doc["inference_threads"],
        latency_budget_ms=float(doc["latency_budget_ms"]),
        max_model_bytes=doc["max_model_bytes"],
        board_markers=tuple(m.lower() for m in markers),
    )


def select_profile(profiles: Iterable[FirmwareProfile], facts: MachineFacts) -> FirmwareProfile:
    """The profile that describes the machine best.

    Same arch is required. A profile with board markers is chosen only when the machine's board
    text contains one of them (a Jetson is told apart from a Pi by its board, not its RAM); among
    the others the largest profile the machine can still hold (RAM and cores) wins, falling
    back to the smallest one of the arch.
    """
    same_arch = [p for p in profiles if p.arch == facts.arch]
    if not same_arch:
        raise ProfileError(
            f"no firmware profile for arch {facts.arch!r}; pass --profile NAME or add a profile "
            "file for this device class to firmware_profiles/"
        )
    board = facts.board.lower()
    marked = [p for p in same_arch if p.board_markers and any(m in board for m in p.board_markers)]
    if marked:
        return max(marked, key=lambda p: (p.ram_mb, p.cores))
    plain = [p for p in same_arch if not p.board_markers] or same_arch
    fitting = [p for p in plain if p.ram_mb <= facts.ram_mb and p.cores <= facts.cores]
    if fitting:
        return max(fitting, key=lambda p: (p.ram_mb, p.cores, p.name))
    return min(plain, key=lambda p: (p.ram_mb, p.cores, p.name))


def select_artifact(profile: FirmwareProfile, artifacts: Iterable[ArtifactInfo]) -> ArtifactInfo:
    """The best artifact of a release for a profile.

    An artifact qualifies when the profile has its runtime, it fits ``max_model_bytes`` and, if
    the artifact names compatible profiles, the profile is among them. Among those: preferred
    format first, then preferred quantization, then the smaller file.
    """
    candidates = []
    reasons = []
    for a in artifacts:
        if a.runtime not in profile.runtimes:
            reasons.append(f"{a.file}: runtime {a.runtime} not on {profile.name}")
        elif a.length > profile.max_model_bytes:
            reasons.append(f"{a.file}: {a.length} bytes > max {profile.max_model_bytes}")
        elif a.profiles and profile.name not in a.profiles:
            reasons.append(f"{a.file}: not built for profile {profile.name}")
        else:
            candidates.append(a)
    if not candidates:
        raise ProfileError(
            f"no artifact of this release fits profile {profile.name!r} ("
            + "; ".join(reasons)
            + "); add an artifact for this device class"
        )
    return min(
        candidates,
        key=lambda a: (
            a.format != profile.preferred_format,
            a.quantization != profile.preferred_quantization,
            a.length,
            a.file,
        ),
    )
