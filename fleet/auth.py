"""Who may call what: FastAPI dependencies for operator tokens (with roles) and for devices.

Operators send ``Authorization: Bearer efo_...``; routes declare the least role they need with
one of three ``Annotated`` aliases, which also hand the handler the caller::

    def create_token(body: NewToken, tokens: Tokens, admin: Admin, now: Now) -> ...

``Viewer`` (reads), ``Operator`` (every mutating endpoint), ``Admin`` (token management,
enrollment tokens); roles nest, admin ⊇ operator ⊇ viewer. No token, or an unknown, revoked or
forged one, is 401 with ``WWW-Authenticate: Bearer``; a role too low is 403 naming the role
needed. Devices sign each request instead (:mod:`protocol.device_auth`); ``DeviceAuth`` checks
the signature against the registered key and refuses decommissioned devices at once.

Routes without one of these dependencies are public: only health, enrollment, the API docs and
(by default) ``/metrics``. ``tests/fleet/test_app_auth.py`` walks every route to keep it so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from fleet.audit import Actor
from fleet.dependencies import Context, Devices, Now, Tokens
from fleet.devices import DeviceStatus
from fleet.errors import AuthenticationError, DeviceAuthenticationError, PermissionDeniedError
from fleet.tokens import Principal, Role, TokenService
from protocol.device_auth import SCHEME as DEVICE_SCHEME
from protocol.device_auth import DeviceAuthError, verify_request

BEARER = "bearer"


def bearer_secret(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None when there is none."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != BEARER or not value.strip():
        return None
    return value.strip()


def authenticate(request: Request, tokens: TokenService, now: Now) -> Principal:
    """The operator behind the request's bearer token; :class:`AuthenticationError` if none."""
    secret = bearer_secret(request)
    if secret is None:
        raise AuthenticationError(
            "this endpoint needs an API token: send `Authorization: Bearer <token>` (an admin "
            "creates one with `fleet token create --role viewer --name NAME`)"
        )
    return tokens.authenticate(secret, now)


def _authenticated(request: Request, tokens: Tokens, now: Now) -> Principal:
    return authenticate(request, tokens, now)


Authenticated = Annotated[Principal, Depends(_authenticated)]


def _needs(role: Role, principal: Principal) -> Principal:
    if not principal.role.allows(role):
        raise PermissionDeniedError(
            f"this needs the {role} role or higher; token {principal.token_id} "
            f"({principal.name}) is a {principal.role}: ask an admin for a token with that role"
        )
    return principal


def require_viewer(principal: Authenticated) -> Principal:
    return _needs(Role.VIEWER, principal)


def require_operator(principal: Authenticated) -> Principal:
    return _needs(Role.OPERATOR, principal)


def require_admin(principal: Authenticated) -> Principal:
    return _needs(Role.ADMIN, principal)


Viewer = Annotated[Principal, Depends(require_viewer)]
Operator = Annotated[Principal, Depends(require_operator)]
Admin = Annotated[Principal, Depends(require_admin)]

# which dependency stands for which role (the route-walking test and docs read this)
ROLE_DEPENDENCIES: dict[Callable[[Principal], Principal], Role] = {
    require_viewer: Role.VIEWER,
    require_operator: Role.OPERATOR,
    require_admin: Role.ADMIN,
}


# --- devices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthenticatedDevice:
    id: str

    @property
    def actor(self) -> Actor:
        return Actor(f"device:{self.id}", self.id)


def request_target(request: Request) -> str:
    """The request target as the client sent it: raw (still percent-encoded) path + query."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) and raw else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def require_device(
    request: Request, devices: Devices, ctx: Context, now: Now
) -> AuthenticatedDevice:
    header = request.headers.get("authorization", "")
    if not header.startswith(DEVICE_SCHEME + " "):
        raise DeviceAuthenticationError(
            f"this endpoint is for enrolled devices: sign the request with the device key "
            f"(`Authorization: {DEVICE_SCHEME} device=...,ts=...,sig=...`)"
        )
    keys: dict[str, DeviceStatus] = {}

    def public_key_for(device_id: str) -> bytes | None:
        found = devices.signing_key(device_id)
        if found is None:
            return None
        keys[device_id] = found[1]
        return found[0]

    try:
        device_id = verify_request(
            header,
            public_key_for,
            request.method,
            request_target(request),
            now.timestamp(),
            ctx.settings.device_auth_max_skew.total_seconds(),
        )
    except DeviceAuthError as exc:
        raise DeviceAuthenticationError(str(exc)) from None
    # checked after the signature, so only the device itself learns it was decommissioned
    if keys[device_id] is not DeviceStatus.ACTIVE:
        raise PermissionDeniedError(
            f"device {device_id} is decommissioned and its credentials are revoked; "
            "re-provision it with a new enrollment token"
        )
    return AuthenticatedDevice(device_id)


DeviceAuth = Annotated[AuthenticatedDevice, Depends(require_device)]
