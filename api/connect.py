"""Connecting an agent: the authorisation request and the AS's answer.

    GET /connect/{agent}   signed-in users only: PKCE S256, a state bound to this browser,
                           a nonce for OIDC providers, the agent's scopes; off to the AS
    GET /oauth/callback    the checks of `delegation.connect.Connector.finish_connect`, then
                           back to /grants; any refusal is a clear page, never a 500
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from api.auth import login_redirect
from api.common import Services, parse_callback, refused
from api.pages import error_page
from delegation.connect import ConnectRefused
from delegation.providers import NAME_PATTERN


def build(services: Services) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/connect/{agent}")
    def connect(agent: str, request: Request) -> Response:
        if not NAME_PATTERN.fullmatch(agent):
            return error_page(404, "There is no such agent.")
        current = services.signed_in(request)
        if current is None:
            return login_redirect(f"/connect/{agent}")
        session, user = current
        try:
            url = services.connector.start_connect(agent, user_id=user.id,
                                                   browser=session.binding)
        except ConnectRefused as exc:
            return refused(exc, signed_in=True)
        return RedirectResponse(url, status_code=303)

    @router.get("/oauth/callback")
    def callback(request: Request) -> Response:
        session = services.session(request)
        signed_in = bool(session and session.signed_in)
        try:
            params = parse_callback(request)
            granted = services.connector.finish_connect(
                params, browser=session.binding if session else None,
                user_id=session.user_id if session else None)
        except ConnectRefused as exc:
            return refused(exc, signed_in=signed_in)
        return RedirectResponse(f"/grants?connected={quote(granted.agent_name)}",
                                status_code=303)

    return router
