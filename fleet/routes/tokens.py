"""Operator API tokens: ``/v1/tokens`` (admin only) and ``/v1/whoami`` (any role)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from fleet.auth import Admin, Viewer
from fleet.dependencies import Now, Tokens
from fleet.tokens import Role, TokenInfo

router = APIRouter(prefix="/v1", tags=["tokens"])


class NewToken(BaseModel):
    name: str = Field(min_length=1, max_length=64, examples=["ci-deploy"])
    role: Role


class IssuedTokenOut(BaseModel):
    """The created token. ``secret`` is shown only in this response: store it now."""

    id: str
    name: str
    role: Role
    created_at: datetime
    created_by: str
    secret: str


class WhoAmI(BaseModel):
    token_id: str
    name: str
    role: Role


@router.post(
    "/tokens",
    status_code=status.HTTP_201_CREATED,
    summary="Create an API token (admin); the secret is shown once",
)
def create_token(body: NewToken, tokens: Tokens, admin: Admin, now: Now) -> IssuedTokenOut:
    issued = tokens.create(body.name, body.role, admin.actor, now)
    info = issued.info
    return IssuedTokenOut(
        id=info.id,
        name=info.name,
        role=info.role,
        created_at=info.created_at,
        created_by=info.created_by,
        secret=issued.secret,
    )


@router.get("/tokens", summary="List API tokens (admin)")
def list_tokens(tokens: Tokens, _: Admin, include_revoked: bool = True) -> list[TokenInfo]:
    return tokens.list(include_revoked=include_revoked)


@router.get("/tokens/{token_id}", summary="One API token (admin)")
def get_token(token_id: str, tokens: Tokens, _: Admin) -> TokenInfo:
    return tokens.get(token_id)


@router.delete("/tokens/{token_id}", summary="Revoke an API token at once (admin)")
def revoke_token(token_id: str, tokens: Tokens, admin: Admin, now: Now) -> TokenInfo:
    return tokens.revoke(token_id, admin.actor, now)


@router.get("/whoami", summary="The token making this request and its role")
def whoami(principal: Viewer) -> WhoAmI:
    return WhoAmI(token_id=principal.token_id, name=principal.name, role=principal.role)
