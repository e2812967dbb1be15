"""A queued run whose wake-up was lost gets a new one; a fresh or retrying run does not."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from delegation.clock import FrozenClock
from delegation.runs import queue_run
from models import JobRun, OutboxMessage
from scheduler.recovery import redispatch_stale
from tests.support.scheduling import fleet


def test_only_runs_due_and_untouched_for_a_while_are_dispatched_again(sqlite_sessions):
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    f = fleet(sqlite_sessions, 3, now=start)
    with sqlite_sessions.begin() as s:
        stale, fresh, retrying = (queue_run(s, job="nightly", user_id=u, agent_id=f.agent_id,
                                            now=start).id for u in f.users)
        s.get(JobRun, fresh).updated_at = start + dt.timedelta(seconds=250)
        s.get(JobRun, retrying).not_before = start + dt.timedelta(seconds=250)
    clock = FrozenClock(start + dt.timedelta(seconds=400))

    assert redispatch_stale(sqlite_sessions, clock, older_than=300) == 1
    assert redispatch_stale(sqlite_sessions, clock, older_than=300) == 0  # once per period
    with sqlite_sessions() as s:
        payloads = [m.payload["run_id"] for m in s.scalars(select(OutboxMessage))]
    assert payloads.count(str(stale)) == 2 and payloads.count(str(fresh)) == 1
