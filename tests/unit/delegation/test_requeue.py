"""Re-queuing parked runs, on SQLite (concurrency on PostgreSQL: tests/integration)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import select, update

from delegation.clock import FrozenClock
from delegation.requeue import (
    Actor,
    RequeueError,
    parked_ids,
    requeue,
    requeue_after_repair,
    requeue_ids,
)
from delegation.runs import queue_run
from models import AuditEvent, JobRun, Schedule
from scheduler.tick import tick
from tests.support.scheduling import add_schedules, dispatched_run_ids, fleet

NOW = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
OPS = Actor(name="carol", via="cli")


def park(sessions, *where, reason="delegation_broken") -> None:
    with sessions.begin() as s:
        s.execute(update(JobRun).where(*where).values(status="parked", reason=reason,
                                                      attempts=2))


def statuses(sessions) -> dict[uuid.UUID, str]:
    with sessions() as s:
        return dict(s.execute(select(JobRun.id, JobRun.status)).tuples().all())


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


def hourly_runs(sessions, clock, users: int, hours: int):
    f = fleet(sessions, users, now=clock.now())
    add_schedules(f, cron="0 * * * *", now=clock.now(), overlap="allow")
    for _ in range(hours):
        clock.advance(3600)
        tick(sessions, clock)
    return f


def test_a_parked_run_is_requeued_once_with_an_outbox_entry_and_an_audit_record(
        sqlite_sessions, clock):
    f = fleet(sqlite_sessions, 1, now=clock.now())
    with sqlite_sessions.begin() as s:
        run_id = queue_run(s, job="nightly", user_id=f.users[0], agent_id=f.agent_id,
                           now=clock.now()).id
    park(sqlite_sessions)

    first = requeue(sqlite_sessions, clock, OPS, run_id=run_id)
    second = requeue(sqlite_sessions, clock, Actor(name="dave", via="api"), run_id=run_id)

    assert (first.matched, first.requeued) == (1, 1)
    assert (second.matched, second.requeued) == (0, 0)
    with sqlite_sessions() as s:
        run = s.get(JobRun, run_id)
        assert (run.status, run.reason, run.attempts) == ("queued", "requeued", 0)
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "run:requeued")).one()
    assert (event.actor_type, event.actor, event.run_id) == ("operator", "carol", run_id)
    assert event.user_subject == "user-0" and event.agent_name == "reporter"
    assert event.detail["previous_reason"] == "delegation_broken"
    assert dispatched_run_ids(sqlite_sessions) == [str(run_id)] * 2  # queue_run + requeue


def test_only_parked_runs_move(sqlite_sessions, clock):
    hourly_runs(sqlite_sessions, clock, 2, 1)
    ids = list(statuses(sqlite_sessions))
    park(sqlite_sessions, JobRun.id == ids[0])
    with sqlite_sessions.begin() as s:
        moved = requeue_ids(s, ids, OPS, clock.now())
    assert moved == [ids[0]]


def test_bulk_requeue_by_agent_reports_progress_batch_by_batch(sqlite_sessions, clock):
    f = hourly_runs(sqlite_sessions, clock, 50, 3)
    park(sqlite_sessions)
    other = fleet(sqlite_sessions, 1, now=clock.now(), agent_name="other", subject_prefix="o")
    with sqlite_sessions.begin() as s:
        queue_run(s, job="x", user_id=other.users[0], agent_id=other.agent_id, now=clock.now())
    park(sqlite_sessions, JobRun.agent_id == other.agent_id)

    steps: list[int] = []
    result = requeue(sqlite_sessions, clock, OPS, agent_id=f.agent_id, batch=40,
                     progress=steps.append)

    assert (result.matched, result.requeued, result.already) == (150, 150, 0)
    assert steps == [40, 40, 40, 30]
    by_agent = statuses(sqlite_sessions)
    assert sorted(by_agent.values()).count("parked") == 1  # the other agent's run


def test_requeue_by_delegation_and_bad_selectors(sqlite_sessions, clock):
    f = hourly_runs(sqlite_sessions, clock, 2, 2)
    park(sqlite_sessions)
    target = f.delegations[f.users[0]]
    result = requeue(sqlite_sessions, clock, OPS, delegation_id=target)
    assert (result.matched, result.requeued) == (2, 2)
    with sqlite_sessions() as s:
        left = s.scalars(select(JobRun.delegation_id).where(JobRun.status == "parked")).all()
    assert set(left) == {f.delegations[f.users[1]]}

    with sqlite_sessions() as s:
        for kwargs, message in [({}, "exactly one"),
                                ({"run_id": uuid.uuid4(), "agent_id": f.agent_id},
                                 "exactly one"),
                                ({"run_id": uuid.uuid4()}, "no run"),
                                ({"delegation_id": uuid.uuid4()}, "no delegation"),
                                ({"agent_id": uuid.uuid4()}, "no agent")]:
            with pytest.raises(RequeueError, match=message):
                parked_ids(s, **kwargs)


def test_after_a_repair_only_the_latest_slot_per_schedule_runs_unless_it_asks_for_all(
        sqlite_sessions, clock):
    f = fleet(sqlite_sessions, 1, now=clock.now())
    latest_only = add_schedules(f, cron="0 * * * *", now=clock.now(), overlap="allow",
                                job="a")[0]
    every = add_schedules(f, cron="30 * * * *", now=clock.now(), overlap="allow", job="b",
                          requeue_all=True)[0]
    for _ in range(3):
        clock.advance(3600)
        tick(sqlite_sessions, clock)
    with sqlite_sessions.begin() as s:
        adhoc = queue_run(s, job="c", user_id=f.users[0], agent_id=f.agent_id,
                          now=clock.now()).id
    park(sqlite_sessions)
    delegation_id = f.delegations[f.users[0]]

    with sqlite_sessions.begin() as s:
        result = requeue_after_repair(s, delegation_id, clock.now())
    with sqlite_sessions.begin() as s:
        again = requeue_after_repair(s, delegation_id, clock.now())

    assert (result.matched, result.requeued, result.superseded) == (7, 5, 2)
    assert again.matched == 0
    with sqlite_sessions() as s:
        rows = s.execute(select(JobRun.schedule_id, JobRun.slot_at, JobRun.status,
                                JobRun.reason, JobRun.id)).all()
        events = s.scalars(select(AuditEvent.action)).all()
    mine = sorted((r.slot_at, r.status, r.reason) for r in rows if r.schedule_id == latest_only)
    assert [(status, reason) for _, status, reason in mine] == [
        ("missed", "superseded"), ("missed", "superseded"), ("queued", "requeued")]
    assert {r.status for r in rows if r.schedule_id == every} == {"queued"}
    assert next(r.status for r in rows if r.id == adhoc) == "queued"
    assert sorted(events) == ["run:requeued"] * 5 + ["run:superseded"] * 2
    with sqlite_sessions() as s:
        assert s.get(Schedule, every).requeue_all
