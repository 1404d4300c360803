"""Signing key files of the fleet's TUF repository.

A key directory holds one Ed25519 private key per TUF role, PEM (PKCS#8), mode 0600::

    keys/root.pem        the OFFLINE root key: move it off the server after `fleet keys init`;
                         it is needed only to rotate or revoke keys and to renew the root
    keys/targets.pem     online: signs releases (targets metadata) and desired documents
    keys/snapshot.pem    online: signs snapshot metadata
    keys/timestamp.pem   online: re-signed on a schedule

This module creates, writes (atomically: temp file, fsync, ``os.replace``) and loads those files,
and refuses keys that other users could read. It does not know what the keys sign (that is
:mod:`fleet.tuf_repo`) and does not decide where the directory lives (the settings do).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner

from agent.atomic import write_atomic
from fleet.errors import (
    SigningKeyError,
    SigningKeyExistsError,
    SigningKeyMissingError,
)

ROOT = "root"
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
ROLES = (ROOT, *ONLINE_ROLES)
KEY_MODE = 0o600
DIR_MODE = 0o700


def key_path(key_dir: Path, role: str) -> Path:
    """Where ``role``'s key lives in ``key_dir``."""
    if role not in ROLES:
        raise SigningKeyError(f"{role!r} is not a TUF role; use one of {', '.join(ROLES)}")
    return Path(key_dir) / f"{role}.pem"


def key_id(signer: CryptoSigner) -> str:
    """The TUF key id of ``signer``'s public key."""
    return signer.public_key.keyid


def generate_key() -> CryptoSigner:
    """A fresh Ed25519 signing key."""
    return CryptoSigner.generate_ed25519()


def write_key(path: Path, signer: CryptoSigner, *, overwrite: bool = False) -> None:
    """Write ``signer``'s private key to ``path`` (mode 0600) atomically.

    Raises :class:`SigningKeyExistsError` if ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise SigningKeyExistsError(
            f"{path} already exists; refusing to overwrite a signing key (pass --force to "
            "replace it, which invalidates everything it signed)"
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    write_atomic(path, signer.private_bytes, KEY_MODE)


def load_key(path: Path, role: str | None = None) -> CryptoSigner:
    """Load the Ed25519 signing key at ``path``.

    Raises :class:`SigningKeyMissingError` (naming the command that creates it),
    :class:`SigningKeyError` if group/others can read it, it cannot be read, or it is not an
    unencrypted PEM Ed25519 key.
    """
    path = Path(path)
    what = f"the {role} key " if role else "the key "
    try:
        st = path.stat()
    except FileNotFoundError:
        if role == ROOT:
            hint = (
                "the root key is kept offline: pass the path where you keep it (--root-key), "
                "or create a new repository with `fleet keys init`"
            )
        else:
            hint = "create the keys with `fleet keys init --dir DIR --repo REPO`"
        raise SigningKeyMissingError(f"{what}{path} does not exist; {hint}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SigningKeyError(f"{what}{path} is not a regular file")
    if st.st_mode & 0o077:
        raise SigningKeyError(
            f"{what}{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}` and consider the key exposed if others could log in"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(
            f"cannot read {what}{path} ({exc.strerror}); run the command as the key's owner"
        ) from exc
    try:
        private = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"{what}{path} is not an unencrypted PEM private key ({exc}); restore it from your "
            "backup or create new keys with `fleet keys init`"
        ) from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningKeyError(f"{what}{path} is a {type(private).__name__}, not an Ed25519 key")
    return CryptoSigner(private)


def init_key_dir(key_dir: Path, *, force: bool = False) -> dict[str, CryptoSigner]:
    """Generate a key for every role in ``key_dir`` (mode 0700); return them by role.

    Refuses (:class:`SigningKeyExistsError`) if any key file exists, unless ``force``.
    """
    key_dir = Path(key_dir)
    existing = [key_path(key_dir, r) for r in ROLES if key_path(key_dir, r).exists()]
    if existing and not force:
        raise SigningKeyExistsError(
            f"{', '.join(str(p) for p in existing)} already exist; `fleet keys init` would "
            "replace them and every device pinned to the old root would refuse the new one. "
            "Rotate keys with `fleet keys rotate`, or pass --force to start over"
        )
    key_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(key_dir, DIR_MODE)
    signers = {role: generate_key() for role in ROLES}
    for role, signer in signers.items():
        write_key(key_path(key_dir, role), signer, overwrite=force)
    return signers


def load_online_keys(key_dir: Path) -> dict[str, CryptoSigner]:
    """The online keys (targets, snapshot, timestamp) from ``key_dir``, by role."""
    return {role: load_key(key_path(key_dir, role), role) for role in ONLINE_ROLES}
