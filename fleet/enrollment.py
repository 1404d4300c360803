"""Enrollment: admins issue enrollment tokens; a device trades one for its identity.

An enrollment token is a random secret (``efe_...``, stored as SHA-256) with a number of uses
(1 for single-use), an expiry, and optionally a group and tags that every device enrolled with it
gets. ``POST /v1/enroll`` presents the secret with the device's Ed25519 public key, its firmware
profile and its facts, and gets back a device id, MQTT credentials (the password exists only in
that response), the broker address, the fleet's base URL, the TUF ``root.json`` to pin and,
when the fleet has a TLS CA, the CA to pin and a client certificate for the device's CSR.

Counting uses, checking expiry, inserting the device and writing the audit entry happen in one
``BEGIN IMMEDIATE`` transaction, so concurrent enrollments can never exceed a token's uses, and a
refused or failed enrollment consumes nothing. The trust root is read before the transaction, so
an uninitialised TUF repository refuses enrollment (503) without using up a token.

This module does not serve HTTP and does not create the TUF repository (``fleet keys init``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlite_utils import Database

from fleet.audit import Actor, AuditLog
from fleet.devices import DeviceRegistry, DeviceStatus, validate_group, validate_tags
from fleet.errors import (
    DuplicateDeviceKeyError,
    EnrollmentRefusedError,
    InvalidInputError,
    InvalidPublicKeyError,
    TokenNotFoundError,
    TrustRootUnavailableError,
)
from fleet.mqtt_credentials import mosquitto_hash, new_password
from fleet.store import from_iso, immediate, iso, to_json
from fleet.tokens import new_id, new_secret, secret_hash
from protocol.device_auth import PublicKeyError, load_public_key
from protocol.profiles import ARCHES

log = logging.getLogger(__name__)

TABLE = "enrollment_tokens"
SECRET_PREFIX = "efe_"
MAX_USES = 100_000
MIN_LIFETIME = timedelta(minutes=1)
MAX_LIFETIME = timedelta(days=365)
MAX_FACTS_BYTES = 4096
PROFILE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NEW_DEVICE_ATTEMPTS = 5


class TrustRootSource(Protocol):
    """Where the TUF root handed to enrolling devices comes from (:class:`TufRepository`).

    ``root_bytes()`` returns the newest ``root.json`` exactly as published, or raises an
    :class:`~fleet.errors.UnavailableError` when there is no repository yet."""

    def root_bytes(self) -> bytes: ...


class ClientCertIssuer(Protocol):
    """Signs a device's TLS client certificate from its CSR (:class:`fleet.tls.ClientCerts`).

    ``check`` raises :class:`~fleet.errors.InvalidInputError` for a CSR it would not sign;
    ``issue`` returns the certificate PEM naming ``device_id``."""

    def check(self, csr_pem: str) -> None: ...

    def issue(self, csr_pem: str, device_id: str, now: datetime) -> str: ...


class EnrollmentListener(Protocol):
    """Told (after commit) that a device was enrolled, e.g. to add its MQTT credentials to the
    broker's password file before the device first connects."""

    def device_enrolled(self, device_id: str) -> None: ...


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrollmentTokenSpec:
    uses: int = 1
    expires_in: timedelta = timedelta(hours=24)
    group: str | None = None
    tags: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class EnrollmentTokenInfo:
    """What may be shown about an enrollment token: never its secret or hash."""

    id: str
    note: str
    uses_total: int
    uses_left: int
    expires_at: datetime
    group: str | None
    tags: tuple[str, ...]
    created_at: datetime
    created_by: str
    revoked_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and self.uses_left > 0 and now < self.expires_at


@dataclass(frozen=True)
class IssuedEnrollmentToken:
    info: EnrollmentTokenInfo
    secret: str


class DeviceFacts(BaseModel):
    """What the agent reports about its machine at enrollment; extra keys are kept as given."""

    model_config = ConfigDict(extra="allow", frozen=True)

    arch: str = Field(description=f"one of {', '.join(ARCHES)}")
    ram_mb: int = Field(ge=1)
    agent_version: str = Field(min_length=1, max_length=64)
    cores: int | None = Field(default=None, ge=1)
    storage_mb: int | None = Field(default=None, ge=0)
    board: str = Field(default="", max_length=256)
    runtimes: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in ARCHES:
            raise ValueError(f"arch {value!r} is not supported; use one of {', '.join(ARCHES)}")
        return value


