"""`AuditWriter`: the attempted record is durable before a request leaves; completions are
batched (SQLite; the same writer runs on PostgreSQL in the integration tests and the bench)."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import select

from delegation import audit
from models import AuditEvent
from tests.support.audit import call_record
from worker.cancel import CancelToken
from worker.http import CallRecord, build_client


def actions(sessions, chain):
    with sessions() as s:
        return s.scalars(select(AuditEvent.action).where(AuditEvent.chain == chain)
                         .order_by(AuditEvent.seq)).all()


def wait_for(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def writer(sqlite_sessions, clock):
    w = audit.AuditWriter(sqlite_sessions, clock, max_delay=0.05)
    yield w
    w.close()


def test_write_now_commits_the_buffer_then_the_record_in_one_go(writer, sqlite_sessions):
    user = uuid.uuid4()
    writer.write_later(call_record(user, 0, action="api:call"))
    writer.write_later(call_record(user, 1, action="api:call:failed"))
    writer.write_now(call_record(user, 2, action="api:call:attempted"))
    assert writer.pending == 0
    assert actions(sqlite_sessions, str(user)) == ["api:call", "api:call:failed",
                                                   "api:call:attempted"]


def test_buffered_records_are_written_within_max_delay_without_another_call(
    writer, sqlite_sessions
):
    user = uuid.uuid4()
    writer.write_later(call_record(user, 0))
    assert wait_for(lambda: actions(sqlite_sessions, str(user)) == ["api:call"])
    writer.write_later(call_record(user, 1))
    writer.flush()
    assert actions(sqlite_sessions, str(user)) == ["api:call", "api:call"]


def test_a_failed_write_keeps_the_records_in_order_for_the_next_one(sqlite_sessions, clock):
    broken = {"on": True}

    class Flaky:
        def begin(self):
            if broken["on"]:
                raise RuntimeError("database unreachable")
            return sqlite_sessions.begin()

    writer = audit.AuditWriter(Flaky(), clock, max_delay=60)  # type: ignore[arg-type]
    user = uuid.uuid4()
    writer.write_later(call_record(user, 0, action="api:call"))
    with pytest.raises(RuntimeError):
        writer.write_now(call_record(user, 1, action="api:call:attempted"))
    assert writer.pending == 1  # the completion is kept; the attempt was refused to its caller
    broken["on"] = False
    writer.write_now(call_record(user, 2, action="api:call:attempted"))
    assert actions(sqlite_sessions, str(user)) == ["api:call", "api:call:attempted"]
    writer.write_later(call_record(user, 3))
    writer.close()
    assert actions(sqlite_sessions, str(user))[-1] == "api:call"


def runtime_recorder(writer, user):
    """What `Runner._record_call` does with the writer (see docs/audit.md)."""
    def record(call: CallRecord) -> None:
        action = {"attempted": "api:call:attempted", "completed": "api:call",
                  "failed": "api:call:failed", "refused": "api:call:refused"}[call.outcome]
        detail = {"method": call.method, "path": call.path, "call_id": str(call.call_id)}
        if call.status is not None:
            detail["status"] = call.status
        entry = audit.AuditRecord(action=action, actor="reporter", user_id=user,
                                  user_subject="alice", agent_name="reporter",
                                  client_id="client-1", request_id=str(call.call_id),
                                  detail=detail)
        if call.outcome == "attempted":
            writer.write_now(entry)
        else:
            writer.write_later(entry)
    return record


def test_through_ctx_http_a_call_is_in_the_trail_before_it_reaches_the_api(
    sqlite_sessions, clock
):
    # Given a writer with a long delay (only write_now and flush write anything)
    writer = audit.AuditWriter(sqlite_sessions, clock, max_delay=60)
    user = uuid.uuid4()
    seen_at_arrival = []

    def api(request: httpx.Request) -> httpx.Response:
        # the moment the request reaches the API, another connection already sees it
        seen_at_arrival.append(actions(sqlite_sessions, str(user)))
        if request.url.path == "/v2/boom":
            raise httpx.ConnectError("connection reset")
        return httpx.Response(200 if request.url.path != "/v2/missing" else 404, json={})

    tokens = SimpleNamespace(current=lambda _d: SimpleNamespace(value="tok", version=1))
    http = build_client(tokens=tokens, delegation_id=uuid.uuid4(),  # type: ignore[arg-type]
                        api_base="https://api.test", cancel=CancelToken(),
                        record=runtime_recorder(writer, user),
                        transport=httpx.MockTransport(api))
    # When a job makes three calls, one of which fails in transport
    http.get("/v2/reports/42")
    http.get("/v2/missing")
    with pytest.raises(httpx.ConnectError):
        http.get("/v2/boom")
    writer.flush()

    # Then each call was recorded as attempted before it arrived, and completed after
    assert seen_at_arrival == [
        ["api:call:attempted"],
        ["api:call:attempted", "api:call", "api:call:attempted"],
        ["api:call:attempted", "api:call", "api:call:attempted", "api:call",
         "api:call:attempted"],
    ]
    assert actions(sqlite_sessions, str(user))[-1] == "api:call:failed"
    with sqlite_sessions() as s:
        done = s.scalars(select(AuditEvent).where(AuditEvent.action == "api:call")
                         .order_by(AuditEvent.seq)).all()
    assert [(e.detail["path"], e.detail["status"]) for e in done] == [
        ("/v2/reports/{id}", 200), ("/v2/missing", 404)]
    writer.close()
