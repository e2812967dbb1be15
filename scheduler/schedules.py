"""Schedules as data: create, list, pause, resume and backfill, inside the caller's transaction.

A schedule is a cron expression read in an IANA zone (DST rules in `scheduler.cron`), a
spread window (each schedule's runs are offset by a stable hash of its id, so a million 02:00
schedules do not start in the same second), a catch-up window, an overlap policy and a re-queue
policy. `next_slot_at` is the first slot not yet accounted for, `next_run_at` that slot plus the
spread offset (what the scheduler's claim orders by), `last_slot_at` the latest slot accounted
for.

* Pausing stops the claims; resuming starts again at the first slot after the resume: the slots
  of the paused time are neither run nor recorded.
* A backfill runs every slot of an interval that has no run yet: slots recorded `missed` become
  queued runs, slots with no row get one; slots that ran, are running, or were skipped are left
  alone. Repeating it creates nothing.

Every change is audited with the operator's name. Errors are `ScheduleError` (a ValueError
whose message is fit for the command line) and `ScheduleNotFound`; they change nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from delegation import audit
from delegation.outbox import dispatch_runs
from models import Agent, Delegation, DelegationStatus, JobRun, RunStatus, Schedule, User
from scheduler import cron
from scheduler.cron import ScheduleError
from scheduler.records import SlotRecord, insert_records
from scheduler.tick import OVERLAP_POLICIES, OVERLAP_SKIP, offset_of

__all__ = [
    "BackfillRefused",
    "BackfillResult",
    "ScheduleError",
    "ScheduleNotFound",
    "ScheduleSpec",
    "backfill",
    "build",
    "create",
    "list_schedules",
    "pause",
    "resume",
]

MIN_CATCH_UP = dt.timedelta(minutes=1)
MAX_SPREAD = dt.timedelta(days=7)
MAX_BACKFILL_SLOTS = 10_000


class ScheduleNotFound(LookupError):
    """No schedule with that id."""


class BackfillRefused(ScheduleError):
    """The schedule's delegation cannot run anything now (missing, broken or revoked)."""


@dataclass(frozen=True)
class ScheduleSpec:
    user_id: uuid.UUID
    agent_id: uuid.UUID
    job: str
    cron: str
    tz: str = "UTC"
    spread: dt.timedelta = dt.timedelta(0)
    catch_up: dt.timedelta = dt.timedelta(hours=1)
    overlap: str = OVERLAP_SKIP
    requeue_all: bool = False

    def validate(self) -> None:
        cron.validate(self.cron, self.tz)
        if not self.job or len(self.job) > 200:
            raise ScheduleError("job name must be 1 to 200 characters")
        if not dt.timedelta(0) <= self.spread <= MAX_SPREAD:
            raise ScheduleError(f"spread must be between 0s and {_human(MAX_SPREAD)}")
        if self.catch_up < MIN_CATCH_UP:
            raise ScheduleError(
                f"catch-up window must be at least {_human(MIN_CATCH_UP)} (a tick that comes a "
                "few seconds late must still run its slot)")
        if self.overlap not in OVERLAP_POLICIES:
            raise ScheduleError(f"overlap policy must be one of {', '.join(OVERLAP_POLICIES)}, "
                                f"got {self.overlap!r}")


@dataclass(frozen=True)
class BackfillResult:
    slots: int
    created: int
    converted: int  # `missed` records turned into queued runs

    @property
    def queued(self) -> int:
        return self.created + self.converted

    @property
    def already(self) -> int:
        return self.slots - self.queued


def create(session: Session, spec: ScheduleSpec, *, now: dt.datetime, operator: str,
           schedule_id: uuid.UUID | None = None) -> Schedule:
    """Create a schedule whose first slot is the first one after `now`."""
    spec.validate()
    duplicate = session.scalar(
        select(Schedule.id).where(Schedule.user_id == spec.user_id,
                                  Schedule.agent_id == spec.agent_id, Schedule.job == spec.job,
                                  Schedule.cron == spec.cron, Schedule.timezone == spec.tz)
    )
    if duplicate is not None:
        raise ScheduleError(f"an identical schedule already exists: {duplicate}")
    row = build(spec, now=now, schedule_id=schedule_id)
    session.add(row)
    session.flush()
    _audit(session, row, "schedule:created", operator, now, {
        "job": spec.job, "cron": spec.cron, "tz": spec.tz,
        "spread_seconds": row.spread_seconds, "catch_up_seconds": row.catch_up_seconds,
        "overlap": spec.overlap, "requeue_all": spec.requeue_all,
        "next_run_at": row.next_run_at.isoformat()})
    return row


def build(spec: ScheduleSpec, *, now: dt.datetime, schedule_id: uuid.UUID | None = None
          ) -> Schedule:
    """The new row for `spec` (validated; not added to any session, nothing audited)."""
    spec.validate()
    schedule_id = schedule_id or uuid.uuid4()
    spread_seconds = int(spec.spread.total_seconds())
    first = cron.next_slot(spec.cron, spec.tz, now)
    return Schedule(
        id=schedule_id, user_id=spec.user_id, agent_id=spec.agent_id, job=spec.job,
        cron=spec.cron, timezone=spec.tz, spread_seconds=spread_seconds,
        catch_up_seconds=int(spec.catch_up.total_seconds()), overlap=spec.overlap,
        requeue_all=spec.requeue_all, paused=False, next_slot_at=first,
        next_run_at=first + offset_of(schedule_id, spread_seconds),
        last_slot_at=None, created_at=now, updated_at=now,
    )


