"""The audit trail on real PostgreSQL, the real AS + API and a real worker process.

- every call the API received is in the trail with the right user, agent client_id, method,
  path and status, and nothing else is — with today's runtime recorder and with the batched
  `AuditWriter` wiring proposed for it;
- no token or secret the AS issued appears anywhere in the trail;
- a worker killed while its request is in flight leaves the call in the trail;
- `verify`'s PostgreSQL fast path agrees with the Python serialisation for any detail, and
  names tampered events;
- the service role `behalf_app` cannot UPDATE, DELETE or TRUNCATE audit rows, and the
  append-only trigger stops the owner too unless pruning says so.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import signal
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from delegation import audit, checkpoints
from delegation.audit_verify import verify
from delegation.clock import FrozenClock
from delegation.kms import LocalKeyFile
from delegation.runs import queue_run
from delegation.vault import DataKeyCache, Vault
from models import AuditEvent, AuditHead, JobRun
from models.session import make_engine, make_session_factory
from tests.support.audit import call_record, event_id, tamper, write_trail
from tests.support.databases import BROKER_TEST_URL
from tests.support.real_world import connect_user, make_world, register_agent
from worker.http import CallRecord, path_template
from worker.jobs import JobSpec
from worker.runner import Runner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def keys(tmp_path):
    return LocalKeyFile(tmp_path / "key", warn=False)


@pytest.fixture
def vault(keys):
    return Vault(keys, DataKeyCache(max_entries=100, max_age=300, monotonic=time.monotonic))


class BatchedRunner(Runner):
    """The runner wired to `AuditWriter` as docs/audit.md proposes for `worker/runner.py`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit = audit.AuditWriter(self._sessions, self._clock)

    def _record_call(self, claimed: Any, agent_name: str, client_id: str,
                     call: CallRecord) -> None:
        action = {"attempted": "api:call:attempted", "completed": "api:call",
                  "failed": "api:call:failed", "refused": "api:call:refused"}[call.outcome]
        detail: dict[str, Any] = {"method": call.method, "path": call.path,
                                  "call_id": str(call.call_id)}
        if call.status is not None:
            detail["status"] = call.status
        record = audit.AuditRecord(
            action=action, actor_type="agent", actor=agent_name, user_id=claimed.user_id,
            user_subject=claimed.user_subject, agent_name=agent_name, client_id=client_id,
            delegation_id=claimed.delegation_id, run_id=claimed.run_id,
            request_id=str(call.call_id), detail=detail)
        if call.outcome == "attempted":
            self.audit.write_now(record)  # durable before the request leaves
        else:
            self.audit.write_later(record)

    def _execute(self, claimed: Any) -> str:
        try:
            return super()._execute(claimed)
        finally:
            self.audit.flush()


def token_forms(value: str) -> list[str]:
    raw = value.encode()
    return [value, base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
            raw.hex()]


