"""Device MQTT credentials: random passwords and Mosquitto's password-file hash.

The fleet stores only a hash of each device's MQTT password, in the ``$7$`` form Mosquitto 2's
``password_file`` reads (PBKDF2-HMAC-SHA512, 12-byte salt, base64 fields), so the broker's
password file can be written straight from the device registry and a decommissioned device's
line simply disappears from it. The passwords are 256-bit random, so the iteration count only
has to be more than trivial.

This module computes strings; it writes no file and signals no broker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

ITERATIONS = 1000
SALT_BYTES = 12


def new_password() -> str:
    return secrets.token_urlsafe(32)


def mosquitto_hash(
    password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS
) -> str:
    """``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``, as ``mosquitto_passwd`` writes."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_hash(password: str, encoded: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash (ours or ``mosquitto_passwd``'s)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
    return hmac.compare_digest(digest, expected)


def password_file_line(username: str, encoded: str) -> str:
    """One line of a Mosquitto ``password_file``."""
    if ":" in username or "\n" in username or "\n" in encoded:
        raise ValueError(f"MQTT username {username!r} cannot go into a password file")
    return f"{username}:{encoded}"