def pause(session: Session, schedule_id: uuid.UUID, *, now: dt.datetime, operator: str) -> bool:
    """Stop claiming the schedule. False when it was already paused."""
    row = _locked(session, schedule_id)
    if row.paused:
        return False
    row.paused = True
    row.updated_at = now
    _audit(session, row, "schedule:paused", operator, now, {})
    return True


def resume(session: Session, schedule_id: uuid.UUID, *, now: dt.datetime, operator: str
           ) -> bool:
    """Claim the schedule again from its first slot after `now`. False when it was not paused
    (an active schedule keeps its pending slots)."""
    row = _locked(session, schedule_id)
    if not row.paused:
        return False
    first = cron.next_slot(row.cron, row.timezone, now)
    row.paused = False
    row.next_slot_at = first
    row.next_run_at = first + offset_of(row.id, row.spread_seconds)
    row.updated_at = now
    _audit(session, row, "schedule:resumed", operator, now,
           {"next_run_at": row.next_run_at.isoformat()})
    return True


def backfill(session: Session, schedule_id: uuid.UUID, start: dt.datetime, end: dt.datetime,
             *, now: dt.datetime, operator: str, max_slots: int = MAX_BACKFILL_SLOTS
             ) -> BackfillResult:
    """One run for every slot in [start, end) that has none: idempotent when repeated."""
    row = _locked(session, schedule_id)
    if start.tzinfo is None or end.tzinfo is None:
        raise ScheduleError("backfill bounds must carry a time zone")
    if start >= end:
        raise ScheduleError("backfill --from must be before --to")
    if end > now:
        raise ScheduleError("backfill --to must not be in the future")
    slots = list(cron.slots_between(row.cron, row.timezone, start, end, max_slots=max_slots))
    delegation = session.execute(
        select(Delegation.id, Delegation.status)
        .where(Delegation.user_id == row.user_id, Delegation.agent_id == row.agent_id)
    ).first()
    if delegation is None:
        raise BackfillRefused("the user has not connected this agent: nothing can run")
    if delegation.status != DelegationStatus.ACTIVE:
        raise BackfillRefused(f"the delegation is {delegation.status}: "
                            "it must be re-authorised before a backfill")

    existing: set[dt.datetime | None] = set()
    converted: list[uuid.UUID] = []
    for chunk in _chunks(slots, 500):
        existing.update(session.scalars(
            select(JobRun.slot_at).where(JobRun.schedule_id == row.id,
                                         JobRun.slot_at.in_(chunk))
        ).all())
        converted.extend(session.scalars(
            update(JobRun)
            .where(JobRun.schedule_id == row.id, JobRun.slot_at.in_(chunk),
                   JobRun.status == RunStatus.MISSED.value)
            .values(status=RunStatus.QUEUED.value, reason="backfill", attempts=0,
                    finished_at=None, queued_at=now, updated_at=now,
                    delegation_id=delegation.id)
            .returning(JobRun.id)
            .execution_options(synchronize_session=False)
        ).all())
    dispatch_runs(session, converted, now)
    records = [
        SlotRecord(schedule_id=row.id, slot_at=slot, job=row.job, user_id=row.user_id,
                   agent_id=row.agent_id, delegation_id=delegation.id,
                   status=RunStatus.QUEUED.value, reason="backfill")
        for slot in slots if slot not in existing
    ]
    created = len(insert_records(session, records, now))
    result = BackfillResult(slots=len(slots), created=created, converted=len(converted))
    _audit(session, row, "schedule:backfilled", operator, now, {
        "from": start.isoformat(), "to": end.isoformat(), "slots": result.slots,
        "created": result.created, "converted": result.converted})
    return result


def list_schedules(session: Session, *, user_id: uuid.UUID | None = None,
                   agent_id: uuid.UUID | None = None, paused: bool | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
    """Schedules with their user and agent names, soonest first."""
    query = (
        select(Schedule, User.subject, Agent.name)
        .join(User, Schedule.user_id == User.id).join(Agent, Schedule.agent_id == Agent.id)
        .order_by(Schedule.next_run_at, Schedule.id).limit(limit)
    )
    if user_id is not None:
        query = query.where(Schedule.user_id == user_id)
    if agent_id is not None:
        query = query.where(Schedule.agent_id == agent_id)
    if paused is not None:
        query = query.where(Schedule.paused.is_(paused))
    return [
        {"schedule_id": str(s.id), "user": subject, "agent": agent_name, "job": s.job,
         "cron": s.cron, "tz": s.timezone, "spread_seconds": s.spread_seconds,
         "catch_up_seconds": s.catch_up_seconds, "overlap": s.overlap,
         "requeue_all": s.requeue_all, "paused": s.paused,
         "next_slot_at": s.next_slot_at.isoformat(), "next_run_at": s.next_run_at.isoformat(),
         "last_slot_at": s.last_slot_at.isoformat() if s.last_slot_at else None}
        for s, subject, agent_name in session.execute(query).all()
    ]


def _locked(session: Session, schedule_id: uuid.UUID) -> Schedule:
    row = session.get(Schedule, schedule_id, with_for_update=True)
    if row is None:
        raise ScheduleNotFound(f"no schedule {schedule_id}")
    return row


def _audit(session: Session, row: Schedule, action: str, operator: str, now: dt.datetime,
           detail: dict[str, Any]) -> None:
    user = session.get(User, row.user_id)
    agent = session.get(Agent, row.agent_id)
    audit.append(session, audit.AuditRecord(
        action=action, actor_type="operator", actor=operator, user_id=row.user_id,
        user_subject=user.subject if user else None,
        agent_name=agent.name if agent else None, client_id=agent.client_id if agent else None,
        detail={"schedule_id": str(row.id), **detail},
    ), now)


def _chunks(items: list[dt.datetime], size: int) -> list[list[dt.datetime]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _human(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