class EnrollmentRequest(BaseModel):
    """The body of ``POST /v1/enroll``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str = Field(min_length=1, max_length=256, description="the enrollment token secret")
    public_key: str = Field(
        min_length=1,
        max_length=2048,
        description="the device's Ed25519 public key: 64 hex digits (raw) or PEM",
    )
    profile: str = Field(pattern=PROFILE_PATTERN, description="firmware profile name")
    facts: DeviceFacts
    tls_csr: str | None = Field(
        default=None,
        max_length=8192,
        description="PEM CSR of the device's TLS key (ECDSA P-256): the fleet returns a client "
        "certificate for mutual TLS with the broker when it holds the fleet CA's key",
    )


@dataclass(frozen=True)
class DeviceEndpoints:
    """Where an enrolled device connects: told to it in the enrollment response."""

    broker_host: str
    broker_port: int
    broker_tls: bool
    fleet_url: str
    ca_pem: str | None = None  # the fleet CA devices pin (broker TLS and an https fleet)


@dataclass(frozen=True)
class Enrollment:
    """The result of a successful enrollment. ``mqtt_password`` is shown here only."""

    device_id: str
    mqtt_username: str
    mqtt_password: str
    broker_host: str
    broker_port: int
    broker_tls: bool
    fleet_url: str
    root_json: str  # the exact bytes of root.json as UTF-8 text: write them verbatim
    profile: str
    group: str | None
    tags: tuple[str, ...]
    ca_pem: str | None = None  # pin it: verify the broker (and an https fleet URL) with it
    client_cert_pem: str | None = None  # for the key of tls_csr; names the device id


def _info(row: dict[str, Any]) -> EnrollmentTokenInfo:
    return EnrollmentTokenInfo(
        id=row["id"],
        note=row["note"],
        uses_total=row["uses_total"],
        uses_left=row["uses_left"],
        expires_at=from_iso(row["expires_at"]),
        group=row["group_name"],
        tags=tuple(json.loads(row["tags"])),
        created_at=from_iso(row["created_at"]),
        created_by=row["created_by"],
        revoked_at=from_iso(row["revoked_at"]) if row["revoked_at"] else None,
    )


_ASK = "ask an admin for a new one (`fleet enroll-token create`)"


class EnrollmentService:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.audit = AuditLog(db)

    # --- enrollment tokens (admin) ----------------------------------------------------------

    def create_token(
        self, spec: EnrollmentTokenSpec, actor: Actor, now: datetime
    ) -> IssuedEnrollmentToken:
        if not 1 <= spec.uses <= MAX_USES:
            raise InvalidInputError(f"uses must be between 1 and {MAX_USES}, got {spec.uses}")
        if not MIN_LIFETIME <= spec.expires_in <= MAX_LIFETIME:
            raise InvalidInputError(
                f"an enrollment token must expire between {MIN_LIFETIME} and "
                f"{MAX_LIFETIME.days} days from now, got {spec.expires_in}"
            )
        if len(spec.note) > 256 or "\n" in spec.note:
            raise InvalidInputError("the note is one line of at most 256 characters")
        secret = new_secret(SECRET_PREFIX)
        row: dict[str, Any] = {
            "id": new_id("enr"),
            "secret_sha256": secret_hash(secret),
            "note": spec.note,
            "uses_total": spec.uses,
            "uses_left": spec.uses,
            "expires_at": iso(now + spec.expires_in),
            "group_name": validate_group(spec.group),
            "tags": to_json(list(validate_tags(spec.tags))),
            "created_at": iso(now),
            "created_by": actor.id,
            "revoked_at": None,
        }
        detail = {
            "uses": spec.uses,
            "expires_at": row["expires_at"],
            "group": row["group_name"],
            "tags": json.loads(row["tags"]),
            "note": spec.note,
        }
        with immediate(self.db):
            self.db.table(TABLE).insert(row)
            self.audit.record(actor, "enrollment_token.create", row["id"], now, detail)
        return IssuedEnrollmentToken(_info(row), secret)

    def list_tokens(self, *, usable_at: datetime | None = None) -> list[EnrollmentTokenInfo]:
        """Every enrollment token, or only those still usable at ``usable_at``."""
        tokens = [_info(r) for r in self.db.query(f"SELECT * FROM {TABLE} ORDER BY rowid")]
        return [t for t in tokens if usable_at is None or t.usable(usable_at)]

    def get_token(self, token_id: str) -> EnrollmentTokenInfo:
        rows = list(self.db.query(f"SELECT * FROM {TABLE} WHERE id = ?", [token_id]))
        if not rows:
            raise TokenNotFoundError(
                f"no enrollment token {token_id!r}; GET /v1/enrollment-tokens lists them"
            )
        return _info(rows[0])

    def revoke_token(self, token_id: str, actor: Actor, now: datetime) -> EnrollmentTokenInfo:
        with immediate(self.db):
            token = self.get_token(token_id)
            if token.revoked_at is None:
                self.db.execute(
                    f"UPDATE {TABLE} SET revoked_at = ? WHERE id = ?", [iso(now), token_id]
                )
                self.audit.record(actor, "enrollment_token.revoke", token_id, now)
        return self.get_token(token_id)

    # --- enrolling a device -----------------------------------------------------------------

    def enroll(
        self,
        request: EnrollmentRequest,
        now: datetime,
        trust_root: TrustRootSource,
        endpoints: DeviceEndpoints,
        client_certs: ClientCertIssuer | None = None,
    ) -> Enrollment:
        """Enroll a device; with ``client_certs`` and a ``tls_csr`` it also gets a client
        certificate (a CSR that cannot be signed refuses the enrollment, using nothing up)."""
        csr = request.tls_csr if client_certs is not None else None
        if client_certs is not None and csr is not None:
            client_certs.check(csr)
        try:
            public_key = load_public_key(request.public_key).hex()
        except PublicKeyError as exc:
            raise InvalidPublicKeyError(str(exc)) from None
        facts = request.facts.model_dump(mode="json")
        if len(to_json(facts)) > MAX_FACTS_BYTES:
            raise InvalidInputError(f"facts must fit in {MAX_FACTS_BYTES} bytes of JSON")
        root_json = self._root_json(trust_root)
        password = new_password()
        try:
            with immediate(self.db):
                token = self._take_use(request.token, now)
                device_id = self._register(request, token, public_key, facts, password, now)
                cert = None
                if client_certs is not None and csr is not None:
                    cert = client_certs.issue(csr, device_id, now)
        except EnrollmentRefusedError as exc:
            log.warning("enrollment refused: %s", exc, extra={"profile": request.profile})
            raise
        log.info(
            "device enrolled",
            extra={
                "device_id": device_id,
                "enrollment_token": token.id,
                "profile": request.profile,
            },
        )
        return Enrollment(
            device_id=device_id,
            mqtt_username=device_id,
            mqtt_password=password,
            broker_host=endpoints.broker_host,
            broker_port=endpoints.broker_port,
            broker_tls=endpoints.broker_tls,
            fleet_url=endpoints.fleet_url,
            root_json=root_json,
            profile=request.profile,
            group=token.group,
            tags=token.tags,
            ca_pem=endpoints.ca_pem,
            client_cert_pem=cert,
        )

    @staticmethod
    def _root_json(trust_root: TrustRootSource) -> str:
        data = trust_root.root_bytes()
        try:
            text = data.decode("utf-8")
            json.loads(text)
        except ValueError:
            raise TrustRootUnavailableError(
                "the TUF root.json is not valid JSON; check the repository (`fleet keys status`)"
            ) from None
        return text

    def _take_use(self, secret: str, now: datetime) -> EnrollmentTokenInfo:
        """Consume one use of the token; must run inside the enrollment transaction."""
        rows = list(
            self.db.query(f"SELECT * FROM {TABLE} WHERE secret_sha256 = ?", [secret_hash(secret)])
        )
        if not rows:
            raise EnrollmentRefusedError(f"the enrollment token is not valid; {_ASK}")
        token = _info(rows[0])
        if token.revoked_at is not None:
            raise EnrollmentRefusedError(f"the enrollment token {token.id} was revoked; {_ASK}")
        if now >= token.expires_at:
            raise EnrollmentRefusedError(
                f"the enrollment token {token.id} expired at {iso(token.expires_at)}; {_ASK}"
            )
        if token.uses_left <= 0:
            raise EnrollmentRefusedError(
                f"the enrollment token {token.id} is used up ({token.uses_total} of "
                f"{token.uses_total} uses); {_ASK}"
            )
        self.db.execute(
            f"UPDATE {TABLE} SET uses_left = uses_left - 1 WHERE id = ? AND uses_left > 0",
            [token.id],
        )
        return token

    def _register(
        self,
        request: EnrollmentRequest,
        token: EnrollmentTokenInfo,
        public_key: str,
        facts: dict[str, Any],
        password: str,
        now: datetime,
    ) -> str:
        registry = DeviceRegistry(self.db)
        taken = self.db.execute(
            "SELECT id FROM devices WHERE public_key = ? AND status = ?",
            [public_key, DeviceStatus.ACTIVE.value],
        ).fetchone()
        if taken:
            raise DuplicateDeviceKeyError(
                f"this public key is already enrolled as {taken[0]}; decommission that device "
                "first, or generate a new key on the device"
            )
        for _ in range(_NEW_DEVICE_ATTEMPTS):
            device_id = new_id("dev")
            if not registry.exists(device_id):
                break
        else:  # 48 random bits colliding five times means the generator is broken
            raise RuntimeError("could not find a free device id")
        registry.insert(
            {
                "id": device_id,
                "public_key": public_key,
                "profile": request.profile,
                "facts": to_json(facts),
                "agent_version": request.facts.agent_version,
                "group_name": token.group,
                "tags": to_json(list(token.tags)),
                "enrolled_at": iso(now),
                "enrollment_token_id": token.id,
                "status": DeviceStatus.ACTIVE.value,
                "decommissioned_at": None,
                "mqtt_username": device_id,
                "mqtt_password_hash": mosquitto_hash(password),
                "online": 0,
                "last_seen": None,
            }
        )
        self.audit.record(
            Actor(f"enrollment-token:{token.id}", token.note),
            "device.enroll",
            device_id,
            now,
            {
                "profile": request.profile,
                "agent_version": request.facts.agent_version,
                "arch": request.facts.arch,
                "group": token.group,
                "tags": list(token.tags),
            },
        )
        return device_id
