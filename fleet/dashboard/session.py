"""The dashboard's browser session: an API token held in a cookie, checked like a bearer token.

``POST /dashboard/login`` checks the token the user pastes (any role: viewer is the minimum)
and sets it as the ``edgefleet_session`` cookie: ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page sends it), ``Path=/dashboard`` (the browser never
sends it to the API), ``Secure`` behind https, 12 hours. :class:`SessionRoute`, the route class
of the dashboard's router, turns that cookie into ``Authorization: Bearer`` before FastAPI
resolves the route's dependencies, so the pages are guarded by :data:`fleet.auth.Viewer`
exactly like the API (and revoking the token ends the session at once). A browser without a
valid session is redirected to the login page; other clients get the API's 401.

This module does not render pages.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute

from fleet.errors import AuthenticationError

COOKIE = "edgefleet_session"
COOKIE_PATH = "/dashboard"
MAX_AGE_S = 12 * 3600
LOGIN_PATH = "/dashboard/login"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def with_session(request: Request) -> Request:
    """The request with its session cookie as a bearer token (unless it has its own)."""
    token = request.cookies.get(COOKIE)
    if not token or request.headers.get("authorization"):
        return request
    scope = dict(request.scope)
    scope["headers"] = [
        *request.scope["headers"],
        (b"authorization", b"Bearer " + token.encode("latin-1", "replace")),
    ]
    return Request(scope, request.receive)


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"{LOGIN_PATH}?next={quote(target, safe='')}", status_code=303)
    if request.cookies.get(COOKIE):  # a revoked or unknown token: forget it
        clear_cookie(response)
    return response


def set_cookie(response: Response, token: str, secure: bool) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=MAX_AGE_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=secure,
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")


def safe_next(target: str | None) -> str:
    """Only dashboard paths: ``next`` must not send the user to another site."""
    if target and target.startswith(COOKIE_PATH) and "//" not in target and "\\" not in target:
        return target
    return COOKIE_PATH


class SessionRoute(APIRoute):
    """Dashboard routes: session cookie as bearer token; browsers without one go to login."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            request = with_session(request)
            try:
                response = await inner(request)
            except AuthenticationError:
                if wants_html(request):
                    return login_redirect(request)
                raise
            for key, value in SECURITY_HEADERS.items():
                response.headers.setdefault(key, value)
            return response

        return handler
