"""Operators and roles: every route of the app is guarded (walked, not listed), tokens are
hashed, revocation is immediate, forged tokens are refused, and token changes are audited.

The route walk covers routes added later by other modules of ``fleet.routes``: a new route must
declare ``Viewer``/``Operator``/``Admin``/``DeviceAuth`` or be added to ``PUBLIC`` here, with a
reason.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing

import httpx
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import Route

from fleet.app import create_app
from fleet.auth import ROLE_DEPENDENCIES, require_device
from fleet.settings import FleetSettings
from fleet.tokens import Role

# (method, path) that work without any credentials, and why
PUBLIC = {
    ("GET", "/healthz"): "load balancers probe it",
    (
        "POST",
        "/v1/enroll",
    ): "the device has no credentials yet; the enrollment token is in the body",
    ("GET", "/metrics"): "scraped on the internal network (metrics_auth = none, the default)",
    ("GET", "/openapi.json"): "the API's shape is public (open source)",
    ("GET", "/docs"): "the API docs",
    ("GET", "/docs/oauth2-redirect"): "part of the API docs",
    ("GET", "/redoc"): "the API docs",
    ("GET", "/dashboard/login"): "the dashboard's sign-in form: a browser has no session yet",
    ("POST", "/dashboard/login"): "checks the pasted API token itself (401 page if not valid)",
    ("POST", "/dashboard/logout"): "only clears the caller's own session cookie",
    ("GET", "/dashboard/static/{name}"): "the sign-in page's CSS and script; no data",
}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def _auth_kinds(dependant: Dependant) -> set[str]:
    kinds = set()
    if dependant.call in ROLE_DEPENDENCIES:
        kinds.add(ROLE_DEPENDENCIES[dependant.call].value)
    if dependant.call is require_device:
        kinds.add("device")
    for sub in dependant.dependencies:
        kinds |= _auth_kinds(sub)
    return kinds


def endpoints(app: FastAPI) -> Iterator[tuple[str, str, set[str]]]:
    """(method, path, auth kinds) of every route of the app, as served (prefixes and
    router-level dependencies included)."""
    for ctx in iter_route_contexts(app.routes):
        if isinstance(ctx.original_route, APIRoute):
            kinds = _auth_kinds(ctx.dependant)
        elif isinstance(ctx.original_route, Route):
            kinds = set()
        else:
            raise AssertionError(
                f"{ctx.original_route!r} is neither an API route nor a plain route (a mount?): "
                "guard it and teach this test how to check it"
            )
        assert ctx.path, ctx
        for method in sorted((ctx.methods or set()) - {"HEAD", "OPTIONS"}):
            yield method, ctx.path, kinds


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_route_is_guarded_or_public(app: FastAPI) -> None:
    seen = set()
    for method, path, kinds in endpoints(app):
        seen.add((method, path))
        if (method, path) in PUBLIC:
            assert not kinds, f"{method} {path} is listed as public but requires {kinds}"
            continue
        assert kinds, (
            f"{method} {path} has no auth dependency: declare Viewer, Operator, Admin or "
            "DeviceAuth (fleet.auth), or add it to PUBLIC in this test with a reason"
        )
        if method in MUTATING:
            assert kinds & {"operator", "admin", "device"}, (
                f"{method} {path} mutates but only needs {kinds}: use Operator or Admin"
            )
    assert set(PUBLIC) <= seen, f"PUBLIC lists routes the app lacks: {set(PUBLIC) - seen}"
    # the areas of this part are there
    for must in ("/v1/tokens", "/v1/devices", "/v1/enrollment-tokens", "/v1/audit"):
        assert any(path == must for _, path, _ in endpoints(app)), must


def stored(settings: FleetSettings) -> dict[str, list[str]]:
    """Every table's rows: a refused request changes none (not even a token's last use)."""
    with closing(sqlite3.connect(settings.db_path)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(map(repr, db.execute(f'SELECT * FROM "{t}"'))) for t in tables}


def test_without_a_token_every_guarded_route_is_401(
    app: FastAPI, http: httpx.Client, settings: FleetSettings
) -> None:
    before = stored(settings)
    checked = 0
    for method, path, _ in endpoints(app):
        if (method, path) in PUBLIC:
            continue
        r = http.request(method, concrete(path))
        assert r.status_code == 401, f"{method} {path} without a token: {r.status_code} {r.text}"
        assert r.headers.get("www-authenticate"), f"{method} {path}: no WWW-Authenticate"
        assert r.json()["detail"], r.text
        checked += 1
    assert checked >= 10
    assert stored(settings) == before


def test_a_viewer_gets_403_on_every_mutating_route(
    app: FastAPI, http: httpx.Client, viewer: dict[str, str], settings: FleetSettings
) -> None:
    assert http.get("/v1/whoami", headers=viewer).status_code == 200  # its last use recorded
    before = stored(settings)
    checked = 0
    for method, path, kinds in endpoints(app):
        if (method, path) in PUBLIC or method not in MUTATING:
            continue
        r = http.request(method, concrete(path), headers=viewer)
        if "device" in kinds:  # an operator token is no device signature
            assert r.status_code == 401, f"{method} {path}: {r.status_code}"
            continue
        assert r.status_code == 403, f"{method} {path} as viewer: {r.status_code} {r.text}"
        needed = "admin" if "admin" in kinds else "operator"
        assert f"needs the {needed} role" in r.json()["detail"]
        checked += 1
    assert checked >= 5
    assert stored(settings) == before


def test_reads_follow_the_role_hierarchy(
    app: FastAPI,
    http: httpx.Client,
    viewer: dict[str, str],
    operator: dict[str, str],
    admin: dict[str, str],
) -> None:
    headers = {Role.VIEWER: viewer, Role.OPERATOR: operator, Role.ADMIN: admin}
    for method, path, kinds in endpoints(app):
        roles = [Role(k) for k in kinds if k in {r.value for r in Role}]
        if method != "GET" or not roles or "{" in path:
            continue
        needed = max(roles, key=lambda r: r.rank)
        for role, h in headers.items():
            r = http.get(path, headers=h)
            if role.allows(needed):
                assert r.status_code == 200, f"GET {path} as {role}: {r.status_code} {r.text}"
            else:
                assert r.status_code == 403, f"GET {path} as {role}: {r.status_code}"


def test_public_routes_need_no_token(http: httpx.Client) -> None:
    assert http.get("/healthz").json()["status"] == "ok"
    assert http.get("/docs").status_code == 200
    assert "/v1/enroll" in http.get("/openapi.json").json()["paths"]
    assert http.get("/metrics").status_code == 200
    # enrollment is reachable without a token: it fails on the body, not on auth
    assert http.post("/v1/enroll", json={}).status_code == 422


def test_metrics_can_require_a_viewer_token(
    settings: FleetSettings,
    launch: Callable[[FastAPI], str],
    mint: Callable[[str], dict[str, str]],
) -> None:
    guarded = settings.model_copy(update={"metrics_auth": "viewer"})
    url = launch(create_app(guarded))
    assert httpx.get(f"{url}/metrics").status_code == 401
    r = httpx.get(f"{url}/metrics", headers=mint("viewer"))
    assert r.status_code == 200 and "edgefleet_http_requests_total" in r.text


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer efo_" + "A" * 43,  # well-formed but never issued
        "Bearer efo_",
        "Bearer not-a-token",
        "Basic YWRtaW46YWRtaW4=",
        "Bearer",
        "",
    ],
)
def test_forged_or_malformed_tokens_are_401(http: httpx.Client, authorization: str) -> None:
    r = http.get("/v1/devices", headers={"Authorization": authorization})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


def test_a_tampered_token_is_refused(http: httpx.Client, admin: dict[str, str]) -> None:
    secret = admin["Authorization"].removeprefix("Bearer ")
    assert http.get("/v1/whoami", headers=admin).status_code == 200
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    r = http.get("/v1/whoami", headers={"Authorization": f"Bearer {flipped}"})
    assert r.status_code == 401
    assert "unknown or revoked" in r.json()["detail"]


def test_token_lifecycle_over_the_api(http: httpx.Client, admin: dict[str, str]) -> None:
    r = http.post("/v1/tokens", json={"name": "ci deploy", "role": "operator"}, headers=admin)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["secret"].startswith("efo_") and made["role"] == "operator"
    op = {"Authorization": f"Bearer {made['secret']}"}
    assert http.get("/v1/whoami", headers=op).json() == {
        "token_id": made["id"],
        "name": "ci deploy",
        "role": "operator",
    }
    listed = http.get("/v1/tokens", headers=admin).json()
    assert {t["id"] for t in listed} >= {made["id"]}
    assert all("secret" not in t and "secret_sha256" not in t for t in listed)
    # an operator cannot manage tokens
    assert (
        http.post("/v1/tokens", json={"name": "x", "role": "admin"}, headers=op).status_code == 403
    )
    # revocation is immediate
    r = http.delete(f"/v1/tokens/{made['id']}", headers=admin)
    assert r.status_code == 200 and r.json()["revoked_at"]
    assert http.get("/v1/whoami", headers=op).status_code == 401
    assert http.get(f"/v1/tokens/{made['id']}", headers=admin).json()["revoked_at"]
    assert http.delete("/v1/tokens/tok-000000000000", headers=admin).status_code == 404
    # audited, with who did it
    audit = http.get("/v1/audit", params={"target": made["id"]}, headers=admin).json()
    assert [e["action"] for e in audit["items"]] == ["token.revoke", "token.create"]
    me = http.get("/v1/whoami", headers=admin).json()
    assert {e["actor"] for e in audit["items"]} == {f"token:{me['token_id']}"}


def test_bad_token_requests_say_what_to_do(http: httpx.Client, admin: dict[str, str]) -> None:
    r = http.post("/v1/tokens", json={"name": "x", "role": "root"}, headers=admin)
    assert r.status_code == 422 and "admin" in r.text
    r = http.post("/v1/tokens", json={"name": "bad\nname", "role": "viewer"}, headers=admin)
    assert r.status_code == 422 and "token name" in r.json()["detail"]


def test_the_last_admin_token_cannot_be_revoked(http: httpx.Client, admin: dict[str, str]) -> None:
    me = http.get("/v1/whoami", headers=admin).json()
    r = http.delete(f"/v1/tokens/{me['token_id']}", headers=admin)
    assert r.status_code == 409
    assert "last active admin token" in r.json()["detail"]
    other = http.post("/v1/tokens", json={"name": "a2", "role": "admin"}, headers=admin).json()
    assert http.delete(f"/v1/tokens/{me['token_id']}", headers=admin).status_code == 200
    assert http.get("/v1/whoami", headers=admin).status_code == 401
    assert http.get("/v1/whoami", headers={"Authorization": f"Bearer {other['secret']}"}).is_success


def test_tokens_are_stored_hashed(
    settings: FleetSettings, http: httpx.Client, admin: dict[str, str]
) -> None:
    secret = http.post("/v1/tokens", json={"name": "h", "role": "viewer"}, headers=admin).json()[
        "secret"
    ]
    conn = sqlite3.connect(settings.db_path)
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(tokens)")]
        rows = conn.execute("SELECT * FROM tokens").fetchall()
    finally:
        conn.close()
    assert "secret" not in columns
    assert all(secret not in str(value) for row in rows for value in row)
    # nor anywhere else in the database files (WAL included)
    for path in settings.db_path.parent.glob("fleet.db*"):
        assert secret.encode() not in path.read_bytes()


def test_last_used_is_recorded(http: httpx.Client, admin: dict[str, str]) -> None:
    listed = http.get("/v1/tokens", headers=admin).json()
    assert any(t["last_used_at"] for t in listed)
