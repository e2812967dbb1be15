"""The sandbox authorisation server as a Starlette app: OAuth endpoints, login, consent, admin.

Every handler reads its request in full, then hands it to Authlib in a worker thread (Authlib
and the store are synchronous). Browser state is a signed session cookie named
`behalf_sandbox_session`: cookies ignore ports, so on 127.0.0.1 the name must not collide with
behalf's own cookie.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any
from urllib.parse import urlencode, urlsplit

from authlib.oauth2.rfc6749 import OAuth2Error
from authlib.oidc.core.errors import ConsentRequiredError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from behalf.sandbox.pages import SCOPE_DESCRIPTIONS, Pages
from behalf.sandbox.server import (
    HttpRequest,
    SandboxAuthorizationServer,
    SandboxOAuth2Request,
    query_without,
    read_request,
    to_response,
    user_info,
)
from behalf.sandbox.store import Store
from behalf.sandbox.users import DEMO_PASSWORD, DEMO_USERS, DemoUser, authenticate

SESSION_COOKIE = "behalf_sandbox_session"
SESSION_MAX_AGE = 8 * 3600
ADMIN_PATH = "/_sandbox/admin"
JSON_NO_STORE = {"Cache-Control": "no-store"}


def build_auth_app(
    *, server: SandboxAuthorizationServer, store: Store, session_secret: str, api_base: str
) -> Starlette:
    handlers = _AuthHandlers(server, store, api_base)
    routes = [
        Route("/", handlers.home, methods=["GET"]),
        Route("/.well-known/oauth-authorization-server", handlers.metadata, methods=["GET"]),
        Route("/.well-known/openid-configuration", handlers.metadata, methods=["GET"]),
        Route("/jwks", handlers.jwks, methods=["GET"]),
        Route("/authorize", handlers.authorize, methods=["GET", "POST"]),
        Route("/login", handlers.login, methods=["GET", "POST"]),
        Route("/logout", handlers.logout, methods=["POST"]),
        Route("/token", handlers.token, methods=["POST"]),
        Route("/revoke", handlers.revoke, methods=["POST"]),
        Route("/introspect", handlers.introspect, methods=["POST"]),
        Route("/register", handlers.register, methods=["POST"]),
        Route("/userinfo", handlers.userinfo, methods=["GET", "POST"]),
        Route(ADMIN_PATH, handlers.admin, methods=["GET"]),
        Route(ADMIN_PATH + "/grants/{grant_id}/break", handlers.break_grant, methods=["POST"]),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=session_secret,
            session_cookie=SESSION_COOKIE,
            max_age=SESSION_MAX_AGE,
            same_site="lax",
            https_only=server.issuer.startswith("https://"),
        )
    ]
    return Starlette(routes=routes, middleware=middleware)


class _AuthHandlers:
    def __init__(self, server: SandboxAuthorizationServer, store: Store, api_base: str) -> None:
        self._server = server
        self._store = store
        self._api_base = api_base
        self._pages = Pages()

    # discovery ----------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse(ADMIN_PATH, status_code=303)

    async def metadata(self, request: Request) -> Response:
        return JSONResponse(self._server.metadata())

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(self._server.jwks())

    # OAuth endpoints for clients ------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        http = await read_request(request, self._server.issuer, body="form")
        response: Response = await run_in_threadpool(self._server.create_token_response, http)
        return response

    async def revoke(self, request: Request) -> Response:
        return await self._endpoint(request, "revocation", "form")

    async def introspect(self, request: Request) -> Response:
        return await self._endpoint(request, "introspection", "form")

    async def register(self, request: Request) -> Response:
        return await self._endpoint(request, "client_registration", "json")

    async def _endpoint(self, request: Request, name: str, body: Any) -> Response:
        http = await read_request(request, self._server.issuer, body=body)
        response: Response = await run_in_threadpool(
            self._server.create_endpoint_response, name, http
        )
        return response

    async def userinfo(self, request: Request) -> Response:
        check = await run_in_threadpool(self._server.check_bearer, request.headers, ["openid"])
        if check.error is not None:
            return to_response(*check.error)
        assert check.token is not None
        user = check.token.user
        if user is None:
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        return JSONResponse(dict(user_info(user, check.token.scope)), headers=JSON_NO_STORE)

    # the authorisation endpoint: login, consent ---------------------------------------------------

    async def authorize(self, request: Request) -> Response:
        # Authlib sees the authorisation request (the query string) only; the consent form is ours.
        http = await read_request(request, self._server.issuer, body="none")
        user = _signed_in(request)
        if request.method == "GET":
            response: Response = await run_in_threadpool(
                self._show_consent, http, user, _csrf(request)
            )
            return response
        form = await request.form()
        if user is None:
            return _to_login(http)
        if not _csrf_ok(request, form.get("csrf")):
            return self._pages.render(
                "error.html", 400, error="invalid_request", description="The form expired, retry."
            )
        ticked = {value for value in form.getlist("scope") if isinstance(value, str)}
        allow = form.get("decision") == "allow"
        auth_time = int(request.session.get("auth_time", 0)) or None
        response = await run_in_threadpool(self._decide, http, user, auth_time, allow, ticked)
        return response

    def _show_consent(self, http: HttpRequest, user: DemoUser | None, csrf: str) -> Response:
        try:
            grant = self._server.get_consent_grant(http, end_user=user)
        except OAuth2Error as error:
            return self._authorization_error(error)
        if user is None or grant.prompt == "login":
            return _to_login(http)
        prompts = (http.query_value("prompt") or "").split()
        if "none" in prompts:
            # This AS always asks: it cannot answer without showing the consent page.
            return self._authorization_error(
                ConsentRequiredError(
                    redirect_uri=grant.redirect_uri, state=grant.request.payload.state
                )
            )
        oauth: SandboxOAuth2Request = grant.request
        return self._pages.render(
            "consent.html",
            client_name=oauth.client.client_name,
            client_id=oauth.client.client_id,
            user=user,
            scopes=[(scope, SCOPE_DESCRIPTIONS.get(scope, scope)) for scope in oauth.scope.split()],
            action="/authorize?" + query_without(http, "prompt"),
            switch_next="/authorize?" + query_without(http, "prompt"),
            redirect_host=urlsplit(grant.redirect_uri).netloc,
            csrf=csrf,
        )

    def _decide(
        self,
        http: HttpRequest,
        user: DemoUser,
        auth_time: int | None,
        allow: bool,
        ticked: set[str],
    ) -> Response:
        try:
            grant = self._server.get_consent_grant(http, end_user=user)
        except OAuth2Error as error:
            return self._authorization_error(error)
        oauth: SandboxOAuth2Request = grant.request
        granted = [scope for scope in oauth.scope.split() if scope in ticked]
        if not allow or not granted:
            response: Response = self._server.create_authorization_response(
                request=oauth, grant_user=None, grant=grant
            )
            return response
        oauth.granted_scope = " ".join(granted)
        oauth.auth_time = auth_time
        response = self._server.create_authorization_response(
            request=oauth, grant_user=user, grant=grant
        )
        return response

    def _authorization_error(self, error: OAuth2Error) -> Response:
        response = self._server.authorization_error(error)
        if response.location:
            return response
        # Not safe to redirect (unknown client, unregistered redirect_uri): tell the person.
        return self._pages.render(
            "error.html", 400, error=error.error, description=error.get_error_description()
        )

    async def login(self, request: Request) -> Response:
        csrf = _csrf(request)
        if request.method == "GET":
            return self._login_page(request.query_params.get("next", ""), csrf)
        form = await request.form()
        username = str(form.get("username", ""))
        next_url = str(form.get("next", ""))
        if not _csrf_ok(request, form.get("csrf")):
            return self._login_page(next_url, csrf, username, "The form expired, retry.", 400)
        user = authenticate(username, str(form.get("password", "")))
        if user is None:
            return self._login_page(next_url, csrf, username, "Wrong username or password.", 401)
        request.session["sub"] = user.sub
        request.session["auth_time"] = int(self._server.clock())
        return RedirectResponse(_safe_next(next_url), status_code=303)

    def _login_page(
        self, next_url: str, csrf: str, username: str = "", error: str = "", status: int = 200
    ) -> Response:
        return self._pages.render(
            "login.html",
            status,
            next=_safe_next(next_url),
            csrf=csrf,
            username=username,
            error=error,
            users=list(DEMO_USERS.values()),
            password=DEMO_PASSWORD,
        )

    async def logout(self, request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # admin ----------------------------------------------------------------------------------------

    async def admin(self, request: Request) -> Response:
        grants, clients, calls = await run_in_threadpool(
            lambda: (self._store.grants(), self._store.clients(), self._store.calls()[-20:][::-1])
        )
        return self._pages.render(
            "admin.html",
            issuer=self._server.issuer,
            api_base=self._api_base,
            user=request.session.get("sub"),
            grants=grants,
            clients=clients,
            calls=calls,
            csrf=_csrf(request),
        )

    async def break_grant(self, request: Request) -> Response:
        form = await request.form()
        if not _csrf_ok(request, form.get("csrf")):
            return self._pages.render(
                "error.html", 400, error="invalid_request", description="The form expired, retry."
            )
        await run_in_threadpool(self._store.break_grant, request.path_params["grant_id"])
        return RedirectResponse(ADMIN_PATH, status_code=303)


def _signed_in(request: Request) -> DemoUser | None:
    sub = request.session.get("sub")
    return DEMO_USERS.get(sub) if isinstance(sub, str) else None


def _csrf(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(24)
        request.session["csrf"] = token
    return token


def _csrf_ok(request: Request, sent: object) -> bool:
    expected = request.session.get("csrf")
    return (
        isinstance(expected, str) and isinstance(sent, str) and hmac.compare_digest(expected, sent)
    )


def _to_login(http: HttpRequest) -> Response:
    back = "/authorize?" + query_without(http, "prompt")
    return RedirectResponse("/login?" + urlencode({"next": back}), status_code=303)


def _safe_next(next_url: str) -> str:
    """Only paths on this server: `next` must not turn login into an open redirect."""
    if next_url.startswith("/") and not next_url.startswith("//") and "\\" not in next_url:
        return next_url
    return ADMIN_PATH
