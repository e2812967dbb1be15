"""Writing slot records: one `job_runs` row per (schedule, slot), whatever its outcome.

A slot that runs, is skipped (overlap), missed (outside the catch-up window), parked (broken
delegation) or cancelled (revoked delegation) is one row, so the unique constraint
`uq_job_runs_schedule_slot` guards them all: rows are inserted with `ON CONFLICT DO NOTHING`
and only the rows actually inserted are returned, and only queued ones among them are handed
to the outbox. A second writer of the same slot (a backfill racing the tick, a scheduler
whose batch was replayed) therefore creates nothing and publishes nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from delegation.outbox import dispatch_runs
from models import JobRun, RunStatus

TERMINAL = frozenset({RunStatus.SKIPPED.value, RunStatus.MISSED.value,
                      RunStatus.CANCELLED.value, RunStatus.FAILED.value})


@dataclass(frozen=True)
class SlotRecord:
    """What happened to one slot of one schedule."""

    schedule_id: uuid.UUID
    slot_at: dt.datetime
    job: str
    user_id: uuid.UUID
    agent_id: uuid.UUID
    delegation_id: uuid.UUID | None
    status: str
    reason: str | None = None
    detail: str | None = None
    id: uuid.UUID | None = None

    def row(self, now: dt.datetime) -> dict[str, Any]:
        return {
            "id": self.id or uuid.uuid4(), "job": self.job, "user_id": self.user_id,
            "agent_id": self.agent_id, "delegation_id": self.delegation_id,
            "schedule_id": self.schedule_id, "slot_at": self.slot_at, "status": self.status,
            "reason": self.reason, "detail": self.detail, "attempts": 0, "max_attempts": 3,
            "queued_at": now, "updated_at": now,
            "finished_at": now if self.status in TERMINAL else None,
        }


def insert_records(session: Session, records: Sequence[SlotRecord], now: dt.datetime
                   ) -> list[tuple[uuid.UUID, str]]:
    """Insert the records whose (schedule, slot) has none yet; dispatch the queued ones.

    Returns (run id, status) of every row inserted, in the caller's transaction.
    """
    if not records:
        return []
    rows = [r.row(now) for r in records]
    if session.get_bind().dialect.name == "postgresql":
        inserted = _insert_postgresql(session, rows, now)
    else:
        table = cast(Table, JobRun.__table__)
        statement = sqlite.insert(table).on_conflict_do_nothing(
            index_elements=["schedule_id", "slot_at"]).returning(table.c.id, table.c.status)
        inserted = [(row[0], row[1]) for row in session.execute(statement, rows).all()]
    dispatch_runs(session, [run_id for run_id, status in inserted
                            if status == RunStatus.QUEUED.value], now)
    return inserted


# One short statement whatever the batch size: the columns travel as arrays. (A multi-row
# VALUES list is a new, long statement text per batch, which PostgreSQL and psycopg both
# parse again every time.)
_INSERT_POSTGRESQL = text("""
    INSERT INTO job_runs (id, job, user_id, agent_id, delegation_id, schedule_id, slot_at,
                          status, reason, detail, attempts, max_attempts, queued_at,
                          updated_at, finished_at)
    SELECT v.id, v.job, v.user_id, v.agent_id, v.delegation_id, v.schedule_id, v.slot_at,
           v.status, v.reason, v.detail, 0, 3, :now, :now, v.finished_at
    FROM unnest(CAST(:id AS uuid[]), CAST(:job AS varchar[]), CAST(:user_id AS uuid[]),
                CAST(:agent_id AS uuid[]), CAST(:delegation_id AS uuid[]),
                CAST(:schedule_id AS uuid[]), CAST(:slot_at AS timestamptz[]),
                CAST(:status AS varchar[]), CAST(:reason AS varchar[]),
                CAST(:detail AS text[]), CAST(:finished_at AS timestamptz[]))
         AS v(id, job, user_id, agent_id, delegation_id, schedule_id, slot_at, status,
              reason, detail, finished_at)
    ON CONFLICT (schedule_id, slot_at) DO NOTHING
    RETURNING id, status
""")
_COLUMNS = ("id", "job", "user_id", "agent_id", "delegation_id", "schedule_id", "slot_at",
            "status", "reason", "detail", "finished_at")


def _insert_postgresql(session: Session, rows: list[dict[str, Any]], now: dt.datetime
                       ) -> list[tuple[uuid.UUID, str]]:
    params: dict[str, Any] = {column: [row[column] for row in rows] for column in _COLUMNS}
    params["now"] = now
    return [(row[0], row[1]) for row in session.execute(_INSERT_POSTGRESQL, params).all()]