def trail_text(engine) -> str:
    """Every audit row and checkpoint, every column, as text."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT row_to_json(e)::text FROM audit_events e")).scalars()
        cps = conn.execute(text("SELECT row_to_json(c)::text FROM audit_checkpoints c"))
        heads = conn.execute(text("SELECT row_to_json(h)::text FROM audit_heads h"))
        return "\n".join([*rows, *cps.scalars(), *heads.scalars()])


@pytest.mark.parametrize("wiring", ["runtime", "batched"])
def test_every_call_the_api_received_is_in_the_trail_and_nothing_else(
    pg_sessions, pg_engine, vault, keys, redis_url, oidc_provider, leak_scan, wiring
):
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    users = {}
    issued: list[str] = []
    for subject in ("alice", "bob"):
        user_id, d_id, exchange = connect_user(world, oidc_provider, credentials, endpoints,
                                               subject)
        users[subject] = (user_id, d_id)
        issued += [exchange.tokens.access_token, exchange.tokens.refresh_token or "",
                   exchange.id_token or ""]

    def job(ctx):
        ctx.http.get("/v2/reports").raise_for_status()
        ctx.http.get("/v2/calendar").raise_for_status()
        assert ctx.http.post("/v2/reports", json={"title": "secret body"}).status_code == 403
        assert ctx.http.get("/v2/reports/1234567/notes").status_code == 404
        ctx.http.get("/v2/me", params={"access_token": "in-a-query"}).raise_for_status()

    world.jobs.add(JobSpec("nightly", "reporter", frozenset({"reports:read"}), job))
    runner = world.runner() if wiring == "runtime" else BatchedRunner(
        sessions=world.sessions, tokens=world.token_source(), agents=world.runner()._agents,
        jobs=world.jobs, clock=world.clock, config=world.runner()._config,
        transport=world.transport)
    oidc_provider.reset_api_calls()
    for subject, (user_id, _) in users.items():
        if subject == "bob":  # bob's first call is refused (401): a refresh, then a resend
            oidc_provider.set_api_fault(status=401, count=1, path="/v2/reports")
        with world.sessions.begin() as s:
            run_id = queue_run(s, job="nightly", user_id=user_id, agent_id=world.agent_id,
                               now=world.clock.now()).id
        assert runner.run(run_id) == "succeeded", subject

    received = oidc_provider.api_calls()
    assert len(received) == 11  # 5 calls each, and bob's 401 before the refresh
    with world.sessions() as s:
        events = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    calls = [e for e in events if e.action == "api:call"]
    # the trail, call by call, is what the API saw: user, client, method, path, status
    assert Counter((e.user_subject, e.client_id, e.detail["method"], e.detail["path"],
                    e.detail["status"]) for e in calls) == Counter(
        (c["sub"], c["client_id"], c["method"], path_template(c["path"]), c["status"])
        for c in received)
    assert [c["status"] for c in received if c["sub"] == "alice"] == [200, 200, 403, 404, 200]
    assert [c["status"] for c in received if c["sub"] == "bob"] == [401, 200, 200, 403, 404,
                                                                   200]
    # every attempt completed, nothing else touched the API, and the chains verify
    attempted = Counter(e.request_id for e in events if e.action == "api:call:attempted")
    assert attempted == Counter(e.request_id for e in calls)
    assert not [e for e in events if e.action in ("api:call:failed", "api:call:refused")]
    assert all(e.agent_name == "reporter" and e.actor_type == "agent" for e in calls)
    report = verify(pg_engine, keys)
    assert report.ok, report.problems

    # no token, secret or body the AS issued or the job sent is anywhere in the trail
    for _user_id, d_id in users.values():
        _state, tokens = world.token_source()._store.load(d_id)
        issued += [tokens.access_token, tokens.refresh_token or ""]
    secrets = [v for v in issued if v] + [
        credentials.private_jwk["d"], credentials.registration_access_token or "",
        "secret body", "in-a-query"]
    leak_scan.register(*[v for v in issued if v])
    dump = trail_text(pg_engine)
    assert "api:call" in dump
    for secret in filter(None, secrets):
        for form in token_forms(secret):
            assert form not in dump, "a secret appears in the audit trail"


def test_a_worker_killed_with_its_request_in_flight_leaves_the_call_in_the_trail(
    pg_sessions, pg_engine, pg_database, vault, keys, redis_url, oidc_provider, processes,
    tmp_path
):
    key_file = tmp_path / "key"  # the worker opens the same local key file as `vault`
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    user_id, _, _ = connect_user(world, oidc_provider, credentials, endpoints, "alice")
    broker = BROKER_TEST_URL
    import redis as redis_lib

    redis_lib.Redis.from_url(broker).flushdb()
    oidc_provider.reset()
    # The API takes the request and sits on it: the worker dies with the call in flight.
    oidc_provider.set_api_fault(mode="hang", seconds=20, then="process", path="/v2/reports")
    processes.base_env = {
        "BEHALF_DATABASE_URL": pg_database, "BEHALF_REDIS_URL": redis_url,
        "BEHALF_BROKER_URL": broker, "BEHALF_LOCAL_KEY_FILE": str(key_file),
        "BEHALF_JOBS_MODULES": "tests.support.sample_jobs", "BEHALF_LOG_LEVEL": "WARNING",
    }
    worker = processes.start("worker", "--concurrency", "1")
    with world.sessions.begin() as s:
        run_id = queue_run(s, job="slow", user_id=user_id, agent_id=world.agent_id,
                           now=world.clock.now()).id
    from worker.celery_app import create_celery, publish_run

    publish_run(create_celery(broker), {"run_id": str(run_id)})
    deadline = time.monotonic() + 60
    while not oidc_provider.api_calls() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert oidc_provider.api_calls(), processes.logs()[-3000:]
    os.killpg(worker.pid, signal.SIGKILL)  # right after the request reached the API
    worker.wait(timeout=10)
    oidc_provider.reset_faults()

    [call] = oidc_provider.api_calls()
    with world.sessions() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.run_id == run_id)
                           .order_by(AuditEvent.seq)).all()
        status = s.get(JobRun, run_id).status
    assert status == "running"  # the worker died mid-run: the lease will expire
    attempted = [e for e in events if e.action == "api:call:attempted"]
    assert [(e.user_subject, e.client_id, e.detail["method"], e.detail["path"])
            for e in attempted] == [("alice", credentials.client_id, call["method"],
                                     call["path"])]
    assert not [e for e in events if e.action == "api:call"]  # it never completed
    assert verify(pg_engine, keys).ok


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(detail=st.dictionaries(st.text(max_size=8), JSON, max_size=5),
       subject=st.text(max_size=10), micros=st.integers(0, 10**6 - 1))
def test_postgres_builds_the_same_preimage_as_python_for_any_event(
    pg_sessions, pg_engine, keys, detail, subject, micros
):
    when = dt.datetime(2026, 5, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=micros)
    user = uuid.uuid4()
    with pg_sessions.begin() as s:
        audit.append(s, audit.AuditRecord(action="test:any", user_id=user,
                                          user_subject=subject, actor=subject, detail=detail),
                     when)
    with pg_engine.connect() as conn:
        stored, rendered = conn.execute(
            text("SELECT detail, detail::text FROM audit_events WHERE chain = :c"),
            {"c": str(user)}).one()
    assert audit.render_json(audit.clean_detail(detail)) == rendered
    assert stored == json.loads(rendered)
    report = verify(pg_engine, None)
    assert report.ok, report.problems


def test_verify_on_postgres_names_edited_deleted_reordered_and_inserted_events(
    pg_sessions, pg_engine, keys
):
    clock = FrozenClock()
    users = [uuid.UUID(int=0xA), uuid.UUID(int=0xB)]
    write_trail(pg_sessions, clock, users, 6)
    with pg_sessions.begin() as s:  # a detail COPY must escape, to exercise the unescaping
        audit.append(s, call_record(users[0], 99, detail={"q": 'a\\b\t"c"\n', "é": "\x07"}),
                     clock.now())
    checkpoints.create_checkpoint(pg_sessions, keys, clock)
    assert verify(pg_engine, keys).ok
    alice = str(users[0])

    def first_problem():
        report = verify(pg_engine, keys)
        assert not report.ok
        return report.first

    # edited
    tamper(pg_engine, "UPDATE audit_events SET detail = jsonb_set(detail, '{status}', '500') "
                      "WHERE chain = :c AND seq = 3", c=alice)
    problem = first_problem()
    assert (problem.kind, problem.chain, problem.seq, problem.event_id) == (
        "altered", alice, 3, event_id(pg_engine, alice, 3))
    tamper(pg_engine, "UPDATE audit_events SET detail = jsonb_set(detail, '{status}', '200') "
                      "WHERE chain = :c AND seq = 3", c=alice)
    assert verify(pg_engine, keys).ok  # put back: it verifies again

    # reordered: seq 4 and 5 swap places
    tamper(pg_engine, "UPDATE audit_events SET seq = CASE seq WHEN 4 THEN -5 ELSE -4 END "
                      "WHERE chain = :c AND seq IN (4, 5)", c=alice)
    tamper(pg_engine, "UPDATE audit_events SET seq = -seq WHERE chain = :c AND seq < 0",
           c=alice)
    problem = first_problem()
    assert (problem.chain, problem.seq) == (alice, 4) and problem.kind in ("altered",
                                                                           "unlinked")

    # deleted (on a fresh chain: bob's)
    bob = str(users[1])
    four = event_id(pg_engine, bob, 4)
    tamper(pg_engine, "DELETE FROM audit_events WHERE chain = :c AND seq = 3", c=bob)
    report = verify(pg_engine, keys)
    assert any(p.kind == "deleted" and p.chain == bob and p.seq == 3
               and f"before event id {four}" in str(p) for p in report.problems)

    # inserted: a forged event after bob's head
    tamper(pg_engine, "INSERT INTO audit_events (chain, seq, occurred_at, action, actor_type, "
                      "detail, prev_hash, hash) SELECT chain, 7, now(), 'api:call', 'agent', "
                      "'{}', hash, repeat('0', 64) FROM audit_heads WHERE chain = :c", c=bob)
    report = verify(pg_engine, keys)
    assert any(p.kind == "inserted" and p.chain == bob and p.seq == 7 for p in report.problems)


def test_the_service_role_cannot_change_or_delete_the_trail(pg_sessions, pg_engine,
                                                            pg_database, keys):
    clock = FrozenClock()
    user = uuid.uuid4()
    write_trail(pg_sessions, clock, [user], 2)
    # Connections of the services, as the role the migration made for them
    service = make_engine(pg_database, connect_args={"options": "-c role=behalf_app"})
    service_sessions = make_session_factory(service)

    def as_service(sql: str, **params: Any) -> None:
        with service.begin() as conn:
            conn.execute(text(sql), params)

    # The service role appends, reads, makes checkpoints and verifies...
    with service_sessions.begin() as s:
        assert s.scalar(text("SELECT current_user")) == "behalf_app"
        audit.append(s, call_record(user, 3), clock.now())
        audit.append(s, call_record(uuid.uuid4(), 1), clock.now())  # a new chain's head too
        assert len(s.scalars(select(AuditEvent)).all()) == 4
    info = checkpoints.create_checkpoint(service_sessions, keys, clock)
    assert info is not None and verify(service, keys).ok
    # ...but cannot change or remove a single audit row, nor prune.
    with pytest.raises(checkpoints.PruneRefused, match="owns the tables"):
        checkpoints.prune(service_sessions, keys, clock, before=clock.now(), operator="olga")
    for sql in ("UPDATE audit_events SET actor = 'mallory'",
                "DELETE FROM audit_events",
                "TRUNCATE audit_events",
                f"UPDATE audit_checkpoints SET digest = 'x' WHERE id = {info.id}",
                "DELETE FROM audit_checkpoints",
                "DELETE FROM audit_heads",
                "SET behalf.audit_prune = 'on'; DELETE FROM audit_events"):
        with pytest.raises(ProgrammingError, match="permission denied"):
            as_service(sql)
    service.dispose()

    # The owner is stopped by the trigger, unless pruning says so (and never for UPDATE).
    for sql in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events",
                "DELETE FROM audit_checkpoints"):
        with pytest.raises(DBAPIError, match="append-only"), pg_engine.begin() as conn:
            conn.execute(text(sql))
    with pytest.raises(DBAPIError, match="append-only"), pg_engine.begin() as conn:
        conn.execute(text("SET LOCAL behalf.audit_prune = 'on'"))
        conn.execute(text("UPDATE audit_events SET actor = 'mallory'"))
    with pg_engine.begin() as conn:
        conn.execute(text("SET LOCAL behalf.audit_prune = 'on'"))
        conn.execute(text("DELETE FROM audit_events WHERE seq = 1 AND chain = :c"),
                     {"c": str(user)})
    with pg_sessions() as s:
        assert s.get(AuditHead, str(user)).seq == 3


def test_pruning_on_postgres_goes_through_the_trigger_and_keeps_the_trail_verifiable(
    pg_sessions, pg_engine, keys
):
    clock = FrozenClock()
    users = [uuid.uuid4() for _ in range(3)]
    write_trail(pg_sessions, clock, users, 4)
    first = checkpoints.create_checkpoint(pg_sessions, keys, clock)
    clock.advance(86400)
    write_trail(pg_sessions, clock, users, 2)
    checkpoints.create_checkpoint(pg_sessions, keys, clock)
    result = checkpoints.prune(pg_sessions, keys, clock, before=first.created_at,
                               operator="olga",
                               verify=lambda: verify(pg_engine, keys).problems)
    assert result.events_deleted == 12 and result.chains == 3
    report = verify(pg_engine, keys)
    assert report.ok, report.problems
    assert report.events == 3 * 2 + 1  # what was left, and the pruning itself
    dataclasses.asdict(result.base)  # a plain record for the CLI
