"""Enrollment: enrollment tokens (admin) and ``POST /v1/enroll`` (public: the enrollment token
travels in the body, since the device has no credentials yet)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, status
from pydantic import BaseModel, BeforeValidator, Field

from fleet.auth import Admin
from fleet.dependencies import Context, Enrollments, Now
from fleet.enrollment import (
    MAX_USES,
    DeviceEndpoints,
    Enrollment,
    EnrollmentRequest,
    EnrollmentTokenInfo,
    EnrollmentTokenSpec,
)
from fleet.settings import parse_duration
from fleet.tls import client_cert_issuer, pinned_ca_pem

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["enrollment"])


class NewEnrollmentToken(BaseModel):
    uses: int = Field(default=1, ge=1, le=MAX_USES, description="1 = single-use")
    expires_in: Annotated[timedelta, BeforeValidator(parse_duration)] = Field(
        default=timedelta(hours=24),
        description='lifetime: "24h", "7d", "30m" or seconds',
        json_schema_extra={"type": "string", "examples": ["24h"]},
    )
    group: str | None = None
    tags: list[str] = Field(default_factory=list, max_length=32)
    note: str = Field(default="", max_length=256, description="what or where it is for")


class IssuedEnrollmentTokenOut(BaseModel):
    """The created enrollment token. ``secret`` is shown only in this response."""

    id: str
    secret: str
    uses_total: int
    expires_at: datetime
    group: str | None
    tags: list[str]
    note: str


@router.post(
    "/enrollment-tokens",
    status_code=status.HTTP_201_CREATED,
    summary="Create an enrollment token (admin); the secret is shown once",
)
def create_enrollment_token(
    body: NewEnrollmentToken, service: Enrollments, admin: Admin, now: Now
) -> IssuedEnrollmentTokenOut:
    spec = EnrollmentTokenSpec(
        uses=body.uses,
        expires_in=body.expires_in,
        group=body.group,
        tags=tuple(body.tags),
        note=body.note,
    )
    issued = service.create_token(spec, admin.actor, now)
    info = issued.info
    return IssuedEnrollmentTokenOut(
        id=info.id,
        secret=issued.secret,
        uses_total=info.uses_total,
        expires_at=info.expires_at,
        group=info.group,
        tags=list(info.tags),
        note=info.note,
    )


@router.get("/enrollment-tokens", summary="List enrollment tokens (admin)")
def list_enrollment_tokens(
    service: Enrollments, _: Admin, now: Now, usable: bool = False
) -> list[EnrollmentTokenInfo]:
    return service.list_tokens(usable_at=now if usable else None)


@router.get("/enrollment-tokens/{token_id}", summary="One enrollment token (admin)")
def get_enrollment_token(token_id: str, service: Enrollments, _: Admin) -> EnrollmentTokenInfo:
    return service.get_token(token_id)


@router.delete("/enrollment-tokens/{token_id}", summary="Revoke an enrollment token (admin)")
def revoke_enrollment_token(
    token_id: str, service: Enrollments, admin: Admin, now: Now
) -> EnrollmentTokenInfo:
    return service.revoke_token(token_id, admin.actor, now)


@router.post(
    "/enroll",
    status_code=status.HTTP_201_CREATED,
    summary="Enroll a device with an enrollment token (public)",
)
def enroll(body: EnrollmentRequest, service: Enrollments, ctx: Context, now: Now) -> Enrollment:
    """Trade an enrollment token for a device identity: the device id (also its MQTT username
    and client id), the MQTT password (shown only here), the broker address, the fleet URL and
    the TUF ``root_json`` to pin (exact bytes as UTF-8 text: write it verbatim), and, when the
    fleet has a TLS CA, ``ca_pem`` to pin and a ``client_cert_pem`` for the ``tls_csr``."""
    settings = ctx.settings
    endpoints = DeviceEndpoints(
        broker_host=settings.broker.host,
        broker_port=settings.broker.port,
        broker_tls=settings.broker.tls,
        fleet_url=settings.base_url,
        ca_pem=pinned_ca_pem(settings.ca_file),
    )
    tls = settings.tls
    certs = client_cert_issuer(settings.ca_file, settings.ca_key_file, tls.client_cert_days)
    enrollment = service.enroll(body, now, ctx.trust_root, endpoints, certs)
    for listener in ctx.enrollment_listeners:
        try:
            listener.device_enrolled(enrollment.device_id)
        except Exception:  # the device is enrolled; a listener failure must not hide that
            log.exception("enrollment listener failed", extra={"device_id": enrollment.device_id})
    return enrollment
