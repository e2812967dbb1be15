"""Runs whose worker vanished: `running` with a lease that expired.

A worker extends its run's lease every heartbeat; a lease in the past means the worker died
(SIGKILL, lost node) or lost the database for a whole lease. Such a run goes back to `queued`
with an outbox entry (a worker claims it again by compare-and-set, see `worker.runner`), or,
once its attempts are used up, ends `failed` with reason `attempts_exhausted`, so a run that
kills its worker every time cannot loop forever.

Runs whose wake-up was lost: `queued` and due for a long while, yet never claimed. A broker
message consumed by a delivery that could not reach the database, or dropped by a broker that
lost its data, leaves such a row; the row is the truth, so it gets a fresh wake-up (an extra
one is harmless: a run is claimed by compare-and-set).

Several schedulers may recover at once: rows are taken with `FOR UPDATE SKIP LOCKED` and
changed with a compare-and-set on (status, lease), so a run is recovered once, and a worker
that claims or finishes it at the same moment wins or loses cleanly.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from delegation import metrics
from delegation.clock import Clock
from delegation.outbox import dispatch_runs
from models import JobRun, RunStatus


@dataclass(frozen=True)
class Recovered:
    requeued: int
    failed: int


def recover_expired(sessions: sessionmaker[Session], clock: Clock, *, batch: int = 500
                    ) -> Recovered:
    """Re-queue or fail up to `batch` runs whose lease expired before now."""
    now = clock.now()
    with sessions.begin() as session:
        ids = session.scalars(
            select(JobRun.id)
            .where(JobRun.status == RunStatus.RUNNING.value, JobRun.lease_expires_at < now)
            .order_by(JobRun.lease_expires_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        if not ids:
            return Recovered(0, 0)
        expired = (JobRun.id.in_(ids), JobRun.status == RunStatus.RUNNING.value,
                   or_(JobRun.lease_expires_at.is_(None), JobRun.lease_expires_at < now))
        failed = session.scalars(
            update(JobRun)
            .where(*expired, JobRun.attempts >= JobRun.max_attempts)
            .values(status=RunStatus.FAILED.value, reason="attempts_exhausted",
                    detail="the run's worker was lost on every attempt", finished_at=now,
                    lease_owner=None, lease_expires_at=None, updated_at=now)
            .returning(JobRun.id)
            .execution_options(synchronize_session=False)
        ).all()
        requeued = session.scalars(
            update(JobRun)
            .where(*expired, JobRun.attempts < JobRun.max_attempts)
            .values(status=RunStatus.QUEUED.value, reason="lease_expired", not_before=None,
                    lease_owner=None, lease_expires_at=None, updated_at=now)
            .returning(JobRun.id)
            .execution_options(synchronize_session=False)
        ).all()
        dispatch_runs(session, requeued, now)
    metrics.RUNS_RECOVERED.labels("requeued").inc(len(requeued))
    metrics.RUNS_RECOVERED.labels("failed").inc(len(failed))
    return Recovered(len(requeued), len(failed))


def redispatch_stale(sessions: sessionmaker[Session], clock: Clock, *, older_than: float,
                     batch: int = 500) -> int:
    """Send a new wake-up for queued runs due and untouched for `older_than` seconds."""
    now = clock.now()
    cutoff = now - dt.timedelta(seconds=older_than)
    with sessions.begin() as session:
        ids = session.scalars(
            select(JobRun.id)
            .where(JobRun.status == RunStatus.QUEUED.value, JobRun.updated_at < cutoff,
                   or_(JobRun.not_before.is_(None), JobRun.not_before < cutoff))
            .order_by(JobRun.updated_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        if not ids:
            return 0
        session.execute(
            update(JobRun)
            .where(JobRun.id.in_(ids), JobRun.status == RunStatus.QUEUED.value)
            .values(updated_at=now)
            .execution_options(synchronize_session=False)
        )
        dispatch_runs(session, ids, now)
    metrics.RUNS_RECOVERED.labels("redispatched").inc(len(ids))
    return len(ids)
