"""`/api/ops` mounted on a bare FastAPI app (the real app includes the same router)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import anyio.from_thread
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update

from api.ops import router
from delegation.clock import FrozenClock
from delegation.runs import queue_run
from models import AuditEvent, Delegation, JobRun
from tests.support.scheduling import fleet

TOKEN = "ops-token-for-tests-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class PortalTransport(httpx.BaseTransport):
    """A sync client for an ASGI app (app errors propagate: a 500 fails the test)."""

    def __init__(self, app: FastAPI, portal: anyio.from_thread.BlockingPortal) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            request.stream = httpx.ByteStream(request.read())
            response = await self._inner.handle_async_request(request)
            return httpx.Response(response.status_code, headers=response.headers,
                                  content=await response.aread(), request=request)

        return self._portal.call(call)


@pytest.fixture
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal() as started:
        yield started


@pytest.fixture
def app_with(portal):
    clients: list[httpx.Client] = []

    def build(sessions, ops_token: str) -> httpx.Client:
        app = FastAPI()
        app.state.sessions = sessions
        app.state.clock = FrozenClock(dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
        app.state.ops_token = ops_token
        app.include_router(router)
        client = httpx.Client(transport=PortalTransport(app, portal),
                              base_url="http://testserver")
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def parked(sqlite_sessions):
    """Two users of one agent: alice's delegation is broken with two parked runs."""
    now = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    f = fleet(sqlite_sessions, 2, now=now)
    with sqlite_sessions.begin() as s:
        ids = [queue_run(s, job="nightly", user_id=f.users[i], agent_id=f.agent_id,
                         now=now).id for i in (0, 0, 1)]
        s.execute(update(JobRun).where(JobRun.id.in_(ids[:2]))
                  .values(status="parked", reason="delegation_broken"))
        s.execute(update(Delegation).where(Delegation.id == f.delegations[f.users[0]])
                  .values(status="broken", status_reason="invalid_grant"))
    return f, ids


ENDPOINTS = [("get", "/api/ops/runs", None), ("get", "/api/ops/delegations", None),
             ("post", "/api/ops/requeue", {"agent": "reporter", "operator": "x"})]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_without_an_ops_token_configured_the_ops_api_does_not_exist(sqlite_sessions, app_with,
                                                                    method, path, body):
    client = app_with(sqlite_sessions, "")
    response = client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 404


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"}, {"Cookie": f"session={TOKEN}"},
])
def test_anything_but_the_ops_token_is_refused(sqlite_sessions, app_with, parked, method, path,
                                               body, headers):
    client = app_with(sqlite_sessions, TOKEN)
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    with sqlite_sessions() as s:
        assert s.scalars(select(JobRun.status).where(JobRun.status == "queued")).all() == [
            "queued"]  # nothing was re-queued


def test_parked_runs_and_broken_delegations_are_listed(sqlite_sessions, app_with, parked):
    _, ids = parked
    client = app_with(sqlite_sessions, TOKEN)
    runs = client.get("/api/ops/runs", params={"status": "parked"}, headers=AUTH).json()["runs"]
    assert sorted(r["run_id"] for r in runs) == sorted(map(str, ids[:2]))
    assert {(r["user"], r["agent"], r["reason"]) for r in runs} == {
        ("user-0", "reporter", "delegation_broken")}
    broken = client.get("/api/ops/delegations", params={"status": "broken"},
                        headers=AUTH).json()["delegations"]
    assert [(d["user"], d["status_reason"], d["parked_runs"]) for d in broken] == [
        ("user-0", "invalid_grant", 2)]
    assert "token" not in str(broken).replace("status", "")
    assert client.get("/api/ops/runs", params={"status": "nope"},
                      headers=AUTH).status_code == 422


def test_requeue_is_exactly_once_and_audited_with_the_operator(sqlite_sessions, app_with,
                                                               parked):
    _, ids = parked
    client = app_with(sqlite_sessions, TOKEN)
    first = client.post("/api/ops/requeue", json={"run_id": str(ids[0]), "operator": "erin"},
                        headers=AUTH)
    second = client.post("/api/ops/requeue", json={"run_id": str(ids[0]), "operator": "fay"},
                         headers=AUTH)
    assert first.json() == {"matched": 1, "requeued": 1, "already_handled": 0}
    assert second.json() == {"matched": 0, "requeued": 0, "already_handled": 0}
    by_agent = client.post("/api/ops/requeue", json={"agent": "reporter", "operator": "gus"},
                           headers=AUTH)
    assert by_agent.json()["requeued"] == 1
    with sqlite_sessions() as s:
        events = s.execute(select(AuditEvent.actor, AuditEvent.run_id, AuditEvent.detail)
                           .where(AuditEvent.action == "run:requeued")).all()
    assert sorted((actor, run_id) for actor, run_id, _ in events) == sorted(
        [("erin", ids[0]), ("gus", ids[1])])
    assert {detail["via"] for _, _, detail in events} == {"api"}


@pytest.mark.parametrize(("body", "status"), [
    ({"operator": "x"}, 422),
    ({"run_id": str(uuid.uuid4()), "agent": "reporter", "operator": "x"}, 422),
    ({"agent": "reporter"}, 422),
    ({"agent": "reporter", "operator": ""}, 422),
    ({"agent": "nobody", "operator": "x"}, 404),
    ({"delegation_id": str(uuid.uuid4()), "operator": "x"}, 404),
    ({"run_id": str(uuid.uuid4()), "operator": "x"}, 404),
])
def test_bad_requeue_requests_change_nothing(sqlite_sessions, app_with, parked, body, status):
    client = app_with(sqlite_sessions, TOKEN)
    assert client.post("/api/ops/requeue", json=body, headers=AUTH).status_code == status
    with sqlite_sessions() as s:
        assert len(s.scalars(select(JobRun.id).where(JobRun.status == "parked")).all()) == 2
