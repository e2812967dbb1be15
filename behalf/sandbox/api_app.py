"""The sandbox "SaaS API": a few resources behind bearer tokens issued by the sandbox AS.

Tokens are checked in-process against the AS's store with Authlib's RFC 6750 validator:
unknown, expired or revoked → 401 `WWW-Authenticate: Bearer error="invalid_token"`, missing
scope → 403. Every request under /v2 is logged (time, method, path, status, sub, client_id,
SHA-256 of the token presented, never the token) and readable at `GET /_sandbox/calls`.

`GET /v2/slow?ms=N` sleeps up to 5 s so one can watch behalf stop a running call when a
delegation is revoked: a client that hangs up mid-sleep is logged with status 499.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from behalf.sandbox.server import BearerCheck, SandboxAuthorizationServer, to_response
from behalf.sandbox.store import ApiCall, Clock, Store, Token

SLOW_MAX_MS = 5000
SLOW_STEP_SECONDS = 0.05
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client hung up first"; never sent

Action = Callable[[Request, Token], Awaitable[Response]]


def build_api_app(*, server: SandboxAuthorizationServer, store: Store, clock: Clock) -> Starlette:
    api = _Api(server, store, clock)
    routes = [
        Route("/v2/me", api.guarded(api.me), methods=["GET"]),
        Route("/v2/reports", api.guarded(api.list_reports, "reports:read"), methods=["GET"]),
        Route("/v2/reports", api.guarded(api.create_report, "reports:write"), methods=["POST"]),
        Route("/v2/calendar", api.guarded(api.calendar, "calendar:read"), methods=["GET"]),
        Route("/v2/slow", api.guarded(api.slow), methods=["GET"]),
        Route("/v2/{rest:path}", api.not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        Route("/_sandbox/calls", api.calls, methods=["GET"]),
    ]
    return Starlette(routes=routes)


def _problem(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


class _Api:
    def __init__(self, server: SandboxAuthorizationServer, store: Store, clock: Clock) -> None:
        self._server = server
        self._store = store
        self._clock = clock

    def guarded(self, action: Action, *scopes: str) -> Callable[[Request], Awaitable[Response]]:
        """Check the bearer token (and `scopes`), run `action`, and log the call either way."""

        async def endpoint(request: Request) -> Response:
            at = self._clock()
            started = time.monotonic()
            check: BearerCheck = await run_in_threadpool(
                self._server.check_bearer, request.headers, scopes
            )
            if check.error is not None:
                response: Response = to_response(*check.error)
            else:
                assert check.token is not None
                response = await action(request, check.token)
            await self._record(request, response.status_code, check, at, started)
            return response

        return endpoint

    async def _record(
        self, request: Request, status: int, check: BearerCheck, at: float, started: float
    ) -> None:
        call = ApiCall(
            at=at,
            method=request.method,
            path=request.url.path,
            status=status,
            sub=check.token.sub if check.token else None,
            client_id=check.token.client_id if check.token else None,
            token_sha256=check.token_sha256,
            duration_ms=int((time.monotonic() - started) * 1000),
        )
        await run_in_threadpool(self._store.record_call, call)

    async def not_found(self, request: Request) -> Response:
        at, started = self._clock(), time.monotonic()
        check = await run_in_threadpool(self._server.check_bearer, request.headers, ())
        response = _problem(404, "not_found", "No such resource.")
        await self._record(request, 404, check, at, started)
        return response

    async def calls(self, request: Request) -> Response:
        calls: Sequence[ApiCall] = await run_in_threadpool(self._store.calls)
        return JSONResponse({"calls": [call.as_dict() for call in calls]})

    # resources --------------------------------------------------------------------------------

    async def me(self, request: Request, token: Token) -> Response:
        user = token.user
        return JSONResponse(
            {
                "sub": token.sub,
                "name": user.name if user else token.sub,
                "client_id": token.client_id,
                "scope": token.scope,
            }
        )

    async def list_reports(self, request: Request, token: Token) -> Response:
        reports = await run_in_threadpool(self._store.reports, token.sub)
        return JSONResponse({"reports": [report.as_dict() for report in reports]})

    async def create_report(self, request: Request, token: Token) -> Response:
        try:
            payload: Any = await request.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return _problem(400, "invalid_request", "Send a JSON object with 'title' and 'body'.")
        title, body = payload.get("title"), payload.get("body", "")
        if not isinstance(title, str) or not title.strip() or len(title) > 200:
            return _problem(400, "invalid_request", "'title' must be a string of 1 to 200 chars.")
        if not isinstance(body, str) or len(body) > 20_000:
            return _problem(
                400, "invalid_request", "'body' must be a string of at most 20000 chars."
            )
        report = await run_in_threadpool(
            self._store.add_report, token.sub, title.strip(), body, token.client_id
        )
        return JSONResponse(report.as_dict(), status_code=201)

    async def calendar(self, request: Request, token: Token) -> Response:
        today = datetime.fromtimestamp(self._clock(), tz=UTC).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        plan = [(0, 9, "Stand-up"), (1, 14, "Quarterly review"), (3, 10, f"1:1 with {token.sub}")]
        events = [
            {
                "title": title,
                "start": (today + timedelta(days=day, hours=hour)).isoformat(),
                "end": (today + timedelta(days=day, hours=hour + 1)).isoformat(),
            }
            for day, hour, title in plan
        ]
        return JSONResponse({"events": events})

    async def slow(self, request: Request, token: Token) -> Response:
        try:
            wanted_ms = int(request.query_params.get("ms", "1000"))
        except ValueError:
            return _problem(400, "invalid_request", "'ms' must be an integer.")
        remaining = max(0, min(wanted_ms, SLOW_MAX_MS)) / 1000
        slept = 0.0
        while remaining > 0:
            step = min(SLOW_STEP_SECONDS, remaining)
            await asyncio.sleep(step)
            remaining -= step
            slept += step
            if await request.is_disconnected():
                return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse({"slept_ms": round(slept * 1000), "sub": token.sub})
