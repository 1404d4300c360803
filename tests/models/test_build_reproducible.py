"""The recipe cannot rot: rebuilding every version reproduces the committed bundle byte for byte."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet.cli import main
from models import build
from protocol.bundle import METADATA_FILE, sha256_hex

VERSIONS = sorted(build.RECIPES)


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    assert main(["models", "build", "--out", str(root)]) == 0
    return root


@pytest.mark.parametrize("version", VERSIONS)
def test_rebuild_matches_committed_hashes(
    rebuilt: Path, committed: dict[int, Any], load_bundle: Any, version: int
) -> None:
    mine = committed[version]
    fresh = load_bundle(build.bundle_dir(rebuilt, version))
    assert set(fresh.files) == set(mine.files)
    for rel, (sha, length) in mine.meta.files.items():
        data = fresh.files[rel]
        assert (sha256_hex(data), len(data)) == (sha, length), (
            f"{rel} of v{version} no longer rebuilds to the committed bytes; if the change is "
            "intended, run scripts/build_models.py and commit the bundles"
        )
    assert fresh.files[METADATA_FILE] == mine.files[METADATA_FILE]


def test_rebuild_leaves_only_the_bundles(rebuilt: Path) -> None:
    listing = sorted(p.name for p in (rebuilt / build.NAME).iterdir())
    assert listing == [str(v) for v in VERSIONS]  # no .tmp/.old directories left behind
    assert sorted(p.name for p in rebuilt.iterdir()) == [build.NAME]


def test_writing_again_replaces_the_whole_bundle(tmp_path: Path, committed: dict[int, Any]) -> None:
    files = committed[1].files
    target = build.write_bundle(tmp_path, 1, files)
    (target / "leftover.txt").write_text("from an older build")
    assert build.write_bundle(tmp_path, 1, files) == target
    assert not (target / "leftover.txt").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["1"]
    for rel, data in files.items():
        assert (target / rel).read_bytes() == data


def test_unknown_version_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["models", "build", "--out", str(tmp_path), "--version", "99"]) == 2
    assert "no recipe for version 99" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
