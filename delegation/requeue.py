"""Putting parked runs back in the queue: by run, delegation or agent, and after a repair.

A run is parked when its delegation broke (`invalid_grant`) or lacked a scope; it stays parked
until someone re-queues it. Shared by the CLI (`behalf requeue`), the ops API and the re-auth
flow, hence here rather than in `scheduler`.

Exactly once, however many operators click at the same moment: the runs to move are locked
with `FOR UPDATE SKIP LOCKED` (a run another caller is moving is simply not ours) and moved with
a compare-and-set `UPDATE … WHERE status = 'parked' RETURNING`, so a run is re-queued by exactly
one caller, who writes its outbox entry and its `run:requeued` audit record (with the
operator's name) in the same transaction. Bulk re-queues work from a snapshot of the matching
ids taken at the start, in batches of their own transactions, so a run that a worker parks
again while the batch is still going is not picked up twice.

A re-queued run starts with fresh attempts. Re-queuing never changes a delegation: if it is
still broken, the worker parks the run again at its first check, before any request to the
authorisation server; if it is active but its refresh token died meanwhile, the first run's
refresh meets `invalid_grant`, breaks the delegation (which parks its other queued runs) and
every other run of it parks on the durable state, so the AS sees at most one probe.

After a repair (a user re-authorised a broken delegation), `requeue_after_repair` re-queues the
latest parked slot of each schedule and records the older ones `missed` (reason
`superseded`), unless the schedule has `requeue_all`; runs of no schedule are all re-queued.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from delegation import audit, metrics
from delegation.clock import Clock
from delegation.outbox import dispatch_runs
from models import Agent, Delegation, JobRun, RunStatus, Schedule, User

BATCH = 500


class RequeueError(ValueError):
    """A selector that names nothing usable (the message says what)."""


@dataclass(frozen=True)
class RequeueResult:
    matched: int  # parked runs matching the selector when the call looked
    requeued: int  # of which this call moved to queued
    superseded: int = 0  # of which were older slots recorded missed (after a repair)

    @property
    def already(self) -> int:
        """Matched runs someone else handled first (re-queued, cancelled...)."""
        return self.matched - self.requeued - self.superseded

    def as_dict(self) -> dict[str, int]:
        return {"matched": self.matched, "requeued": self.requeued,
                "superseded": self.superseded, "already_handled": self.already}


@dataclass(frozen=True)
class Actor:
    """Who asked: an operator by name (`via` cli/api), or the system (`via` reauth)."""

    name: str
    via: str
    actor_type: str = "operator"


def parked_ids(session: Session, *, run_id: uuid.UUID | None = None,
               delegation_id: uuid.UUID | None = None, agent_id: uuid.UUID | None = None
               ) -> list[uuid.UUID]:
    """Ids of the parked runs one selector names (exactly one must be given), oldest first."""
    given = [v for v in (run_id, delegation_id, agent_id) if v is not None]
    if len(given) != 1:
        raise RequeueError("name exactly one of a run, a delegation or an agent")
    query = select(JobRun.id).where(JobRun.status == RunStatus.PARKED.value)
    if run_id is not None:
        if session.get(JobRun, run_id) is None:
            raise RequeueError(f"no run {run_id}")
        query = query.where(JobRun.id == run_id)
    elif delegation_id is not None:
        if session.get(Delegation, delegation_id) is None:
            raise RequeueError(f"no delegation {delegation_id}")
        query = query.where(JobRun.delegation_id == delegation_id)
    else:
        if session.get(Agent, agent_id) is None:
            raise RequeueError(f"no agent {agent_id}")
        query = query.where(JobRun.agent_id == agent_id)
    return list(session.scalars(query.order_by(JobRun.queued_at, JobRun.id)).all())


def requeue(sessions: sessionmaker[Session], clock: Clock, actor: Actor, *,
            run_id: uuid.UUID | None = None, delegation_id: uuid.UUID | None = None,
            agent_id: uuid.UUID | None = None, batch: int = BATCH,
            progress: Callable[[int], object] | None = None) -> RequeueResult:
    """Re-queue the parked runs a selector names, in batches; `progress(n)` after each."""
    with sessions() as session:
        ids = parked_ids(session, run_id=run_id, delegation_id=delegation_id,
                         agent_id=agent_id)
    return requeue_batches(sessions, clock, actor, ids, batch=batch, progress=progress)


def requeue_batches(sessions: sessionmaker[Session], clock: Clock, actor: Actor,
                    ids: Sequence[uuid.UUID], *, batch: int = BATCH,
                    progress: Callable[[int], object] | None = None) -> RequeueResult:
    """Re-queue a snapshot of parked run ids, one transaction per batch."""
    moved = 0
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        with sessions.begin() as session:
            moved += len(requeue_ids(session, chunk, actor, clock.now()))
        if progress is not None:
            progress(len(chunk))
    return RequeueResult(matched=len(ids), requeued=moved)


def requeue_ids(session: Session, ids: Sequence[uuid.UUID], actor: Actor, now: dt.datetime
                ) -> list[uuid.UUID]:
    """Move those of `ids` that are parked (and not being moved by someone else) to queued,
    in the caller's transaction; returns the ids this call moved."""
    if not ids:
        return []
    locked = session.execute(
        select(JobRun.id, JobRun.reason)
        .where(JobRun.id.in_(ids), JobRun.status == RunStatus.PARKED.value)
        .order_by(JobRun.id)
        .with_for_update(skip_locked=True)
    ).all()
    if not locked:
        return []
    previous = {run_id: reason for run_id, reason in locked}
    moved = session.execute(
        update(JobRun)
        .where(JobRun.id.in_(list(previous)), JobRun.status == RunStatus.PARKED.value)
        .values(status=RunStatus.QUEUED.value, reason="requeued", detail=None, attempts=0,
                not_before=None, lease_owner=None, lease_expires_at=None, finished_at=None,
                updated_at=now)
        .returning(JobRun.id, JobRun.user_id, JobRun.agent_id, JobRun.delegation_id,
                   JobRun.job, JobRun.slot_at)
        .execution_options(synchronize_session=False)
    ).all()
    dispatch_runs(session, [row.id for row in moved], now)
    _audit_runs(session, moved, "run:requeued", actor, now,
                lambda row: {"previous_reason": previous.get(row.id), "via": actor.via})
    metrics.RUNS_REQUEUED.labels(actor.via).inc(len(moved))
    return [row.id for row in moved]


