"""The scheduler's tick and the schedule operations, on SQLite with a frozen clock.

What depends on PostgreSQL (SKIP LOCKED, concurrent schedulers, a killed process) is in
tests/integration/test_scheduler.py; here is every policy: DST, catch-up, overlap, spread,
pause/resume, backfill, delegation states and lease recovery.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from delegation.clock import FrozenClock
from models import AuditEvent, Delegation, JobRun, OutboxMessage, Schedule
from scheduler import cron, schedules
from scheduler.recovery import recover_expired
from scheduler.schedules import BackfillRefused, ScheduleError, ScheduleNotFound, ScheduleSpec
from scheduler.tick import SlotMemo, offset_of, plan, tick
from tests.support.scheduling import (
    add_schedules,
    count,
    dispatched_run_ids,
    fleet,
    runs_by_slot,
)

UTC = dt.UTC


def at(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def finish_all(sessions, status: str = "succeeded") -> None:
    """What the workers would do: every queued or running run ends."""
    with sessions.begin() as s:
        s.execute(update(JobRun).where(JobRun.status.in_(["queued", "running"]))
                  .values(status=status))


def schedule_row(sessions, schedule_id) -> Schedule:
    with sessions() as s:
        row = s.get(Schedule, schedule_id)
        assert row is not None
        return row


def drive(sessions, clock: FrozenClock, until: dt.datetime, step: float = 600, *,
          finish: bool = True) -> None:
    """Tick every `step` seconds up to `until`, the workers finishing everything at once."""
    while clock.now() < until:
        clock.advance(step)
        while tick(sessions, clock, batch=100).claimed == 100:
            pass
        if finish:
            finish_all(sessions)


# --- the basic contract ------------------------------------------------------------------


def test_a_due_slot_becomes_one_queued_run_and_one_outbox_entry(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 1, 0))
    f = fleet(sqlite_sessions, 3, now=clock.now())
    add_schedules(f, cron="0 2 * * *", now=clock.now())

    assert tick(sqlite_sessions, clock).claimed == 0  # nothing due yet
    clock.advance(3600)
    first = tick(sqlite_sessions, clock)
    again = tick(sqlite_sessions, clock)

    assert (first.claimed, first.queued, again.claimed) == (3, 3, 0)
    records = runs_by_slot(sqlite_sessions)
    assert set(records.values()) == {"queued"} and len(records) == 3
    assert {slot for _, slot in records} == {at(2026, 5, 1, 2, 0)}
    assert sorted(dispatched_run_ids(sqlite_sessions)) == sorted(map(str, first.run_ids))
    with sqlite_sessions() as s:
        run = s.scalars(select(JobRun)).first()
        assert run.delegation_id == f.delegations[run.user_id]
    row = schedule_row(sqlite_sessions, f.schedules[0])
    assert row.last_slot_at == at(2026, 5, 1, 2, 0)
    assert row.next_slot_at == row.next_run_at == at(2026, 5, 2, 2, 0)


@pytest.mark.parametrize(
    ("tz", "days", "expected_local"),
    [
        # spring forward: 02:30 does not exist; it runs once, at the end of the gap (03:00)
        ("America/New_York", [(2026, 3, 7), (2026, 3, 8), (2026, 3, 9)], ["02:30", "03:00",
                                                                          "02:30"]),
        ("Europe/Paris", [(2026, 3, 28), (2026, 3, 29), (2026, 3, 30)], ["02:30", "03:00",
                                                                        "02:30"]),
        # fall back: 01:30 happens twice; it runs once, at the first occurrence
        ("America/New_York", [(2026, 10, 31), (2026, 11, 1), (2026, 11, 2)], ["01:30", "01:30",
                                                                             "01:30"]),
        ("Europe/Paris", [(2026, 10, 24), (2026, 10, 25), (2026, 10, 26)], ["02:30", "02:30",
                                                                           "02:30"]),
    ],
)
def test_a_daily_job_runs_exactly_once_on_dst_days(sqlite_sessions, tz, days, expected_local):
    zone = ZoneInfo(tz)
    wall = "30 1 * * *" if expected_local[0] == "01:30" else "30 2 * * *"
    start = dt.datetime(*days[0], 0, 0, tzinfo=zone).astimezone(UTC)
    clock = FrozenClock(start)
    f = fleet(sqlite_sessions, 2, now=clock.now())
    add_schedules(f, cron=wall, tz=tz, now=clock.now())

    end = dt.datetime(*days[-1], 23, 59, tzinfo=zone).astimezone(UTC)
    drive(sqlite_sessions, clock, end, step=300)

    records = runs_by_slot(sqlite_sessions)
    assert set(records.values()) == {"succeeded"}
    per_schedule = Counter(schedule_id for schedule_id, _ in records)
    assert set(per_schedule.values()) == {3}  # one run a day, three days, two schedules
    slots = sorted({slot for _, slot in records})
    assert [s.astimezone(zone).strftime("%H:%M") for s in slots] == expected_local
    assert [s.astimezone(zone).date() for s in slots] == [dt.date(*d) for d in days]
    if days[1] == (2026, 11, 1):  # the first 01:30, in daylight time (UTC-4)
        assert slots[1] == at(2026, 11, 1, 5, 30)


def test_the_run_is_recorded_with_its_delegation_state(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    active = fleet(sqlite_sessions, 1, now=clock.now(), subject_prefix="a")
    broken = fleet(sqlite_sessions, 1, now=clock.now(), delegation_status="broken",
                   agent_name="b", subject_prefix="b")
    revoked = fleet(sqlite_sessions, 1, now=clock.now(), delegation_status="revoked",
                    agent_name="c", subject_prefix="c")
    never = fleet(sqlite_sessions, 1, now=clock.now(), delegation_status=None,
                  agent_name="d", subject_prefix="d")
    for f in (active, broken, revoked, never):
        add_schedules(f, cron="0 * * * *", now=clock.now())

    clock.advance(3600)
    result = tick(sqlite_sessions, clock)

    assert result.outcomes == {"queued": 1, "parked": 1, "cancelled": 1, "failed": 1}
    with sqlite_sessions() as s:
        reasons = dict(s.execute(select(JobRun.status, JobRun.reason)).tuples().all())
    assert reasons == {"queued": None, "parked": "delegation_broken",
                       "cancelled": "delegation_revoked", "failed": "no_delegation"}
    # only the queued run reaches the broker: a broken delegation is not hammered
    assert dispatched_run_ids(sqlite_sessions) == [str(result.run_ids[0])]


# --- catch-up and overlap ----------------------------------------------------------------


def test_after_an_hour_down_the_latest_slot_runs_and_older_ones_are_missed(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 12, 0))
    f = fleet(sqlite_sessions, 2, now=clock.now())
    add_schedules(f, cron="*/10 * * * *", now=clock.now(), catch_up=dt.timedelta(minutes=15))

    clock.advance(65 * 60)  # down from 12:00 to 13:05: slots 12:10 ... 13:00 are due
    result = tick(sqlite_sessions, clock)

    assert result.outcomes == {"missed": 10, "queued": 2}
    records = runs_by_slot(sqlite_sessions)
    for schedule_id in f.schedules:
        mine = {slot: status for (sid, slot), status in records.items() if sid == schedule_id}
        expected = [at(2026, 5, 1, 12, 10) + dt.timedelta(minutes=10 * i) for i in range(6)]
        assert sorted(mine) == expected  # no gap, no duplicate
        assert [mine[s] for s in expected] == ["missed"] * 5 + ["queued"]
    assert schedule_row(sqlite_sessions, f.schedules[0]).next_slot_at == at(2026, 5, 1, 13, 10)


def test_a_latest_slot_outside_the_catch_up_window_is_missed_too(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 30))
    f = fleet(sqlite_sessions, 1, now=clock.now())
    add_schedules(f, cron="0 * * * *", now=clock.now(), catch_up=dt.timedelta(minutes=20))

    clock.advance(3 * 3600)  # 03:30: the 03:00 slot is 30 min old, past the 20 min window
    assert tick(sqlite_sessions, clock).outcomes == {"missed": 3}
    clock.advance(30 * 60 + 5)  # 04:00:05, back on time
    assert tick(sqlite_sessions, clock).outcomes == {"queued": 1}


def test_a_long_outage_is_recorded_in_bounded_batches(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    f = fleet(sqlite_sessions, 1, now=clock.now())
    add_schedules(f, cron="* * * * *", now=clock.now())
    clock.advance(2 * 86400)  # two days of a minutely schedule: 2,880 slots

    outcomes: Counter[str] = Counter()
    for _ in range(5):
        outcomes.update(tick(sqlite_sessions, clock, max_missed=1000).outcomes)
    assert outcomes == {"missed": 2879, "queued": 1}
    assert len(runs_by_slot(sqlite_sessions)) == 2880


def test_overlap_skip_records_the_slot_skipped_while_the_previous_run_is_going(
        sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    f = fleet(sqlite_sessions, 2, now=clock.now())
    skip, allow = (add_schedules(f, cron="0 * * * *", now=clock.now(), users=[u],
                                 overlap=policy)[0]
                   for u, policy in zip(f.users, ["skip", "allow"], strict=True))
    clock.advance(3600)
    tick(sqlite_sessions, clock)
    with sqlite_sessions.begin() as s:  # the 01:00 runs are still running at 02:00
        s.execute(update(JobRun).values(status="running"))

    clock.advance(3600)
    tick(sqlite_sessions, clock)
    records = runs_by_slot(sqlite_sessions)
    assert records[(skip, at(2026, 5, 1, 2))] == "skipped"
    assert records[(allow, at(2026, 5, 1, 2))] == "queued"

    # a skipped or missed record is not "the previous run": the 01:00 run still is
    clock.advance(3600)
    tick(sqlite_sessions, clock)
    assert runs_by_slot(sqlite_sessions)[(skip, at(2026, 5, 1, 3))] == "skipped"
    finish_all(sqlite_sessions)
    clock.advance(3600)
    tick(sqlite_sessions, clock)
    assert runs_by_slot(sqlite_sessions)[(skip, at(2026, 5, 1, 4))] == "queued"


# --- spread --------------------------------------------------------------------------------


def test_ten_thousand_schedules_due_together_are_spread_over_the_window(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    f = fleet(sqlite_sessions, 10_000, now=clock.now())
    window = dt.timedelta(hours=2)
    add_schedules(f, cron="0 2 * * *", now=clock.now(), spread=window)
    slot = at(2026, 5, 1, 2, 0)

    with sqlite_sessions() as s:
        offsets = [row.next_run_at - slot for row in s.scalars(select(Schedule))]
    assert all(dt.timedelta(0) <= o < window for o in offsets)
    tenths = Counter(int(o / (window / 10)) for o in offsets)
    assert set(tenths) == set(range(10))
    assert max(tenths.values()) <= 0.2 * len(offsets)

    # and the scheduler follows it: 12 minutes in, about a tenth has been queued
    clock.advance(2 * 3600 + 12 * 60)
    claimed = 0
    while (n := tick(sqlite_sessions, clock, batch=1000).claimed):
        claimed += n
    assert claimed == tenths[0]
    assert count(sqlite_sessions, JobRun) == tenths[0]


def test_the_spread_offset_is_stable_per_schedule():
    schedule_id = uuid.UUID("0b7e5a4e-7d76-4d6c-9d43-8a8a0e6c9a51")
    window = dt.timedelta(hours=2)
    assert offset_of(schedule_id, 7200) == cron.spread_offset(schedule_id, window)
    assert offset_of(schedule_id, 0) == dt.timedelta(0)


@settings(max_examples=300, deadline=None)
@given(
    cron_expr=st.sampled_from(["0 2 * * *", "*/15 * * * *", "30 1 * * 0", "0 */6 * * *"]),
    tz=st.sampled_from(["UTC", "America/New_York", "Europe/Paris"]),
    start=st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2026, 12, 31)),
    late=st.integers(min_value=0, max_value=3 * 86400),
    window=st.integers(min_value=60, max_value=86400),
    spread=st.integers(min_value=0, max_value=7200),
)
def test_the_fast_path_decides_as_catch_up_does(cron_expr, tz, start, late, window, spread):
    schedule_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{cron_expr}{start}")
    first = cron.next_slot(cron_expr, tz, start.replace(tzinfo=UTC))
    offset = offset_of(schedule_id, spread)
    now = first + offset + dt.timedelta(seconds=late)
    got = plan(expression=cron_expr, tz=tz, offset=offset, catch_up_seconds=window,
               next_slot_at=first, now=now, memo=SlotMemo(), max_missed=10_000)
    reference = cron.catch_up(cron_expr, tz, first - dt.timedelta(microseconds=1),
                              now - offset, dt.timedelta(seconds=window), max_missed=10_000)
    assert (got.missed, got.run) == (reference.missed, reference.run)
    assert got.next_slot_at == cron.next_slot(cron_expr, tz, reference.watermark)
    assert got.next_slot_at + offset > now


# --- pause, resume, backfill ---------------------------------------------------------------


def spec_for(f, **kwargs) -> ScheduleSpec:
    return ScheduleSpec(user_id=f.users[0], agent_id=f.agent_id, job="nightly",
                        cron=kwargs.pop("cron", "0 * * * *"), **kwargs)


def test_create_validates_and_audits(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 30))
    f = fleet(sqlite_sessions, 1, now=clock.now())
    with sqlite_sessions.begin() as s:
        row = schedules.create(s, spec_for(f, tz="Europe/Paris", spread=dt.timedelta(hours=1)),
                               now=clock.now(), operator="alice-ops")
        assert row.next_slot_at == at(2026, 5, 1, 1, 0)
        assert row.next_run_at == row.next_slot_at + offset_of(row.id, 3600)
    with sqlite_sessions() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "schedule:created")
                          ).one()
        assert (event.actor_type, event.actor) == ("operator", "alice-ops")
        assert event.detail["schedule_id"] == str(row.id)

    bad = [
        ({"cron": "61 * * * *"}, "bad minute field"),
        ({"tz": "Mars/Olympus"}, "unknown time zone"),
        ({"catch_up": dt.timedelta(seconds=10)}, "catch-up window must be at least 1m"),
        ({"spread": dt.timedelta(days=8)}, "spread must be between 0s and 7d"),
        ({"overlap": "queue"}, "overlap policy must be one of skip, allow"),
        ({}, "an identical schedule already exists"),
    ]
    for kwargs, message in bad:
        with sqlite_sessions.begin() as s, pytest.raises(ScheduleError, match=message):
            schedules.create(s, spec_for(f, **{"tz": "Europe/Paris", **kwargs}),
                             now=clock.now(), operator="x")
    assert count(sqlite_sessions, Schedule) == 1


def test_pause_and_resume_run_nothing_for_the_paused_time(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    f = fleet(sqlite_sessions, 1, now=clock.now())
    with sqlite_sessions.begin() as s:
        schedule_id = schedules.create(s, spec_for(f), now=clock.now(), operator="ops").id
    drive(sqlite_sessions, clock, at(2026, 5, 1, 2, 5))  # 01:00 and 02:00 run

    with sqlite_sessions.begin() as s:
        assert schedules.pause(s, schedule_id, now=clock.now(), operator="ops") is True
        assert schedules.pause(s, schedule_id, now=clock.now(), operator="ops") is False
    drive(sqlite_sessions, clock, at(2026, 5, 1, 6, 30))  # paused through 03:00 ... 06:00
    with sqlite_sessions.begin() as s:
        assert schedules.resume(s, schedule_id, now=clock.now(), operator="ops") is True
        assert schedules.resume(s, schedule_id, now=clock.now(), operator="ops") is False
    drive(sqlite_sessions, clock, at(2026, 5, 1, 8, 5))

    slots = sorted(slot for _, slot in runs_by_slot(sqlite_sessions))
    assert slots == [at(2026, 5, 1, h) for h in (1, 2, 7, 8)]
    with sqlite_sessions() as s:
        actions = s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert actions == ["schedule:created", "schedule:paused", "schedule:resumed"]
    with sqlite_sessions.begin() as s, pytest.raises(ScheduleNotFound):
        schedules.pause(s, uuid.uuid4(), now=clock.now(), operator="ops")


def test_backfill_runs_each_missed_slot_once_and_is_idempotent(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    f = fleet(sqlite_sessions, 1, now=clock.now())
    with sqlite_sessions.begin() as s:
        schedule_id = schedules.create(s, spec_for(f), now=clock.now(), operator="ops").id
    drive(sqlite_sessions, clock, at(2026, 5, 1, 1, 5))  # 01:00 ran
    clock.advance(4 * 3600)  # down until 05:05: 02:00-04:00 missed, 05:00 runs
    tick(sqlite_sessions, clock)
    finish_all(sqlite_sessions)

    def backfill():
        with sqlite_sessions.begin() as s:
            return schedules.backfill(s, schedule_id, at(2026, 4, 30, 22, 0),
                                      at(2026, 5, 1, 5, 0), now=clock.now(), operator="ops")

    first = backfill()
    second = backfill()

    # 22:00, 23:00 and 00:00 predate the schedule (no row): created; 02:00-04:00 were missed
    assert (first.slots, first.created, first.converted, first.already) == (7, 3, 3, 1)
    assert (second.queued, second.already) == (0, 7)
    records = runs_by_slot(sqlite_sessions)
    assert len(records) == 8
    assert Counter(records.values()) == {"queued": 6, "succeeded": 2}
    assert len(dispatched_run_ids(sqlite_sessions)) == len(set(dispatched_run_ids(
        sqlite_sessions))) == 2 + 6


def test_backfill_refuses_what_it_cannot_do_and_changes_nothing(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 12, 0))
    f = fleet(sqlite_sessions, 1, now=clock.now())
    with sqlite_sessions.begin() as s:
        schedule_id = schedules.create(s, spec_for(f), now=clock.now(), operator="ops").id

    def backfill(start, end):
        with sqlite_sessions.begin() as s:
            schedules.backfill(s, schedule_id, start, end, now=clock.now(), operator="ops")

    with pytest.raises(ScheduleError, match="must not be in the future"):
        backfill(at(2026, 5, 1, 0), at(2026, 5, 1, 13))
    with pytest.raises(ScheduleError, match="before --to"):
        backfill(at(2026, 5, 1, 5), at(2026, 5, 1, 5))
    with pytest.raises(ScheduleError, match="more than 10000 slots"):
        backfill(at(2025, 1, 1), at(2026, 5, 1))
    with sqlite_sessions.begin() as s:
        s.execute(update(Delegation).values(status="broken"))
    with pytest.raises(BackfillRefused, match="delegation is broken"):
        backfill(at(2026, 5, 1, 0), at(2026, 5, 1, 5))
    assert count(sqlite_sessions, JobRun) == 0
    assert count(sqlite_sessions, OutboxMessage) == 0


def test_a_backfilled_slot_is_not_run_again_by_the_tick(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    f = fleet(sqlite_sessions, 1, now=clock.now())
    with sqlite_sessions.begin() as s:
        schedule_id = schedules.create(s, spec_for(f), now=clock.now(), operator="ops").id
    clock.advance(3 * 3600 + 60)  # the scheduler is down; an operator backfills first
    with sqlite_sessions.begin() as s:
        schedules.backfill(s, schedule_id, at(2026, 5, 1, 0), at(2026, 5, 1, 3),
                           now=clock.now(), operator="ops")
    finish_all(sqlite_sessions)  # (else overlap "skip" would skip 03:00 behind them)
    result = tick(sqlite_sessions, clock)
    assert result.outcomes == {"queued": 1}  # 03:00; 00:00 to 02:00 exist already
    assert len(runs_by_slot(sqlite_sessions)) == 4
    assert len(dispatched_run_ids(sqlite_sessions)) == 4


def test_a_schedule_that_can_no_longer_be_computed_is_paused(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    f = fleet(sqlite_sessions, 2, now=clock.now())
    bad, good = add_schedules(f, cron="0 * * * *", now=clock.now())
    with sqlite_sessions.begin() as s:
        s.execute(update(Schedule).where(Schedule.id == bad).values(timezone="Nowhere/Land"))
    clock.advance(3600)
    assert tick(sqlite_sessions, clock).outcomes == {"queued": 1}
    assert schedule_row(sqlite_sessions, bad).paused
    assert not schedule_row(sqlite_sessions, good).paused


# --- lease recovery ------------------------------------------------------------------------


def test_runs_whose_worker_vanished_are_requeued_or_failed(sqlite_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    f = fleet(sqlite_sessions, 3, now=clock.now())
    add_schedules(f, cron="0 * * * *", now=clock.now())
    clock.advance(3600)
    ids = tick(sqlite_sessions, clock).run_ids
    lease = clock.now() + dt.timedelta(seconds=60)
    with sqlite_sessions.begin() as s:
        s.execute(update(JobRun).values(status="running", attempts=1, lease_owner="dead",
                                        lease_expires_at=lease))
        s.execute(update(JobRun).where(JobRun.id == ids[0]).values(attempts=3))
        s.execute(update(JobRun).where(JobRun.id == ids[1]).values(
            lease_expires_at=lease + dt.timedelta(hours=1)))  # still alive
    before = len(dispatched_run_ids(sqlite_sessions))

    assert recover_expired(sqlite_sessions, clock).requeued == 0  # leases still valid
    clock.advance(61)
    recovered = recover_expired(sqlite_sessions, clock)

    assert (recovered.requeued, recovered.failed) == (1, 1)
    with sqlite_sessions() as s:
        rows = {r.id: r for r in s.scalars(select(JobRun))}
    assert (rows[ids[0]].status, rows[ids[0]].reason) == ("failed", "attempts_exhausted")
    assert rows[ids[1]].status == "running"
    assert (rows[ids[2]].status, rows[ids[2]].lease_owner) == ("queued", None)
    assert dispatched_run_ids(sqlite_sessions)[before:] == [str(ids[2])]
    assert recover_expired(sqlite_sessions, clock).requeued == 0
