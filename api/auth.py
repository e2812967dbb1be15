"""Signing in to the pages through the deployment's AS (OIDC, an `openid`-only client).

    GET  /auth/login?next=/path   start sign-in (PKCE, nonce, state bound to this browser)
    GET  /auth/callback           finish it: the ID token's `sub` is the user
    POST /auth/logout             forget the user in this browser (CSRF-protected)
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from api.browser import BrowserSession
from api.common import Services, is_form, parse_callback, read_form, refused
from api.pages import error_page
from delegation.connect import ConnectRefused, safe_return_to


def login_redirect(next_path: str) -> RedirectResponse:
    return RedirectResponse(f"/auth/login?next={quote(next_path, safe='/')}", status_code=303)


def build(services: Services) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/auth/login")
    def login(request: Request, next_path: str | None = Query(None, alias="next")
              ) -> Response:
        return_to = safe_return_to(next_path) or "/grants"
        current = services.signed_in(request)
        if current is not None:
            return RedirectResponse(return_to, status_code=303)
        session = services.session(request) or BrowserSession.new()
        try:
            url = services.connector.start_signin(browser=session.binding, return_to=return_to)
        except ConnectRefused as exc:
            return refused(exc, signed_in=False)
        response = RedirectResponse(url, status_code=303)
        services.cookie.write(response, session)
        return response

    @router.get("/auth/callback")
    def callback(request: Request) -> Response:
        session = services.session(request)
        try:
            params = parse_callback(request)
            signed = services.connector.finish_signin(
                params, browser=session.binding if session else None)
        except ConnectRefused as exc:
            return refused(exc, signed_in=bool(session and session.signed_in))
        response = RedirectResponse(signed.return_to or "/grants", status_code=303)
        # A new binding and CSRF token: nothing minted before sign-in outlives it.
        services.cookie.write(response, BrowserSession.new(signed.user_id, signed.subject))
        return response

    @router.post("/auth/logout")
    async def logout(request: Request) -> Response:
        session = services.session(request)
        form = await read_form(request) if is_form(request) else None
        token = form.get("csrf_token") if form else None
        if session is None or not session.csrf_ok(token):
            return error_page(403, "This sign-out did not come from this site's page.")
        # To "/", not to a page that needs sign-in: the AS session would sign us straight in.
        response = RedirectResponse("/", status_code=303)
        services.cookie.write(response, session.signed_out())
        return response

    return router
