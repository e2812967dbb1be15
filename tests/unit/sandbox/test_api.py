from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest

from behalf.sandbox import Sandbox
from tests.unit.sandbox.helpers import FakeClock, bearer, connect, register

pytestmark = pytest.mark.anyio

ALL_SCOPES = "openid reports:read reports:write calendar:read"


async def _token(auth: httpx.AsyncClient, scope: str = ALL_SCOPES) -> tuple[str, str]:
    client = await register(auth, "client_secret_basic")
    token = await connect(auth, client, scope=scope)
    return token["access_token"], client.client_id


async def test_accepts_a_valid_token(auth: httpx.AsyncClient, api: httpx.AsyncClient) -> None:
    access_token, client_id = await _token(auth)

    me = await api.get("/v2/me", headers=bearer(access_token))
    reports = await api.get("/v2/reports", headers=bearer(access_token))
    calendar = await api.get("/v2/calendar", headers=bearer(access_token))

    assert me.status_code == 200
    assert me.json() == {
        "sub": "alice",
        "name": "Alice Anders",
        "client_id": client_id,
        "scope": ALL_SCOPES,
    }
    assert [report["title"] for report in reports.json()["reports"]] == [
        "Q3 revenue",
        "Churn watch",
    ]
    assert len(calendar.json()["events"]) == 3


async def test_writes_a_report_with_reports_write(
    auth: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    access_token, client_id = await _token(auth)

    created = await api.post(
        "/v2/reports", headers=bearer(access_token), json={"title": "Nightly", "body": "ok"}
    )
    invalid = await api.post("/v2/reports", headers=bearer(access_token), json={"body": "no title"})

    assert created.status_code == 201
    assert created.json()["created_by"] == client_id
    assert invalid.status_code == 400
    titles = [
        r["title"]
        for r in (await api.get("/v2/reports", headers=bearer(access_token))).json()["reports"]
    ]
    assert titles[-1] == "Nightly"


async def test_401_on_an_expired_token(
    auth: httpx.AsyncClient, api: httpx.AsyncClient, clock: FakeClock
) -> None:
    access_token, _ = await _token(auth)
    clock.advance(299)
    assert (await api.get("/v2/me", headers=bearer(access_token))).status_code == 200

    clock.advance(1)
    response = await api.get("/v2/me", headers=bearer(access_token))

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')


@pytest.mark.parametrize("authorization", [None, "Basic YTpi", "Bearer", "Bearer unknown-token"])
async def test_401_without_a_usable_token(
    api: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = await api.get("/v2/me", headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_refresh_token_is_not_an_access_token(
    auth: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    client = await register(auth, "client_secret_basic")
    token = await connect(auth, client)

    response = await api.get("/v2/me", headers=bearer(token["refresh_token"]))

    assert response.status_code == 401


async def test_403_on_a_missing_scope(auth: httpx.AsyncClient, api: httpx.AsyncClient) -> None:
    access_token, _ = await _token(auth, scope="reports:read")

    write = await api.post("/v2/reports", headers=bearer(access_token), json={"title": "x"})
    calendar = await api.get("/v2/calendar", headers=bearer(access_token))

    assert write.status_code == 403
    assert write.json()["error"] == "insufficient_scope"
    assert 'error="insufficient_scope", scope="reports:write"' in write.headers["www-authenticate"]
    assert calendar.status_code == 403


async def test_records_every_call_without_the_token(
    sandbox: Sandbox, auth: httpx.AsyncClient, api: httpx.AsyncClient, clock: FakeClock
) -> None:
    access_token, client_id = await _token(auth, scope="reports:read")

    await api.get("/v2/reports", headers=bearer(access_token))
    await api.get("/v2/calendar", headers=bearer(access_token))
    await api.get("/v2/nope", headers=bearer(access_token))
    await api.get("/v2/me")

    calls = sandbox.api_calls()
    assert [(c.method, c.path, c.status) for c in calls] == [
        ("GET", "/v2/reports", 200),
        ("GET", "/v2/calendar", 403),
        ("GET", "/v2/nope", 404),
        ("GET", "/v2/me", 401),
    ]
    digest = hashlib.sha256(access_token.encode()).hexdigest()
    assert all(
        (c.sub, c.client_id, c.token_sha256) == ("alice", client_id, digest) for c in calls[:3]
    )
    assert (calls[3].sub, calls[3].token_sha256) == (None, None)
    assert calls[0].at == clock()
    published = await api.get("/_sandbox/calls")
    assert published.json()["calls"] == [call.as_dict() for call in calls]
    assert access_token not in published.text
    assert access_token not in json.dumps([c.as_dict() for c in calls])


async def test_slow_sleeps_then_answers(auth: httpx.AsyncClient, api: httpx.AsyncClient) -> None:
    access_token, _ = await _token(auth)

    response = await api.get("/v2/slow", params={"ms": "120"}, headers=bearer(access_token))
    bad = await api.get("/v2/slow", params={"ms": "soon"}, headers=bearer(access_token))

    assert response.status_code == 200
    assert response.json()["slept_ms"] == 120
    assert bad.status_code == 400


async def test_slow_logs_a_caller_that_hangs_up(sandbox: Sandbox, auth: httpx.AsyncClient) -> None:
    access_token, _ = await _token(auth)
    sent: list[dict[str, object]] = []
    disconnect = asyncio.Event()

    async def receive() -> dict[str, object]:
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v2/slow",
        "raw_path": b"/v2/slow",
        "query_string": b"ms=5000",
        "headers": [
            (b"host", b"127.0.0.1:9002"),
            (b"authorization", f"Bearer {access_token}".encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 9002),
    }
    call = asyncio.create_task(sandbox.api_app(scope, receive, send))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    disconnect.set()
    await asyncio.wait_for(call, timeout=2)

    [logged] = sandbox.api_calls()
    assert (logged.path, logged.status) == ("/v2/slow", 499)
    assert logged.duration_ms < 2000
