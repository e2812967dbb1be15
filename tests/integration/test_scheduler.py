"""The scheduler on a real PostgreSQL: concurrent schedulers, a killed scheduler, DST, catch-up,
spread, pause/resume, backfill and overlap, each slot ending as exactly one row.

Schedulers run as threads (each with its own connection) sharing a frozen clock, and as real
`behalf scheduler` processes publishing to a real Redis broker.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from zoneinfo import ZoneInfo

import pytest
import redis
from sqlalchemy import select, text, update

from delegation.clock import FrozenClock
from models import JobRun, OutboxMessage, Schedule
from scheduler import schedules
from scheduler.tick import tick
from tests.support.overrides import override
from tests.support.scheduling import (
    add_schedules,
    count,
    dispatched_run_ids,
    fleet,
    runs_by_slot,
)
from tests.support.services import unavailable
from worker.celery_app import QUEUE

pytestmark = pytest.mark.integration

UTC = dt.UTC


def at(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def until_idle(sessions, clock, batch: int) -> int:
    claimed = 0
    while (n := tick(sessions, clock, batch=batch).claimed):
        claimed += n
    return claimed


def in_parallel(*calls):
    """Run the calls in threads released at the same instant; return their results."""
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
        thread.join(60)
    if errors:
        raise errors[0]
    return results


def test_two_schedulers_over_several_periods_and_an_outage_account_for_each_slot_once(
        pg_sessions):
    # Given 300 five-minutely schedules spread over two minutes and two schedulers
    clock = FrozenClock(at(2026, 5, 1, 12, 0))
    f = fleet(pg_sessions, 300, now=clock.now())
    add_schedules(f, cron="*/5 * * * *", now=clock.now(), spread=dt.timedelta(minutes=2),
                  catch_up=dt.timedelta(minutes=12), overlap="allow")
    per_scheduler = Counter()
    clock.advance(120)  # look two minutes after each slot: every offset has come

    # When both tick in small batches, released together, for six periods
    for _ in range(6):
        clock.advance(300)
        a, b = in_parallel(lambda: until_idle(pg_sessions, clock, 7),
                           lambda: until_idle(pg_sessions, clock, 7))
        assert a + b == 300  # SKIP LOCKED: disjoint batches, nothing claimed twice
        per_scheduler.update({"a": a, "b": b})
    # And then both are down for an hour and come back together
    clock.advance(3600)
    in_parallel(lambda: until_idle(pg_sessions, clock, 7),
                lambda: until_idle(pg_sessions, clock, 7))

    # Then every slot of every schedule has exactly one record, with no gap
    records = runs_by_slot(pg_sessions)
    end = clock.now()
    for schedule_id in f.schedules:
        mine = sorted((slot, status) for (sid, slot), status in records.items()
                      if sid == schedule_id)
        slots = [slot for slot, _ in mine]
        assert slots == [at(2026, 5, 1, 12, 5) + dt.timedelta(minutes=5 * i)
                         for i in range(len(slots))]
        assert slots[-1] > end - dt.timedelta(minutes=8)  # caught up to the present
        statuses = [status for _, status in mine]
        # six on-time periods ran; after the outage, slots older than the window are missed
        # and only the latest runs
        assert statuses[:6] == ["queued"] * 6 and statuses[-1] == "queued"
        assert set(statuses[6:-1]) == {"missed"}
    assert per_scheduler["a"] > 0 and per_scheduler["b"] > 0
    dispatched = dispatched_run_ids(pg_sessions)
    assert len(dispatched) == len(set(dispatched)) == Counter(records.values())["queued"]


def test_ten_thousand_schedules_due_at_once_are_spread_and_claimed_tenth_by_tenth(pg_sessions):
    # Given 10,000 schedules of the same nightly 02:00 (Paris) slot, spread over two hours
    clock = FrozenClock(at(2026, 4, 30, 12, 0))
    f = fleet(pg_sessions, 10_000, now=clock.now())
    add_schedules(f, cron="0 2 * * *", tz="Europe/Paris", now=clock.now(),
                  spread=dt.timedelta(hours=2))
    slot = at(2026, 5, 1, 0, 0)  # 02:00 in Paris (summer time)
    clock.advance((slot - clock.now()).total_seconds())

    # When the scheduler ticks at the end of each tenth of the window
    queued_per_tenth = []
    for _ in range(10):
        clock.advance(12 * 60)
        queued_per_tenth.append(until_idle(pg_sessions, clock, 1000))

    # Then every schedule ran once, and no tenth of the window held more than 20 %
    clock.advance(3600)
    assert until_idle(pg_sessions, clock, 1000) == 0
    assert sum(queued_per_tenth) == 10_000
    assert max(queued_per_tenth) <= 2000, queued_per_tenth
    assert min(queued_per_tenth) > 0


@pytest.mark.parametrize(("tz", "month", "days"), [
    ("America/New_York", 3, (7, 8, 9)), ("America/New_York", 11, (0, 1, 2)),
    ("Europe/Paris", 3, (28, 29, 30)), ("Europe/Paris", 10, (24, 25, 26)),
])
def test_dst_days_run_a_0230_job_exactly_once(pg_sessions, tz, month, days):
    zone = ZoneInfo(tz)
    first = dt.date(2026, month, days[0]) if days[0] else dt.date(2026, month - 1, 31)
    start = dt.datetime.combine(first, dt.time(0, 0), zone).astimezone(UTC)
    clock = FrozenClock(start)
    f = fleet(pg_sessions, 3, now=clock.now())
    add_schedules(f, cron="30 2 * * *", tz=tz, now=clock.now(), overlap="allow")
    for _ in range(3 * 24):
        clock.advance(3600)
        until_idle(pg_sessions, clock, 100)
    slots = Counter(slot for _, slot in runs_by_slot(pg_sessions))
    assert set(slots.values()) == {3}  # each day's slot once for each of the 3 schedules
    local = sorted(s.astimezone(zone) for s in slots)
    assert len(local) == 3 and len({x.date() for x in local}) == 3
    spring = month == 3
    assert [x.strftime("%H:%M") for x in local] == (
        ["02:30", "03:00", "02:30"] if spring else ["02:30", "02:30", "02:30"])


def test_pause_resume_backfill_and_overlap_on_postgresql(pg_sessions):
    clock = FrozenClock(at(2026, 5, 1, 0, 0))
    f = fleet(pg_sessions, 1, now=clock.now())
    with pg_sessions.begin() as s:
        schedule_id = schedules.create(
            s, schedules.ScheduleSpec(user_id=f.users[0], agent_id=f.agent_id, job="nightly",
                                      cron="0 * * * *"),
            now=clock.now(), operator="ops").id

    def hour(h: int) -> None:
        clock.advance(at(2026, 5, 1, h, 0, 5).timestamp() - clock.now().timestamp())
        until_idle(pg_sessions, clock, 10)

    hour(1)  # 01:00 queued; still running at 02:00, so 02:00 is skipped
    with pg_sessions.begin() as s:
        s.execute(update(JobRun).values(status="running"))
    hour(2)
    with pg_sessions.begin() as s:
        s.execute(update(JobRun).where(JobRun.status == "running").values(status="succeeded"))
        schedules.pause(s, schedule_id, now=clock.now(), operator="ops")
    hour(4)  # paused through 03:00 and 04:00
    with pg_sessions.begin() as s:
        schedules.resume(s, schedule_id, now=clock.now(), operator="ops")
    hour(5)
    with pg_sessions.begin() as s:
        s.execute(update(JobRun).where(JobRun.status == "queued").values(status="succeeded"))

    def backfill():
        with pg_sessions.begin() as s:
            return schedules.backfill(s, schedule_id, at(2026, 5, 1, 1), at(2026, 5, 1, 5),
                                      now=clock.now(), operator="ops")

    first, second = backfill(), backfill()
    records = runs_by_slot(pg_sessions)
    assert {slot.hour: status for (_, slot), status in records.items()} == {
        1: "succeeded", 2: "skipped", 3: "queued", 4: "queued", 5: "succeeded"}
    assert (first.created, first.converted, second.queued) == (2, 0, 0)
    assert len(set(dispatched_run_ids(pg_sessions))) == len(dispatched_run_ids(pg_sessions)) == 4


# --- real scheduler processes ------------------------------------------------------------


# The scheduler processes' own Redis database (broker and locks): workers started by other
# tests on the shared test database must not consume the messages counted here.
BROKER_URL = override("SCHEDULER_BROKER_URL", "redis://127.0.0.1:6379/11")


@pytest.fixture
def broker():
    client = redis.Redis.from_url(BROKER_URL, socket_connect_timeout=1)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        client.close()
        unavailable(f"Redis not reachable at {BROKER_URL}: {exc}")
    yield client
    client.flushdb()
    client.close()


ONCE = ("--once", "--no-sweep", "--json")


def scheduler_process(pg_database: str, tmp_path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEHALF_")}
    key_dir = tmp_path / uuid.uuid4().hex  # one dev key file each: none is used by a tick
    env.update({"BEHALF_DATABASE_URL": pg_database, "BEHALF_BROKER_URL": BROKER_URL,
                "BEHALF_REDIS_URL": BROKER_URL,
                "BEHALF_LOCAL_KEY_FILE": os.fspath(key_dir / "key"),
                "BEHALF_LOG_LEVEL": "WARNING"})
    return subprocess.Popen(
        [sys.executable, "-c", "from behalf.cli import entry_point; entry_point()",
         "scheduler", *(args or ("--once", "--no-sweep", "--json"))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def yearly_schedules(pg_sessions, users: int) -> tuple[list, dt.datetime]:
    """Schedules whose one due slot is this year's 1 January (a fixed, past slot whatever
    the real date), with a catch-up window long enough to run it."""
    now = dt.datetime.now(UTC)
    slot = at(now.year, 1, 1)
    f = fleet(pg_sessions, users, now=slot - dt.timedelta(days=1))
    ids = add_schedules(f, cron="0 0 1 1 *", now=slot - dt.timedelta(days=1),
                        catch_up=dt.timedelta(days=366))
    return ids, slot


def broker_run_ids(broker: redis.Redis) -> list[str]:
    return [json.loads(raw)["headers"]["argsrepr"].strip("[]'") for raw in
            broker.lrange(QUEUE, 0, -1)]


def waiting_on_outbox(engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%INSERT INTO outbox%'")).scalars())


def any_alive(engine, pids: list[int]) -> bool:
    # a new transaction each time: pg_stat_activity is a snapshot for a transaction's life
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM pg_stat_activity "
                                      "WHERE pid = ANY(:pids)"), {"pids": pids}).scalar())


def test_a_scheduler_killed_mid_batch_and_restarted_runs_each_slot_once(
        pg_sessions, pg_engine, pg_database, broker, tmp_path):
    ids, slot = yearly_schedules(pg_sessions, 120)
    # Given a scheduler that committed a first batch and died before relaying it
    assert tick(pg_sessions, FrozenClock(dt.datetime.now(UTC)), batch=30).queued == 30

    # And a second scheduler SIGKILLed while its batch is inside the transaction (its insert
    # into the outbox is held on a table lock, so it is certainly mid-batch)
    blocker = pg_engine.connect()
    blocker.execute(text("LOCK TABLE outbox IN SHARE MODE"))
    process = scheduler_process(pg_database, tmp_path, *ONCE, "--batch", "40")
    deadline = time.monotonic() + 30
    while not (orphans := waiting_on_outbox(pg_engine)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)
    blocker.rollback()
    blocker.close()
    deadline = time.monotonic() + 30
    while any_alive(pg_engine, orphans):  # the server rolls the dead client's work back
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert count(pg_sessions, JobRun) == 30  # nothing of the killed batch survived

    # When it restarts
    restarted = scheduler_process(pg_database, tmp_path, *ONCE, "--batch", "40")
    out, err = restarted.communicate(timeout=60)
    assert restarted.returncode == 0, err

    # Then each schedule's slot is exactly one queued run, every schedule moved on, and each
    # run reached the broker (a message published before the kill but not marked sent is
    # published again: runs are claimed by compare-and-set, so a duplicate wake-up is harmless)
    records = runs_by_slot(pg_sessions)
    assert sorted(records) == sorted((i, slot) for i in ids)
    assert set(records.values()) == {"queued"}
    with pg_sessions() as s:
        assert set(s.scalars(select(Schedule.next_slot_at))) == {at(slot.year + 1, 1, 1)}
        assert s.scalar(select(OutboxMessage.id).where(OutboxMessage.sent_at.is_(None))) is None
        run_ids = {str(r) for r in s.scalars(select(JobRun.id))}
    published = broker_run_ids(broker)
    assert set(published) == run_ids
    assert len(published) - len(run_ids) <= 30
    assert json.loads(out)[0]["claimed"] == 90


def test_two_scheduler_processes_share_the_work_without_duplicates(
        pg_sessions, pg_database, broker, tmp_path):
    ids, slot = yearly_schedules(pg_sessions, 400)
    processes = [scheduler_process(pg_database, tmp_path, *ONCE, "--batch", "20")
                 for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(e for _, e in outputs)
    claimed = [json.loads(out)[0]["claimed"] for out, _ in outputs]
    assert sum(claimed) == 400, outputs
    records = runs_by_slot(pg_sessions)
    assert sorted(records) == sorted((i, slot) for i in ids)
    published = broker_run_ids(broker)
    assert len(published) == len(set(published)) == 400, (len(published), outputs)


def test_sigterm_stops_a_running_scheduler_cleanly(pg_sessions, pg_database, broker, tmp_path):
    yearly_schedules(pg_sessions, 50)
    process = scheduler_process(pg_database, tmp_path, "--interval", "1s",
                                "--sweep-interval", "1s")
    deadline = time.monotonic() + 30
    while count(pg_sessions, JobRun) < 50 or broker.llen(QUEUE) < 50:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert time.monotonic() - sent < 5  # even with a sweep pass under way
    assert "SIGTERM, stopping after the current batch" in err
    assert len(set(broker_run_ids(broker))) == 50
