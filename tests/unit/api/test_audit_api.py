"""`GET /api/audit`: a user reads their own trail, and only theirs (SQLite, router mounted on a
small app with the sign-in dependency overridden)."""

from __future__ import annotations

import datetime as dt
import uuid
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from api import audit as audit_api
from delegation import audit
from tests.support.audit import call_record
from tests.unit.api.conftest import SyncASGITransport

ALICE = audit_api.Viewer(uuid.UUID(int=0xA11CE), "alice")
BOB = audit_api.Viewer(uuid.UUID(int=0xB0B), "bob")
START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


@pytest.fixture
def app(sqlite_sessions):
    for n in range(7):
        viewer = ALICE if n != 3 else BOB
        agent = "reporter" if n < 5 else "planner"
        with sqlite_sessions.begin() as s:
            audit.append(s, call_record(viewer.user_id, n, user_subject=viewer.subject,
                                        agent_name=agent, client_id=f"client-{agent}"),
                         START + dt.timedelta(hours=n))
    app = FastAPI()
    app.state.sessions = sqlite_sessions
    app.include_router(audit_api.router)
    return app


def client(app, viewer=None):
    if viewer is not None:
        app.dependency_overrides[audit_api.signed_in_user] = lambda: viewer
    transport = SyncASGITransport(app)
    return httpx.Client(transport=transport, base_url="http://testserver"), transport


def get(app, viewer, **params):
    http, transport = client(app, viewer)
    try:
        return http.get("/api/audit", params=params)
    finally:
        http.close()
        transport.close()


def test_a_user_reads_their_own_trail_newest_first(app):
    page = get(app, ALICE).json()
    assert page["user"] == "alice"
    assert [e["detail"]["n"] for e in page["events"]] == [6, 5, 4, 2, 1, 0]
    event = page["events"][-1]
    assert (event["agent"], event["client_id"], event["action"]) == ("reporter",
                                                                     "client-reporter",
                                                                     "api:call")
    assert event["summary"] == "method=GET, path=/v2/reports/{id}, status=200"
    assert event["prev_hash"] == audit.GENESIS and page["next_cursor"] is None


def test_a_user_cannot_read_another_users_trail(app):
    bob = get(app, BOB).json()
    assert [e["detail"]["n"] for e in bob["events"]] == [3]
    # nothing names a user; an unknown parameter or another chain's cursor changes nothing
    sneaky = get(app, BOB, user="alice", user_id=str(ALICE.user_id), chain=str(ALICE.user_id),
                 cursor="100").json()
    assert [e["detail"]["n"] for e in sneaky["events"]] == [3]
    assert all(e["detail"]["n"] != 3 for e in get(app, ALICE, limit=200).json()["events"])


def test_pages_follow_the_cursor_to_the_end(app):
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = get(app, ALICE, **params).json()
        seen += [e["detail"]["n"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [6, 5, 4, 2, 1, 0]


def test_filters_by_agent_and_time(app):
    planner = get(app, ALICE, agent="planner").json()
    assert [e["detail"]["n"] for e in planner["events"]] == [6, 5]
    by_client = get(app, ALICE, agent="client-reporter").json()
    assert [e["detail"]["n"] for e in by_client["events"]] == [4, 2, 1, 0]
    window = get(app, ALICE, since="2026-03-01T01:00:00Z", until="2026-03-01T05:00:00").json()
    assert [e["detail"]["n"] for e in window["events"]] == [4, 2, 1]


def test_bad_parameters_are_refused(app):
    assert get(app, ALICE, cursor="abc").status_code == 400
    assert get(app, ALICE, cursor="-1").status_code == 400
    assert get(app, ALICE, limit=0).status_code == 422
    assert get(app, ALICE, limit=1000).status_code == 422
    assert get(app, ALICE, since="not a date").status_code == 422


def test_without_a_signed_in_user_the_answer_is_401(app):
    assert get(app, None).status_code == 401
    # the default dependency asks the app's services for the browser session's user
    user = SimpleNamespace(id=ALICE.user_id, subject="alice")
    app.state.services = SimpleNamespace(signed_in=lambda _request: (None, user))
    assert [e["detail"]["n"] for e in get(app, None, limit=1).json()["events"]] == [6]
    app.state.services = SimpleNamespace(signed_in=lambda _request: None)
    assert get(app, None).status_code == 401
