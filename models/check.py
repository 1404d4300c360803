"""Check a bundle directory: every file against ``bundle.json``, every artifact on its golden set.

``check_bundle(directory)`` reads the bundle, verifies each listed file's sha256 and length with
:func:`protocol.bundle.check_file`, refuses files the metadata does not list, parses the
reference profile and golden sets, then loads each artifact in its runtime through a ``Runner``
and replays its golden set. The default runner is the bare runtimes of :mod:`models.runners`;
``fleet models check`` passes one built on the agent's runtime layer (``agent.runtimes``), which
also holds each model's own signature against the bundle's.
It collects every problem instead of stopping at the first, so one run says all that is wrong.
It prints nothing; ``fleet models check`` renders the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from models import runners
from protocol.bundle import METADATA_FILE, BundleMetadata, check_file, parse_bundle
from protocol.errors import ProtocolError
from protocol.golden import GoldenSet, check_golden
from protocol.reference import ReferenceProfile


class Runner(Protocol):
    """Run the model file at ``path`` in ``runtime`` on ``inputs`` [n, F]: probabilities [n, C].

    Raises ``ValueError``, ``RuntimeError`` or ``OSError`` (with a message saying why) when the
    model cannot be loaded or run; the check reports it as the artifact's failure.
    """

    def __call__(
        self, runtime: str, path: Path, inputs: np.ndarray, meta: BundleMetadata
    ) -> np.ndarray: ...


def bare_runner(runtime: str, path: Path, inputs: np.ndarray, meta: BundleMetadata) -> np.ndarray:
    """The runtime library itself, without the agent's layer (:func:`models.runners.predict`)."""
    return runners.predict(runtime, path.read_bytes(), inputs)


@dataclass(frozen=True)
class ArtifactCheck:
    file: str
    runtime: str
    quantization: str
    rows: int
    max_abs_error: float
    agreement: float
    passed: bool
    reason: str  # "" when passed


@dataclass(frozen=True)
class BundleCheck:
    directory: Path
    metadata: BundleMetadata | None
    files_checked: int
    problems: tuple[str, ...]  # bundle-level: metadata, hashes, stray files, reference profile
    artifacts: tuple[ArtifactCheck, ...]

    @property
    def passed(self) -> bool:
        return not self.problems and all(a.passed for a in self.artifacts)


def check_bundle(directory: Path, runner: Runner = bare_runner) -> BundleCheck:
    """Check the bundle in ``directory``; never raises for a bad bundle, reports instead."""
    try:
        meta = parse_bundle((directory / METADATA_FILE).read_bytes())
    except (OSError, ProtocolError) as exc:
        return BundleCheck(directory, None, 0, (f"{METADATA_FILE}: {exc}",), ())

    problems: list[str] = []
    bad_files: set[str] = set()
    blobs: dict[str, bytes] = {}
    for rel in sorted(meta.files):
        try:
            data = (directory / rel).read_bytes()
            check_file(meta, rel, data)
            blobs[rel] = data
        except (OSError, ProtocolError) as exc:
            problems.append(str(exc) if isinstance(exc, ProtocolError) else f"{rel}: {exc}")
            bad_files.add(rel)
    listed = set(meta.files) | {METADATA_FILE}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: not listed in {METADATA_FILE}; remove it or rebuild")

    if meta.reference_profile in blobs:
        problems.extend(_reference_problems(meta, blobs[meta.reference_profile]))

    results = []
    for art in meta.artifacts:
        base = {"file": art.file, "runtime": art.runtime, "quantization": art.quantization}
        broken = sorted({art.file, art.golden} & bad_files)
        if broken:
            reason = f"not run: {', '.join(broken)} failed the file check"
            results.append(
                ArtifactCheck(
                    **base,
                    rows=0,
                    max_abs_error=float("inf"),
                    agreement=0.0,
                    passed=False,
                    reason=reason,
                )
            )
            continue
        results.append(_replay(meta, directory, art.file, art.golden, blobs, runner, base))
    return BundleCheck(directory, meta, len(meta.files), tuple(problems), tuple(results))


def _reference_problems(meta: BundleMetadata, data: bytes) -> list[str]:
    try:
        profile = ReferenceProfile.from_json(data)
    except ProtocolError as exc:
        return [f"{meta.reference_profile}: {exc}"]
    problems = []
    if tuple(f.name for f in profile.features) != meta.feature_names:
        problems.append(f"{meta.reference_profile}: features differ from the bundle's")
    if profile.classes != meta.class_names:
        problems.append(f"{meta.reference_profile}: classes differ from the bundle's")
    return problems


def _replay(
    meta: BundleMetadata,
    directory: Path,
    file: str,
    golden_file: str,
    blobs: dict[str, bytes],
    runner: Runner,
    base: dict[str, str],
) -> ArtifactCheck:
    def failed(reason: str, rows: int = 0) -> ArtifactCheck:
        return ArtifactCheck(
            **base,
            rows=rows,
            max_abs_error=float("inf"),
            agreement=0.0,
            passed=False,
            reason=reason,
        )

    try:
        golden = GoldenSet.from_json(blobs[golden_file])
    except ProtocolError as exc:
        return failed(f"{golden_file}: {exc}")
    if golden.n_features != len(meta.feature_names) or golden.n_classes != len(meta.class_names):
        return failed(
            f"{golden_file}: golden set is [{golden.n_features} -> {golden.n_classes}], the "
            f"bundle's signature [{len(meta.feature_names)} -> {len(meta.class_names)}]",
            golden.n,
        )
    try:
        outputs = runner(base["runtime"], directory / file, golden.inputs, meta)
    except (ValueError, RuntimeError, OSError) as exc:  # RunnerError, the agent's errors, I/O
        return failed(str(exc), golden.n)
    result = check_golden(golden, outputs)
    return ArtifactCheck(
        **base,
        rows=golden.n,
        max_abs_error=result.max_abs_error,
        agreement=result.agreement,
        passed=result.passed,
        reason=result.reason,
    )
