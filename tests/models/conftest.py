"""Fixtures for the model tests: the committed bundles, read once, and the shared held-out set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from models import build, pdm_data
from protocol.bundle import METADATA_FILE, BundleMetadata, parse_bundle


@dataclass(frozen=True)
class Bundle:
    directory: Path
    meta: BundleMetadata
    files: dict[str, bytes]  # every listed file, bundle.json included


def _load(directory: Path) -> Bundle:
    raw = (directory / METADATA_FILE).read_bytes()
    meta = parse_bundle(raw)
    files = {rel: (directory / rel).read_bytes() for rel in meta.files}
    files[METADATA_FILE] = raw
    return Bundle(directory, meta, files)


@pytest.fixture(scope="session")
def load_bundle() -> Callable[[Path], Bundle]:
    """Read a bundle directory: its metadata and every file it lists."""
    return _load


@pytest.fixture(scope="session")
def committed() -> dict[int, Bundle]:
    """The bundles committed under models/bundles, by version."""
    root = build.default_root()
    return {v: _load(build.bundle_dir(root, v)) for v in sorted(build.RECIPES)}


@pytest.fixture(scope="session")
def heldout() -> pdm_data.Dataset:
    """The held-out rows every version's accuracy is measured on."""
    return pdm_data.generate(build.HELDOUT_ROWS, build.HELDOUT_SEED)
