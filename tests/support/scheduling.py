"""Fleets of users, delegations and schedules for scheduler tests, inserted in bulk.

Rows are built the way the product builds them (`scheduler.schedules.build`), then inserted
with one multi-row INSERT per table, so ten thousand schedules cost well under a second.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from models import Agent, Delegation, JobRun, OutboxMessage, Provider, Schedule, User
from scheduler import schedules
from scheduler.schedules import ScheduleSpec


@dataclass
class Fleet:
    sessions: sessionmaker[Session]
    provider_id: uuid.UUID
    agent_id: uuid.UUID
    users: list[uuid.UUID] = field(default_factory=list)
    delegations: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)  # user -> delegation
    schedules: list[uuid.UUID] = field(default_factory=list)


def _chunks(rows: list[dict[str, Any]], size: int = 1000) -> Iterable[list[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def fleet(sessions: sessionmaker[Session], users: int, *, now: dt.datetime,
          delegation_status: str | None = "active", agent_name: str = "reporter",
          subject_prefix: str = "user") -> Fleet:
    """A provider, an agent and `users` users, each with a delegation (unless status None)."""
    with sessions.begin() as session:
        provider = Provider(name=f"prov-{uuid.uuid4().hex[:8]}", issuer="https://as.test",
                            api_base="https://api.test", discovered={}, created_at=now)
        session.add(provider)
        session.flush()
        agent = Agent(name=agent_name, environment="test", provider_id=provider.id,
                      client_id=f"client-{uuid.uuid4().hex[:8]}", auth_method="none",
                      scopes=["reports:read"], required_scopes=[], created_at=now,
                      updated_at=now)
        session.add(agent)
        session.flush()
        result = Fleet(sessions, provider.id, agent.id)
        user_rows = [{"id": uuid.uuid4(), "issuer": "https://as.test",
                      "subject": f"{subject_prefix}-{i}", "created_at": now}
                     for i in range(users)]
        for chunk in _chunks(user_rows):
            session.execute(insert(User), chunk)
        result.users = [row["id"] for row in user_rows]
        if delegation_status is not None:
            rows = [{"id": uuid.uuid4(), "user_id": u, "agent_id": agent.id,
                     "requested_scopes": ["reports:read"], "granted_scopes": ["reports:read"],
                     "status": delegation_status, "version": 1, "granted_at": now,
                     "created_at": now, "updated_at": now} for u in result.users]
            for chunk in _chunks(rows):
                session.execute(insert(Delegation), chunk)
            result.delegations = {row["user_id"]: row["id"] for row in rows}
    return result


def add_schedules(target: Fleet, *, cron: str, now: dt.datetime, tz: str = "UTC",
                  spread: dt.timedelta = dt.timedelta(0),
                  catch_up: dt.timedelta = dt.timedelta(hours=1), overlap: str = "skip",
                  requeue_all: bool = False, job: str = "nightly",
                  users: list[uuid.UUID] | None = None) -> list[uuid.UUID]:
    """One schedule per user (as `schedules.create` would build it), inserted in bulk."""
    rows = []
    for user_id in users if users is not None else target.users:
        row = schedules.build(
            ScheduleSpec(user_id=user_id, agent_id=target.agent_id, job=job, cron=cron, tz=tz,
                         spread=spread, catch_up=catch_up, overlap=overlap,
                         requeue_all=requeue_all),
            now=now)
        rows.append({c.key: getattr(row, c.key) for c in Schedule.__table__.columns})
    with target.sessions.begin() as session:
        for chunk in _chunks(rows):
            session.execute(insert(Schedule), chunk)
    ids = [row["id"] for row in rows]
    target.schedules.extend(ids)
    return ids


def runs_by_slot(sessions: sessionmaker[Session]) -> dict[tuple[uuid.UUID, dt.datetime], str]:
    """(schedule, slot) -> status of every slot record (fails on a duplicate)."""
    with sessions() as session:
        rows = session.execute(
            select(JobRun.schedule_id, JobRun.slot_at, JobRun.status)
            .where(JobRun.schedule_id.is_not(None))
        ).all()
    found: dict[tuple[uuid.UUID, dt.datetime], str] = {}
    for schedule_id, slot_at, status in rows:
        key = (schedule_id, slot_at)
        assert key not in found, f"two records for schedule {schedule_id} slot {slot_at}"
        found[key] = status
    return found


def dispatched_run_ids(sessions: sessionmaker[Session]) -> list[str]:
    """Run ids in every `run.dispatch` outbox entry (duplicates kept)."""
    with sessions() as session:
        payloads = session.scalars(
            select(OutboxMessage.payload).where(OutboxMessage.topic == "run.dispatch")
        ).all()
    return [str(p["run_id"]) for p in payloads]


def count(sessions: sessionmaker[Session], model: Any, *where: Any) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)
