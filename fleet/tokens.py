"""Operator API tokens: roles, issuing, listing, revoking, and checking a presented secret.

A token is an opaque random secret (``efo_`` + 43 url-safe characters, 256 bits) shown once when
it is created; the database keeps only its SHA-256, so a stolen database grants nothing. The
secret is looked up by hash, so an unknown, revoked or forged token all fail the same way.
Roles nest: ``admin`` can do everything ``operator`` can, which can do everything ``viewer`` can.
Every issue and revocation is audited in the same transaction.

This module knows nothing of HTTP (the FastAPI dependencies are :mod:`fleet.auth`) and is used
the same way by the API and by ``fleet token`` on the database directly.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlite_utils import Database

from fleet.audit import Actor, AuditLog
from fleet.errors import (
    AuthenticationError,
    InvalidInputError,
    LastAdminError,
    TokenNotFoundError,
)
from fleet.store import from_iso, immediate, iso

TABLE = "tokens"
SECRET_PREFIX = "efo_"
# last_used_at is a hint for admins, not a log: write it at most this often per token
LAST_USED_RESOLUTION = timedelta(minutes=1)
_NAME = re.compile(r"[\w.@+-][\w .@+-]{0,63}")


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """True if this role may do what ``needed`` may (admin ⊇ operator ⊇ viewer)."""
        return self.rank >= needed.rank

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls(value)
        except ValueError:
            raise InvalidInputError(
                f"role {value!r} is unknown; use one of {', '.join(r.value for r in cls)}"
            ) from None


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def new_id(prefix: str) -> str:
    """A short random id such as ``tok-1a2b3c4d5e6f`` (also used for devices)."""
    return f"{prefix}-{secrets.token_hex(6)}"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated operator: the token presented and its role."""

    token_id: str
    name: str
    role: Role

    @property
    def actor(self) -> Actor:
        return Actor(f"token:{self.token_id}", self.name)


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown about a token: never its secret or hash."""

    id: str
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class IssuedToken:
    """A freshly created token with its secret: the only time the secret exists outside the
    caller's hands."""

    info: TokenInfo
    secret: str


def _info(row: dict[str, Any]) -> TokenInfo:
    return TokenInfo(
        id=row["id"],
        name=row["name"],
        role=Role(row["role"]),
        created_at=from_iso(row["created_at"]),
        created_by=row["created_by"],
        revoked_at=from_iso(row["revoked_at"]) if row["revoked_at"] else None,
        last_used_at=from_iso(row["last_used_at"]) if row["last_used_at"] else None,
    )


class TokenService:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.audit = AuditLog(db)

    def create(self, name: str, role: Role | str, actor: Actor, now: datetime) -> IssuedToken:
        if not _NAME.fullmatch(name):
            raise InvalidInputError(
                f"token name {name!r} is not valid: use 1-64 letters, digits, spaces or . _ @ + -"
            )
        role = Role.parse(role) if not isinstance(role, Role) else role
        secret = new_secret(SECRET_PREFIX)
        row: dict[str, Any] = {
            "id": new_id("tok"),
            "name": name,
            "role": role.value,
            "secret_sha256": secret_hash(secret),
            "created_at": iso(now),
            "created_by": actor.id,
            "revoked_at": None,
            "revoked_by": None,
            "last_used_at": None,
        }
        with immediate(self.db):
            self.db.table(TABLE).insert(row)
            self.audit.record(actor, "token.create", row["id"], now, {"name": name, "role": role})
        return IssuedToken(_info(row), secret)

    def list(self, include_revoked: bool = True) -> list[TokenInfo]:
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        return [_info(r) for r in self.db.query(f"SELECT * FROM {TABLE} {where} ORDER BY rowid")]

    def get(self, token_id: str) -> TokenInfo:
        rows = list(self.db.query(f"SELECT * FROM {TABLE} WHERE id = ?", [token_id]))
        if not rows:
            raise TokenNotFoundError(
                f"no API token {token_id!r}; `fleet token list` or GET /v1/tokens shows the ids"
            )
        return _info(rows[0])

    def revoke(self, token_id: str, actor: Actor, now: datetime) -> TokenInfo:
        """Revoke a token at once (its next request gets 401). Revoking twice is harmless."""
        with immediate(self.db):
            token = self.get(token_id)
            if not token.active:
                return token
            if token.role is Role.ADMIN:
                admins = self.db.execute(
                    f"SELECT count(*) FROM {TABLE} WHERE role = 'admin' AND revoked_at IS NULL"
                ).fetchone()[0]
                if admins <= 1:
                    raise LastAdminError(
                        f"{token_id} is the last active admin token; create another admin "
                        "token first (`fleet token create --role admin --name NAME`)"
                    )
            self.db.execute(
                f"UPDATE {TABLE} SET revoked_at = ?, revoked_by = ? WHERE id = ?",
                [iso(now), actor.id, token_id],
            )
            self.audit.record(actor, "token.revoke", token_id, now, {"name": token.name})
        return self.get(token_id)

    def authenticate(self, secret: str, now: datetime) -> Principal:
        """The principal a presented secret stands for; :class:`AuthenticationError` if it is
        unknown, revoked or malformed (one message for all: no hint which part failed)."""
        rows = list(
            self.db.query(
                f"SELECT id, name, role, revoked_at, last_used_at FROM {TABLE} "
                "WHERE secret_sha256 = ?",
                [secret_hash(secret)],
            )
        )
        if not rows or rows[0]["revoked_at"]:
            raise AuthenticationError(
                "the API token is not valid (unknown or revoked); ask an admin for a token "
                "(`fleet token create`) and send it as `Authorization: Bearer <token>`"
            )
        row = rows[0]
        last = from_iso(row["last_used_at"]) if row["last_used_at"] else None
        if last is None or now - last >= LAST_USED_RESOLUTION:
            self.db.execute(
                f"UPDATE {TABLE} SET last_used_at = ? WHERE id = ?", [iso(now), row["id"]]
            )
        return Principal(row["id"], row["name"], Role(row["role"]))
