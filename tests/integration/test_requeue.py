"""Re-queuing parked runs on a real PostgreSQL (and Redis for the runtime): exactly once under
concurrent operators, in bulk, and against a delegation that is still broken."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import Counter

import pytest
import redis
from sqlalchemy import func, select, update

from delegation.clock import FrozenClock
from delegation.kms import LocalKeyFile
from delegation.requeue import Actor, requeue, requeue_after_repair
from delegation.runs import queue_run
from delegation.vault import Vault, delegation_context
from models import AuditEvent, Delegation, JobRun
from scheduler import schedules
from scheduler.schedules import ScheduleSpec
from scheduler.tick import tick
from tests.support.fake_as import API_BASE, FakeAuthServer
from tests.support.scheduling import add_schedules, dispatched_run_ids, fleet
from tests.support.world import World
from worker.jobs import JobSpec

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


def together(*calls):
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i, call):
        try:
            barrier.wait()
            results[i] = call()
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


def parked_fleet(sessions, clock, users: int):
    f = fleet(sessions, users, now=clock.now())
    add_schedules(f, cron="0 * * * *", now=clock.now())
    clock.advance(3600)
    while tick(sessions, clock, batch=2000).claimed:
        pass
    with sessions.begin() as s:
        s.execute(update(JobRun).values(status="parked", reason="delegation_broken"))
    return f


def test_two_operators_requeuing_at_the_same_moment_requeue_each_run_once(pg_sessions):
    clock = FrozenClock(NOW)
    f = parked_fleet(pg_sessions, clock, 10_020)
    with pg_sessions() as s:
        singles = s.scalars(select(JobRun.id).order_by(JobRun.id).limit(20)).all()

    # Given two operators clicking "re-queue" on the same run at the same moment, twenty times
    for run_id in singles:
        a, b = together(
            lambda r=run_id: requeue(pg_sessions, clock, Actor("ann", "cli"), run_id=r),
            lambda r=run_id: requeue(pg_sessions, clock, Actor("bob", "api"), run_id=r))
        assert a.requeued + b.requeued == 1

    # And both bulk re-queuing the agent's other 10,000 parked runs at once, with progress
    progress: dict[str, list[int]] = {"ann": [], "bob": []}
    bulk = together(
        lambda: requeue(pg_sessions, clock, Actor("ann", "cli"), agent_id=f.agent_id,
                        batch=250, progress=progress["ann"].append),
        lambda: requeue(pg_sessions, clock, Actor("bob", "api"), agent_id=f.agent_id,
                        batch=250, progress=progress["bob"].append))

    # Then every run was re-queued exactly once: one audit record, one more outbox entry
    assert sum(r.requeued for r in bulk) == 10_000
    assert max(r.matched for r in bulk) == 10_000  # (the later snapshot may miss a batch)
    assert [sum(progress[name]) for name in ("ann", "bob")] == [r.matched for r in bulk]
    with pg_sessions() as s:
        assert s.scalar(select(func.count()).where(JobRun.status == "parked")) == 0
        per_run = Counter(s.scalars(select(AuditEvent.run_id)
                                    .where(AuditEvent.action == "run:requeued")))
        actors = set(s.scalars(select(AuditEvent.actor)
                               .where(AuditEvent.action == "run:requeued")))
    assert len(per_run) == 10_020 and set(per_run.values()) == {1}
    assert actors == {"ann", "bob"}
    assert set(Counter(dispatched_run_ids(pg_sessions)).values()) == {2}  # tick + re-queue


# --- a delegation that is still broken ----------------------------------------------------


@pytest.fixture
def world(pg_sessions, redis_url, tmp_path):
    fake_as = FakeAuthServer(ttl=300)
    clock = FrozenClock(NOW)
    client = redis.Redis.from_url(redis_url)
    w = World(sessions=pg_sessions, vault=Vault(LocalKeyFile(tmp_path / "k", warn=False)),
              clock=clock, redis=client, transport=fake_as.transport())
    w.setup_agent(fake_as.metadata(), API_BASE)
    w.jobs.add(JobSpec(name="nightly", agent="reporter", scopes=frozenset({"reports:read"}),
                       function=lambda ctx: ctx.http.get("/v2/reports").raise_for_status()))
    yield w, fake_as
    client.close()


def statuses(sessions, ids) -> list[tuple[str, str | None]]:
    with sessions() as s:
        rows = {r.id: (r.status, r.reason) for r in s.scalars(select(JobRun))}
    return [rows[i] for i in ids]


def test_requeuing_runs_of_a_still_broken_delegation_parks_them_after_at_most_one_probe(
        world):
    w, fake_as = world
    access, refresh = fake_as.grant("alice", w.client_id)
    user_id, delegation_id = w.add_delegation("alice", w.token_set(access, refresh, 300))
    with w.sessions.begin() as s:
        ids = [queue_run(s, job="nightly", user_id=user_id, agent_id=w.agent_id,
                         now=w.clock.now()).id for _ in range(4)]
    # Given the user's grant dies at the AS: the first run meets invalid_grant and breaks the
    # delegation, which parks every other queued run without a request
    fake_as.kill("alice")
    runner = w.runner()
    assert runner.run(ids[0]) == "parked"
    assert {runner.run(i) for i in ids[1:]} == {None}  # parked meanwhile: nothing to claim
    assert fake_as.token_requests == 1
    calls_before = len(fake_as.api_calls)

    # When an operator re-queues them all while the delegation is still broken
    result = requeue(w.sessions, w.clock, Actor("ops", "cli"), delegation_id=delegation_id)
    assert result.requeued == 4
    outcomes = [runner.run(i) for i in ids]

    # Then each parks again at the worker's first check, without a request to the AS or API
    assert outcomes == ["parked"] * 4
    assert statuses(w.sessions, ids) == [("parked", "delegation_broken")] * 4
    assert fake_as.token_requests == 1 and len(fake_as.api_calls) == calls_before


def test_requeuing_runs_of_a_dead_but_active_delegation_probes_the_as_once(world):
    w, fake_as = world
    access, refresh = fake_as.grant("bob", w.client_id)
    user_id, delegation_id = w.add_delegation("bob", w.token_set(access, refresh, 300))
    with w.sessions.begin() as s:
        ids = [queue_run(s, job="nightly", user_id=user_id, agent_id=w.agent_id,
                         now=w.clock.now()).id for _ in range(5)]
        s.execute(update(JobRun).values(status="parked", reason="missing_scope"))
    # Given the grant died at the AS while the delegation still looks active
    fake_as.kill("bob")

    requeue(w.sessions, w.clock, Actor("ops", "cli"), delegation_id=delegation_id)
    runner = w.runner()
    outcomes = [runner.run(i) for i in ids]

    # Then one run probes (one 401, one refresh: invalid_grant), the delegation breaks and
    # every run ends parked; the AS saw a single refresh request
    assert outcomes[0] == "parked" and set(outcomes[1:]) == {None}
    assert statuses(w.sessions, ids) == [("parked", "delegation_broken")] * 5
    assert fake_as.token_requests == 1 and len(fake_as.api_calls) == 1
    with w.sessions() as s:
        assert s.get(Delegation, delegation_id).status == "broken"


def test_after_a_repair_the_latest_slot_runs_and_older_ones_are_superseded(world):
    w, fake_as = world
    access, refresh = fake_as.grant("cid", w.client_id)
    user_id, delegation_id = w.add_delegation("cid", w.token_set(access, refresh, 300))
    with w.sessions.begin() as s:
        schedules.create(s, ScheduleSpec(user_id=user_id, agent_id=w.agent_id, job="nightly",
                                         cron="0 * * * *", overlap="allow"),
                         now=w.clock.now(), operator="ops")
        s.execute(update(Delegation).values(status="broken", status_reason="invalid_grant"))
    for _ in range(3):  # three nights while broken: parked by the scheduler, never sent
        w.clock.advance(3600)
        tick(w.sessions, w.clock)
    assert len(dispatched_run_ids(w.sessions)) == 0

    # When the user re-authorises (new tokens, active again) and the re-auth flow calls
    # requeue_after_repair in its transaction
    access, refresh = fake_as.grant("cid", w.client_id)
    tokens = w.token_set(access, refresh, 300)
    with w.sessions.begin() as s:
        row = s.get(Delegation, delegation_id)
        sealed = w.vault.seal(tokens.to_bytes(), delegation_context(user_id, delegation_id,
                                                                    w.agent_id))
        row.token_blob, row.wrapped_key, row.key_id = sealed.blob, sealed.wrapped_key, \
            sealed.key_id
        row.status, row.version = "active", row.version + 1
        result = requeue_after_repair(s, delegation_id, w.clock.now())

    # Then only the latest night runs; the two older ones are recorded missed (superseded)
    assert (result.requeued, result.superseded) == (1, 2)
    [run_id] = [uuid.UUID(i) for i in dispatched_run_ids(w.sessions)]
    assert w.runner().run(run_id) == "succeeded"
    with w.sessions() as s:
        rows = sorted((r.slot_at, r.status, r.reason) for r in s.scalars(select(JobRun)))
    assert [(status, reason) for _, status, reason in rows] == [
        ("missed", "superseded"), ("missed", "superseded"), ("succeeded", None)]


def test_a_repair_racing_a_scheduler_batch_leaves_no_run_parked(pg_sessions):
    clock = FrozenClock(NOW)
    f = fleet(pg_sessions, 1, now=clock.now(), delegation_status="broken")
    add_schedules(f, cron="0 * * * *", now=clock.now())
    delegation_id = f.delegations[f.users[0]]
    clock.advance(3600)

    # Given a re-auth transaction that has made the delegation active but not committed yet
    ticking = threading.Thread(target=tick, args=(pg_sessions, clock))
    with pg_sessions() as repair:
        repair.begin()
        repair.execute(update(Delegation).where(Delegation.id == delegation_id)
                       .values(status="active"))
        # When a scheduler batch for that delegation's schedule starts meanwhile
        ticking.start()
        ticking.join(0.5)
        waited = ticking.is_alive()  # it waits for the repair instead of reading "broken"
        requeue_after_repair(repair, delegation_id, clock.now())
        repair.commit()
    ticking.join(10)
    assert waited

    # Then the slot's run is queued, not left parked behind the repair's back
    with pg_sessions() as s:
        assert s.scalars(select(JobRun.status)).all() == ["queued"]
