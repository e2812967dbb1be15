"""The app factory: one FastAPI app, HTML pages for people and JSON under `/api`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response

from api import audit, auth, connect, grants, health, logs, ops, reauth
from api.browser import SessionCookie
from api.common import Services
from api.deps import ApiDeps
from api.pages import render
from delegation.connect import Connector


def create_app(deps: ApiDeps) -> FastAPI:
    app = FastAPI(title="behalf", version="0.1.0", docs_url="/api/docs", redoc_url=None)
    app.state.sessions = deps.sessions
    app.state.clock = deps.clock
    app.state.ops_token = deps.ops_token
    logs.install()
    connector = Connector(
        deps.sessions, deps.vault, deps.oauth, deps.clock,
        secret_key=deps.secret_key.encode(), public_url=deps.public_url,
        environment=deps.environment, state_ttl=deps.state_ttl_seconds,
    )
    services = Services(deps=deps, connector=connector,
                        cookie=SessionCookie(deps.secret_key, deps.cookies))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 saying where and what is wrong, without echoing the input: a request's values
        (a pasted token, a megabyte of padding) are not ours to reflect."""
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": list(error.get("loc", ())), "msg": str(error.get("msg", "")),
             "type": str(error.get("type", ""))} for error in exc.errors()]})

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        if services.signed_in(request) is not None:
            return RedirectResponse("/grants", status_code=303)
        return render("index.html", title="Sign in")

    app.include_router(health.router)
    app.include_router(auth.build(services))
    app.include_router(connect.build(services))
    app.include_router(grants.build(services))
    app.include_router(reauth.build(services))
    app.include_router(ops.router)
    app.state.services = services
    app.include_router(audit.router)
    return app
