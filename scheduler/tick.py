"""One scheduler batch: claim due schedules, record their slots, hand runs to the outbox.

Any number of schedulers run `tick` concurrently. In one transaction a tick

1. claims up to `batch` schedules with `next_run_at <= now`, oldest first, with
   `SELECT … FOR UPDATE SKIP LOCKED` over the partial index `ix_schedules_due` (so two
   schedulers take disjoint batches and never wait on each other);
2. decides each schedule's due slots with `scheduler.cron` (spread offset and catch-up
   window applied): the latest slot runs, older ones are recorded `missed`; the run itself is
   recorded `skipped` when the schedule's previous run is still queued or running (overlap
   policy "skip"), `parked` when the delegation is broken, `cancelled` when it is revoked and
   `failed` when the user never connected the agent;
3. inserts one `job_runs` row per slot under the unique (schedule, slot) constraint and one
   outbox entry per queued run;
4. advances `next_slot_at`/`next_run_at` past the slots it accounted for.

A scheduler killed anywhere before the commit leaves nothing behind (the next tick redoes the
batch); after the commit, the outbox relay publishes. Every slot thus ends as exactly one row.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from delegation import metrics
from delegation.clock import Clock
from models import Delegation, DelegationStatus, JobRun, RunStatus, Schedule
from models.base import UTCDateTime
from scheduler import cron
from scheduler.records import SlotRecord, insert_records

log = logging.getLogger(__name__)

_ONE_MICROSECOND = dt.timedelta(microseconds=1)
OVERLAP_SKIP = "skip"
OVERLAP_ALLOW = "allow"
OVERLAP_POLICIES = (OVERLAP_SKIP, OVERLAP_ALLOW)
_IN_FLIGHT = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
_NOT_RUNS = (RunStatus.MISSED.value, RunStatus.SKIPPED.value)


@dataclass
class TickResult:
    claimed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    run_ids: list[uuid.UUID] = field(default_factory=list)

    @property
    def queued(self) -> int:
        return self.outcomes.get(RunStatus.QUEUED.value, 0)

    def count(self, status: str) -> None:
        self.outcomes[status] = self.outcomes.get(status, 0) + 1


@dataclass(frozen=True)
class Plan:
    """What to record for one schedule, and where it goes next."""

    missed: tuple[dt.datetime, ...]
    run: dt.datetime | None
    next_slot_at: dt.datetime
    last_slot_at: dt.datetime | None


class SlotMemo:
    """`cron.next_slot` memoised for one tick: a million nightly schedules share a handful of
    (cron, zone, slot) triples, and croniter costs tens of microseconds a call."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, dt.datetime], dt.datetime] = {}

    def next_slot(self, expression: str, tz: str, after: dt.datetime) -> dt.datetime:
        key = (expression, tz, after)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = cron.next_slot(expression, tz, after)
        return found


def offset_of(schedule_id: uuid.UUID, spread_seconds: int) -> dt.timedelta:
    return cron.spread_offset(schedule_id, dt.timedelta(seconds=max(0, spread_seconds)))


def plan(*, expression: str, tz: str, offset: dt.timedelta, catch_up_seconds: int,
         next_slot_at: dt.datetime, now: dt.datetime, memo: SlotMemo | None = None,
         max_missed: int = 1000) -> Plan:
    """Which due slots of a schedule to run or miss at `now` (pure; see the module doc).

    `offset` is the schedule's spread offset: a slot S is due once `S + offset <= now`, and
    runs if `S + offset >= now - catch_up`.
    """
    memo = memo or SlotMemo()
    horizon = now - offset  # slots <= horizon are due
    window = dt.timedelta(seconds=max(0, catch_up_seconds))
    if next_slot_at > horizon:  # not due (the spread changed under us): only re-align
        return Plan((), None, next_slot_at, None)
    following = memo.next_slot(expression, tz, next_slot_at)
    if following > horizon:  # the common case: exactly one slot is due
        if next_slot_at >= horizon - window:
            return Plan((), next_slot_at, following, next_slot_at)
        return Plan((next_slot_at,), None, following, next_slot_at)
    decision = cron.catch_up(expression, tz, next_slot_at - _ONE_MICROSECOND, horizon, window,
                             max_missed=max_missed)
    watermark = decision.watermark
    assert watermark is not None  # next_slot_at itself is due
    return Plan(decision.missed, decision.run, memo.next_slot(expression, tz, watermark),
                watermark)


