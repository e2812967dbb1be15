"""The event model, its canonical form and the writers (SQLite)."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from sqlalchemy import select

from delegation import audit
from models import AuditEvent, AuditHead
from tests.support.audit import call_record


def events(sessions, chain=None):
    with sessions() as s:
        query = select(AuditEvent).order_by(AuditEvent.id)
        if chain is not None:
            query = query.where(AuditEvent.chain == chain)
        return s.scalars(query).all()


def test_each_user_has_a_chain_and_every_event_links_to_the_one_before(sqlite_sessions, clock):
    alice, bob = uuid.uuid4(), uuid.uuid4()
    for n, user in enumerate([alice, bob, alice, None, alice]):
        with sqlite_sessions.begin() as s:
            audit.append(s, call_record(user, n), clock.now())

    mine = events(sqlite_sessions, str(alice))
    assert [e.seq for e in mine] == [1, 2, 3]
    assert mine[0].prev_hash == audit.GENESIS
    assert [e.prev_hash for e in mine[1:]] == [e.hash for e in mine[:-1]]
    assert [e.seq for e in events(sqlite_sessions, str(bob))] == [1]
    [system] = events(sqlite_sessions, audit.SYSTEM_CHAIN)
    assert system.user_id is None
    for event in events(sqlite_sessions):
        assert audit.event_hash(event) == event.hash
    with sqlite_sessions() as s:
        head = s.get(AuditHead, str(alice))
        assert (head.seq, head.hash) == (3, mine[-1].hash)


def test_the_event_names_user_agent_client_and_actor(sqlite_sessions, clock):
    user = uuid.uuid4()
    with sqlite_sessions.begin() as s:
        audit.append(s, audit.AuditRecord(
            action="delegation:revoked", actor_type="operator", actor="olga", user_id=user,
            user_subject="alice", agent_name="reporter", client_id="client-1",
            delegation_id=uuid.uuid4()), clock.now())
    [event] = events(sqlite_sessions)
    shown = audit.as_dict(event)
    assert (shown["user"], shown["agent"], shown["client_id"]) == ("alice", "reporter",
                                                                   "client-1")
    assert (shown["actor_type"], shown["actor"], shown["action"]) == ("operator", "olga",
                                                                      "delegation:revoked")
    assert shown["occurred_at"] == clock.now().isoformat()


def test_append_many_writes_in_order_with_one_head_update_per_chain(sqlite_sessions, clock):
    alice, bob = uuid.uuid4(), uuid.uuid4()
    with sqlite_sessions.begin() as s:
        audit.append(s, call_record(alice, 0), clock.now())
    batch = [(call_record(u, n), clock.now()) for n, u in enumerate([alice, bob, alice, bob])]
    with sqlite_sessions.begin() as s:
        assert audit.append_many(s, batch) == 4
        audit.append(s, call_record(alice, 9), clock.now())  # and mixes with append
    assert [e.seq for e in events(sqlite_sessions, str(alice))] == [1, 2, 3, 4]
    assert [e.detail["n"] for e in events(sqlite_sessions, str(alice))] == [0, 0, 2, 9]
    assert [e.seq for e in events(sqlite_sessions, str(bob))] == [1, 2]
    for event in events(sqlite_sessions):
        assert audit.event_hash(event) == event.hash
    with sqlite_sessions() as s:
        assert s.get(AuditHead, str(alice)).seq == 4
        assert s.get(AuditHead, str(bob)).seq == 2
    with sqlite_sessions.begin() as s:
        assert audit.append_many(s, []) == 0


def test_secrets_query_strings_and_control_characters_never_reach_the_trail(
    sqlite_sessions, clock
):
    detail = {
        "access_token": "at-123", "refresh_token": "rt-456", "client_secret": "s3cret",
        "code": "auth-code", "Authorization": "Bearer x", "body": {"a": 1},
        "query": "a=b", "code_verifier": "v", "status_code": 200, "tokens": ["refresh_token"],
        "path": "/v2/reports?access_token=at-123#frag", "nested": {"password": "p", "ok": 1},
        "note": "nul\x00here",
    }
    with sqlite_sessions.begin() as s:
        audit.append(s, audit.AuditRecord(
            action="api:call", user_id=uuid.uuid4(), user_subject="ali\nce\x1f",
            actor="agent\x01", detail=detail), clock.now())
    [event] = events(sqlite_sessions)
    stored = json.dumps(event.detail)
    for secret in ("at-123", "rt-456", "s3cret", "auth-code", "Bearer x", "a=b", '"p"'):
        assert secret not in stored
    assert event.detail["path"] == "/v2/reports"
    assert event.detail["status_code"] == 200 and event.detail["tokens"] == ["refresh_token"]
    assert event.detail["nested"] == {"password": audit.REDACTED, "ok": 1}
    assert event.detail["note"] == "nulhere"
    assert event.user_subject == "ali\ufffdce\ufffd" and event.actor == "agent\ufffd"
    assert audit.event_hash(event) == event.hash


def test_detail_values_are_reduced_to_what_jsonb_keeps_unchanged():
    cleaned = audit.clean_detail({
        "f": 0.5, "big": 1e20, "tiny": 1e-7, "neg0": -0.0, "nan": float("nan"),
        "when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "id": uuid.UUID(int=1),
        "set": {"b", "a"}, "tuple": (1, 2), "none": None, "yes": True,
    })
    assert cleaned == {
        "f": 0.5, "big": "1e+20", "tiny": "1e-07", "neg0": "-0.0", "nan": "nan",
        "when": "2026-01-01 00:00:00+00:00", "id": str(uuid.UUID(int=1)),
        "set": ["a", "b"], "tuple": [1, 2], "none": None, "yes": True,
    }


def test_json_is_rendered_the_way_postgresql_prints_jsonb():
    # Keys by byte length, then bytewise; ", " and ": "; non-ASCII kept; controls escaped.
    value = {"bb": 1, "a": [True, None, 1.5, "é"], "ab": {"z": "\n\"\\"}, "é": 0, "c": {}}
    assert audit.render_json(value) == (
        '{"a": [true, null, 1.5, "é"], "c": {}, "ab": {"z": "\\n\\"\\\\"}, "bb": 1, "é": 0}'
    )
    with pytest.raises(TypeError):
        audit.render_json({"x": object()})


def test_naive_timestamps_are_refused(sqlite_sessions):
    with pytest.raises(ValueError, match="aware"), sqlite_sessions.begin() as s:
        audit.append(s, call_record(uuid.uuid4()), dt.datetime(2026, 1, 1))


def test_summaries_show_what_people_look_for():
    assert audit.summarize({"method": "GET", "path": "/v2/x", "status": 200, "other": 1}) == \
        "method=GET, path=/v2/x, status=200"
    assert audit.summarize({"scopes_granted": ["a", "b"], "job": ""}) == "scopes_granted=a b"
    assert audit.summarize(None) == ""
