"""Installing a model from a bundle directory: the factory path to a device's first model.

``edge-agent model install BUNDLE_DIR`` calls :func:`install_bundle`, which checks every file of
the bundle against ``bundle.json`` (:func:`protocol.bundle.check_file`), picks the artifact for the
device's firmware profile (:func:`protocol.profiles.select_artifact`), installs the artifact, its
golden set and the reference profile into the inactive slot, runs the golden set through the
runtime from the slot, and activates the slot only if it passes.

This is for installers and factories, who hold the bundle in their hands. In the field, models
arrive signed over the air (TUF, issue 5) and go through the update state machine instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.errors import AgentError
from agent.runtimes import load_runtime
from agent.slots import InstalledRelease, Release, Slots
from protocol.bundle import METADATA_FILE, BundleMetadata, check_file, parse_bundle
from protocol.golden import GoldenResult, GoldenSet, check_golden
from protocol.profiles import FirmwareProfile, select_artifact

log = logging.getLogger(__name__)


class InstallError(AgentError):
    """The bundle cannot be installed on this device; nothing was activated."""


@dataclass(frozen=True)
class InstallResult:
    installed: InstalledRelease
    golden: GoldenResult
    activated: bool
    unchanged: bool = False  # the same release was already active: nothing was done


def read_bundle(bundle_dir: Path) -> tuple[BundleMetadata, dict[str, bytes]]:
    """``bundle.json`` and every file it lists, each checked against its hash and length."""
    meta_path = bundle_dir / METADATA_FILE
    try:
        meta = parse_bundle(meta_path.read_bytes())
    except FileNotFoundError:
        raise InstallError(
            f"{bundle_dir} is not a model bundle (no {METADATA_FILE}); pass the directory of "
            "one release, e.g. models/bundles/pdm-classifier/1"
        ) from None
    files = {}
    for name in meta.files:
        try:
            data = (bundle_dir / name).read_bytes()
        except FileNotFoundError:
            raise InstallError(
                f"{bundle_dir / name} is missing; copy the whole bundle directory again"
            ) from None
        check_file(meta, name, data)
        files[name] = data
    return meta, files


def install_bundle(
    bundle_dir: Path,
    slots: Slots,
    profile: FirmwareProfile,
    *,
    allow_downgrade: bool = False,
    activate: bool = True,
) -> InstallResult:
    """Verify, install into the inactive slot, run the golden set and (by default) activate."""
    meta, files = read_bundle(bundle_dir)
    artifact = select_artifact(profile, meta.artifacts)
    names = {
        artifact.file: PurePosixPath(artifact.file).name,
        artifact.golden: PurePosixPath(artifact.golden).name,
        meta.reference_profile: PurePosixPath(meta.reference_profile).name,
    }
    if len(set(names.values())) != 3:
        raise InstallError(
            f"bundle {meta.name} v{meta.version}: artifact, golden set and reference profile "
            f"need distinct file names, got {sorted(names.values())}"
        )
    release = Release(
        name=meta.name,
        version=meta.version,
        runtime=artifact.runtime,
        format=artifact.format,
        quantization=artifact.quantization,
        artifact=names[artifact.file],
        golden=names[artifact.golden],
        reference=names[meta.reference_profile],
        files={names[src]: meta.files[src][0] for src in names},
        input=meta.input,
        output=meta.output,
        feature_names=meta.feature_names,
        class_names=meta.class_names,
        profile=profile.name,
        health=meta.health,
        source=f"bundle:{bundle_dir.resolve()}",
    )
    current = slots.active_release()
    if current is not None and current.release.name == release.name:
        if current.release.version == release.version and current.release.files == release.files:
            log.info("%s v%d is already active", release.name, release.version)
            return InstallResult(current, GoldenResult(True, 0.0, 1.0, ""), True, unchanged=True)
        if current.release.version > release.version and not allow_downgrade:
            raise InstallError(
                f"{release.name} v{current.release.version} is active and this bundle is the "
                f"older v{release.version}; pass --allow-downgrade to install it anyway"
            )
    installed = slots.install(release, {names[src]: files[src] for src in names})
    golden = run_golden(installed, profile.inference_threads)
    if not golden.passed:
        raise InstallError(
            f"{release.name} v{release.version} ({release.artifact}) failed its golden set on "
            f"this device: {golden.reason}; nothing was activated — check the runtime version "
            "or rebuild the bundle"
        )
    if activate:
        slots.activate(installed.slot)
    log.info(
        "installed %s v%d (%s) into slot %s%s",
        release.name,
        release.version,
        release.artifact,
        installed.slot,
        ", activated" if activate else "",
    )
    return InstallResult(installed, golden, activate)


def run_golden(installed: InstalledRelease, threads: int) -> GoldenResult:
    """Replay the slot's golden inputs through its artifact and compare the outputs."""
    release = installed.release
    golden = GoldenSet.from_json(installed.file(release.golden).read_bytes())
    runtime = load_runtime(installed.artifact_path, release.runtime, threads)
    try:
        outputs = runtime.predict(golden.inputs)
    finally:
        runtime.close()
    return check_golden(golden, outputs)
