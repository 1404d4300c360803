"""Signing key files (fleet.keys) and the ``fleet keys`` commands."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tuf.api.metadata import Metadata

from fleet.cli import main
from fleet.errors import SigningKeyError, SigningKeyExistsError, SigningKeyMissingError
from fleet.keys import (
    ROLES,
    generate_key,
    init_key_dir,
    key_path,
    load_key,
    load_online_keys,
    write_key,
)
from fleet.tuf_repo import TufRepository


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_key_dir_writes_private_files(tmp_path: Path) -> None:
    signers = init_key_dir(tmp_path / "keys")
    assert _mode(tmp_path / "keys") == 0o700
    for role in ROLES:
        path = key_path(tmp_path / "keys", role)
        assert _mode(path) == 0o600
        assert load_key(path, role).public_key == signers[role].public_key
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(
        f"{r}.pem" for r in ROLES
    )  # no temp files left behind
    assert set(load_online_keys(tmp_path / "keys")) == {"targets", "snapshot", "timestamp"}


def test_init_key_dir_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = init_key_dir(tmp_path)
    with pytest.raises(SigningKeyExistsError, match="--force"):
        init_key_dir(tmp_path)
    assert load_key(key_path(tmp_path, "targets")).public_key == first["targets"].public_key
    second = init_key_dir(tmp_path, force=True)
    assert load_key(key_path(tmp_path, "targets")).public_key == second["targets"].public_key


def test_write_key_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_key(tmp_path / "k.pem", generate_key())
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k.pem") == 0o600


def test_missing_online_key_names_the_command_that_creates_it(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyMissingError, match="fleet keys init"):
        load_key(key_path(tmp_path, "targets"), "targets")


def test_missing_root_key_says_it_is_kept_offline(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyMissingError, match="kept offline.*--root-key"):
        load_key(tmp_path / "usb" / "root.pem", "root")


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    write_key(path, generate_key())
    path.chmod(0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        load_key(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key", "not an unencrypted PEM private key"),
        (
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "not an Ed25519 key",
        ),
    ],
    ids=["garbage", "ecdsa"],
)
def test_a_file_that_is_not_an_ed25519_key_is_refused(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(SigningKeyError, match=message):
        load_key(path)


def test_unknown_role_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="not a TUF role"):
        key_path(tmp_path, "mirror")


# --- the CLI ----------------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path, Path]:
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    code, out, _ = _run(capsys, "keys", "init", "--dir", keys, "--repo", repo)
    assert code == 0
    assert "MOVE THE ROOT KEY OFFLINE NOW" in out
    offline = tmp_path / "usb" / "root.pem"
    offline.parent.mkdir()
    os.replace(keys / "root.pem", offline)  # what the operator does
    return keys, repo, offline


def test_cli_init_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, repo, _ = _init(tmp_path, capsys)
    code, out, _ = _run(capsys, "keys", "show", "--dir", keys, "--repo", repo)
    assert code == 0
    for role in ROLES:
        assert f"\n{role:9} v1" in "\n" + out
    targets_id = load_key(key_path(keys, "targets")).public_key.keyid
    assert f"{targets_id}  <- online key in {key_path(keys, 'targets')}" in out
    assert "still on this server" not in out


def test_cli_init_twice_fails_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, repo, _ = _init(tmp_path, capsys)
    code, _, err = _run(capsys, "keys", "init", "--dir", keys, "--repo", repo)
    assert code == 2
    assert err.startswith("fleet: error:") and "--force" in err and err.count("\n") == 1


def test_cli_rotate_online_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, repo, offline = _init(tmp_path, capsys)
    old = load_key(key_path(keys, "targets")).public_key.keyid
    code, out, _ = _run(
        capsys, "keys", "rotate", "targets", "--dir", keys, "--repo", repo, "--root-key", offline
    )
    assert code == 0 and "root v2 published" in out
    new = load_key(key_path(keys, "targets")).public_key.keyid
    assert new != old and new in out
    assert not (keys / "targets.pem.new").exists()
    repository = TufRepository(repo, load_online_keys(keys))
    assert repository.root().roles["targets"].keyids == [new]
    assert repository.add_targets([("m/1/a", b"a", {})], datetime.now(UTC)) == 3  # new key signs


def test_cli_rotate_with_a_wrong_root_key_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, repo, _ = _init(tmp_path, capsys)
    wrong = tmp_path / "wrong.pem"
    write_key(wrong, generate_key())
    before = key_path(keys, "snapshot").read_bytes()
    code, _, err = _run(
        capsys, "keys", "rotate", "snapshot", "--dir", keys, "--repo", repo, "--root-key", wrong
    )
    assert code == 2 and "not a root key" in err
    assert key_path(keys, "snapshot").read_bytes() == before
    assert not (keys / "snapshot.pem.new").exists()
    assert not (repo / "metadata" / "2.root.json").exists()


def test_cli_rotate_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, repo, offline = _init(tmp_path, capsys)
    argv: list[str | Path] = [
        "keys",
        "rotate",
        "root",
        "--dir",
        keys,
        "--repo",
        repo,
        "--root-key",
        offline,
    ]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "--new-root-key" in err
    new_root = tmp_path / "usb" / "root-2.pem"
    code, out, _ = _run(capsys, *argv, "--new-root-key", new_root)
    assert code == 0 and f"keep {new_root} offline" in out
    assert _mode(new_root) == 0o600
    code, out, _ = _run(
        capsys, "keys", "renew-root", "--dir", keys, "--repo", repo, "--root-key", new_root
    )
    assert code == 0 and "root v3 published" in out


def test_cli_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, repo, offline = _init(tmp_path, capsys)
    old = load_key(key_path(keys, "timestamp")).public_key.keyid
    code, out, _ = _run(
        capsys,
        "keys",
        "revoke",
        "timestamp",
        old[:10],
        "--dir",
        keys,
        "--repo",
        repo,
        "--root-key",
        offline,
    )
    assert code == 0 and "root v2 published" in out
    root = Metadata.from_bytes((repo / "metadata" / "2.root.json").read_bytes()).signed
    assert old not in root.keys
    assert root.roles["timestamp"].keyids == [
        load_key(key_path(keys, "timestamp")).public_key.keyid
    ]


def test_cli_refresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, repo, _ = _init(tmp_path, capsys)
    code, out, _ = _run(capsys, "keys", "refresh", "--dir", keys, "--repo", repo)
    assert code == 0 and out.strip() == "nothing close to expiry"
    ts = repo / "metadata" / "timestamp.json"
    assert json.loads(ts.read_bytes())["signed"]["version"] == 1


def test_cli_without_online_keys_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "keys", "show", "--dir", tmp_path / "k", "--repo", tmp_path / "r")
    assert code == 2 and "fleet keys init" in err


def test_cli_defaults_to_the_directories_fleet_serve_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --dir/--repo the keys and repository go where the server looks for them."""
    monkeypatch.setenv("EDGEFLEET_DATA_DIR", str(tmp_path / "data"))
    assert main(["keys", "init"]) == 0
    assert (tmp_path / "data" / "keys" / "targets.pem").exists()
    assert (tmp_path / "data" / "tuf" / "metadata" / "1.root.json").exists()
    capsys.readouterr()
    assert main(["keys", "show"]) == 0
    assert "root v1" in capsys.readouterr().out
