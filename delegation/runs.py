"""Creating runs: a row plus an outbox entry in the caller's transaction (never a bare publish)."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from delegation import outbox
from models import Delegation, JobRun, RunStatus


def queue_run(
    session: Session,
    *,
    job: str,
    user_id: uuid.UUID,
    agent_id: uuid.UUID,
    now: dt.datetime,
    schedule_id: uuid.UUID | None = None,
    slot_at: dt.datetime | None = None,
    max_attempts: int = 3,
) -> JobRun:
    delegation_id = session.scalar(
        select(Delegation.id).where(Delegation.user_id == user_id,
                                    Delegation.agent_id == agent_id)
    )
    run = JobRun(
        id=uuid.uuid4(), job=job, user_id=user_id, agent_id=agent_id,
        delegation_id=delegation_id, schedule_id=schedule_id, slot_at=slot_at,
        status=RunStatus.QUEUED.value, attempts=0, max_attempts=max_attempts,
        queued_at=now, updated_at=now,
    )
    session.add(run)
    session.flush()
    outbox.dispatch_run(session, run.id, now)
    return run