def requeue_after_repair(session: Session, delegation_id: uuid.UUID, now: dt.datetime, *,
                         actor: Actor | None = None) -> RequeueResult:
    """A broken delegation works again: re-queue its parked runs, in the caller's transaction.

    Per schedule, only the latest parked slot runs unless the schedule has `requeue_all`;
    the older ones are recorded `missed` with reason `superseded`.
    """
    actor = actor or Actor(name="reauth", via="reauth", actor_type="system")
    parked = session.execute(
        select(JobRun.id, JobRun.schedule_id, JobRun.slot_at, JobRun.queued_at)
        .where(JobRun.delegation_id == delegation_id,
               JobRun.status == RunStatus.PARKED.value)
        .order_by(JobRun.id)
        .with_for_update(skip_locked=True)
    ).all()
    if not parked:
        return RequeueResult(0, 0)
    schedule_ids = {row.schedule_id for row in parked if row.schedule_id is not None}
    requeue_all = dict(session.execute(
        select(Schedule.id, Schedule.requeue_all).where(Schedule.id.in_(schedule_ids))
    ).tuples().all()) if schedule_ids else {}
    latest: dict[uuid.UUID, Any] = {}
    for row in parked:
        if row.schedule_id is None:
            continue
        best = latest.get(row.schedule_id)
        if best is None or (row.slot_at or row.queued_at) > (best.slot_at or best.queued_at):
            latest[row.schedule_id] = row
    run_now = [row.id for row in parked
               if row.schedule_id is None or requeue_all.get(row.schedule_id, False)
               or latest[row.schedule_id].id == row.id]
    chosen = set(run_now)
    older = [row.id for row in parked if row.id not in chosen]
    moved = requeue_ids(session, run_now, actor, now)
    superseded = session.execute(
        update(JobRun)
        .where(JobRun.id.in_(older), JobRun.status == RunStatus.PARKED.value)
        .values(status=RunStatus.MISSED.value, reason="superseded",
                detail="a later slot of the schedule ran after the delegation was repaired",
                finished_at=now, updated_at=now)
        .returning(JobRun.id, JobRun.user_id, JobRun.agent_id, JobRun.delegation_id,
                   JobRun.job, JobRun.slot_at)
        .execution_options(synchronize_session=False)
    ).all() if older else []
    _audit_runs(session, superseded, "run:superseded", actor, now,
                lambda row: {"via": actor.via})
    return RequeueResult(matched=len(parked), requeued=len(moved), superseded=len(superseded))


def _audit_runs(session: Session, rows: Sequence[Any], action: str, actor: Actor,
                now: dt.datetime, detail: Callable[[Any], dict[str, Any]]) -> None:
    if not rows:
        return
    users = dict(session.execute(
        select(User.id, User.subject).where(User.id.in_({row.user_id for row in rows}))
    ).tuples().all())
    agents = {a.id: a for a in session.scalars(
        select(Agent).where(Agent.id.in_({row.agent_id for row in rows}))).all()}
    for row in rows:
        agent = agents.get(row.agent_id)
        audit.append(session, audit.AuditRecord(
            action=action, actor_type=actor.actor_type, actor=actor.name,
            user_id=row.user_id, user_subject=users.get(row.user_id),
            agent_name=agent.name if agent else None,
            client_id=agent.client_id if agent else None,
            delegation_id=row.delegation_id, run_id=row.id,
            detail={"job": row.job,
                    "slot_at": row.slot_at.isoformat() if row.slot_at else None,
                    **detail(row)},
        ), now)