def tick(sessions: sessionmaker[Session], clock: Clock, *, batch: int = 500,
         max_missed: int = 1000) -> TickResult:
    """Claim and account for up to `batch` due schedules in one transaction."""
    started = time.perf_counter()
    now = clock.now()
    result = TickResult()
    with sessions.begin() as session:
        claimed = session.execute(claim_query(now, batch)).all()
        result.claimed = len(claimed)
        if claimed:
            _account(session, claimed, now, result, max_missed)
    metrics.SCHEDULER_TICK_SECONDS.observe(time.perf_counter() - started)
    for status, n in result.outcomes.items():
        metrics.SCHEDULER_SLOTS.labels(status).inc(n)
    return result


def claim_query(now: dt.datetime, batch: int) -> Any:
    """The claim: due, not paused, oldest first, skipping rows another scheduler holds.

    `NOT paused` is spelled exactly as the partial index's predicate so the planner can use
    `ix_schedules_due` on the `next_run_at <= now` range (an ordered index scan when many rows
    are due, a bitmap scan and a small sort when few are; `bench/scheduler.py` prints it).
    """
    return (
        select(Schedule.id, Schedule.user_id, Schedule.agent_id, Schedule.job, Schedule.cron,
               Schedule.timezone, Schedule.spread_seconds, Schedule.catch_up_seconds,
               Schedule.overlap, Schedule.next_slot_at)
        .where(~Schedule.paused, Schedule.next_run_at <= now)
        .order_by(Schedule.next_run_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )


def _account(session: Session, claimed: Sequence[Any], now: dt.datetime, result: TickResult,
             max_missed: int) -> None:
    memo = SlotMemo()
    plans: dict[uuid.UUID, Plan] = {}
    offsets = {row.id: offset_of(row.id, row.spread_seconds) for row in claimed}
    broken: list[uuid.UUID] = []
    for row in claimed:
        try:
            plans[row.id] = plan(expression=row.cron, tz=row.timezone, offset=offsets[row.id],
                                 catch_up_seconds=row.catch_up_seconds,
                                 next_slot_at=row.next_slot_at, now=now, memo=memo,
                                 max_missed=max_missed)
        except cron.ScheduleError as exc:  # e.g. a zone removed from tzdata: stop, loudly
            log.error("schedule %s cannot be computed any more and is paused: %s", row.id, exc)
            broken.append(row.id)

    running = [row for row in claimed if row.id in plans and plans[row.id].run is not None]
    delegations = _delegations(session, running)
    busy = _busy(session, [row.id for row in running if row.overlap != OVERLAP_ALLOW])

    records: list[SlotRecord] = []
    updates: list[dict[str, Any]] = []
    for row in claimed:
        if row.id not in plans:
            continue
        p = plans[row.id]
        found = delegations.get((row.user_id, row.agent_id))
        delegation_id = found[0] if found else None
        common = {"schedule_id": row.id, "job": row.job, "user_id": row.user_id,
                  "agent_id": row.agent_id, "delegation_id": delegation_id}
        for slot in p.missed:
            records.append(SlotRecord(slot_at=slot, status=RunStatus.MISSED.value,
                                      reason="outside_catch_up_window", **common))
        if p.run is not None:
            status, reason = _run_outcome(found, row.id in busy)
            records.append(SlotRecord(slot_at=p.run, status=status, reason=reason, **common))
        updates.append({"b_id": row.id, "b_next_slot": p.next_slot_at,
                        "b_next_run": p.next_slot_at + offsets[row.id],
                        "b_last": p.last_slot_at})  # None: re-aligned only

    inserted = insert_records(session, records, now)
    for run_id, status in inserted:
        result.count(status)
        if status == RunStatus.QUEUED.value:
            result.run_ids.append(run_id)
    _advance(session, updates, now)
    if broken:
        session.execute(update(Schedule).where(Schedule.id.in_(broken))
                        .values(paused=True, updated_at=now)
                        .execution_options(synchronize_session=False))


def _run_outcome(delegation: tuple[uuid.UUID, str] | None, busy: bool
                 ) -> tuple[str, str | None]:
    if delegation is None:
        return RunStatus.FAILED.value, "no_delegation"
    if delegation[1] == DelegationStatus.REVOKED:
        return RunStatus.CANCELLED.value, "delegation_revoked"
    if busy:
        return RunStatus.SKIPPED.value, "overlap"
    if delegation[1] == DelegationStatus.BROKEN:
        # Parked without a message: a broken delegation is not hammered night after night.
        return RunStatus.PARKED.value, "delegation_broken"
    return RunStatus.QUEUED.value, None


def _delegations(session: Session, rows: Iterable[Any]
                 ) -> dict[tuple[uuid.UUID, uuid.UUID], tuple[uuid.UUID, str]]:
    """(user, agent) -> (delegation id, status) for the claimed schedules, in one query.

    Read FOR SHARE: a repair (re-auth) that makes a broken delegation active again updates its
    row, so it either waits for this batch to commit (and then re-queues the run this batch
    parked) or commits first (and this batch sees the delegation active). Without the lock a
    run parked in between would stay parked.
    """
    users = {row.user_id for row in rows}
    if not users:
        return {}
    found = session.execute(
        select(Delegation.user_id, Delegation.agent_id, Delegation.id, Delegation.status)
        .where(Delegation.user_id.in_(users))
        .with_for_update(read=True)
    ).all()
    return {(u, a): (d, s) for u, a, d, s in found}


def _busy(session: Session, schedule_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Schedules whose previous run (latest slot that is a real run) is queued or running.

    A correlated subquery per schedule walks the (schedule_id, slot_at) unique index
    backwards and stops at the first real run, so the cost does not grow with history.
    """
    if not schedule_ids:
        return set()
    latest = (
        select(JobRun.status)
        .where(JobRun.schedule_id == Schedule.id, JobRun.status.not_in(_NOT_RUNS))
        .order_by(JobRun.slot_at.desc())
        .limit(1)
        .correlate(Schedule)
        .scalar_subquery()
    )
    rows = session.execute(select(Schedule.id, latest).where(Schedule.id.in_(schedule_ids)))
    return {schedule_id for schedule_id, status in rows if status in _IN_FLIGHT}


_ADVANCE_POSTGRESQL = text("""
    UPDATE schedules AS s
    SET next_slot_at = v.next_slot, next_run_at = v.next_run,
        last_slot_at = COALESCE(v.last_slot, s.last_slot_at), updated_at = :now
    FROM unnest(CAST(:ids AS uuid[]), CAST(:next_slot AS timestamptz[]),
                CAST(:next_run AS timestamptz[]), CAST(:last_slot AS timestamptz[]))
         AS v(id, next_slot, next_run, last_slot)
    WHERE s.id = v.id
""")


def _advance(session: Session, updates: list[dict[str, Any]], now: dt.datetime) -> None:
    """Move every claimed schedule on (`last_slot_at` keeps its value where nothing was
    accounted for): one statement with arrays on PostgreSQL, an executemany elsewhere."""
    if not updates:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_ADVANCE_POSTGRESQL, {
            "ids": [u["b_id"] for u in updates],
            "next_slot": [u["b_next_slot"] for u in updates],
            "next_run": [u["b_next_run"] for u in updates],
            "last_slot": [u["b_last"] for u in updates], "now": now})
        return
    table = cast(Table, Schedule.__table__)
    statement = (
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(next_slot_at=bindparam("b_next_slot"), next_run_at=bindparam("b_next_run"),
                last_slot_at=func.coalesce(bindparam("b_last", type_=UTCDateTime()),
                                           table.c.last_slot_at),
                updated_at=now)
    )
    session.execute(statement, updates)
