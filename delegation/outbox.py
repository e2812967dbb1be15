"""The transactional outbox: work recorded in the same commit as the change that needs it,
relayed afterwards by any number of relays (`FOR UPDATE SKIP LOCKED`), retried with backoff.

A crash between commit and publish loses nothing; a crash between publish and marking sent
publishes again, so every consumer is idempotent (a run is claimed by compare-and-set).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from sqlalchemy import Table, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from delegation.clock import Clock
from models import OutboxMessage

log = logging.getLogger(__name__)

RUN_DISPATCH = "run.dispatch"

Handler = Callable[[dict[str, Any]], None]


def add(session: Session, topic: str, payload: dict[str, Any], now: dt.datetime, *,
        available_at: dt.datetime | None = None, dedupe_key: str | None = None) -> None:
    session.add(OutboxMessage(topic=topic, payload=payload, created_at=now,
                              available_at=available_at or now, dedupe_key=dedupe_key))


def dispatch_run(session: Session, run_id: object, now: dt.datetime, *,
                 available_at: dt.datetime | None = None) -> None:
    add(session, RUN_DISPATCH, {"run_id": str(run_id)}, now, available_at=available_at)


def dispatch_runs(session: Session, run_ids: Iterable[object], now: dt.datetime) -> None:
    """`dispatch_run` for many runs at once (one statement on PostgreSQL)."""
    ids = [str(run_id) for run_id in run_ids]
    if not ids:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_DISPATCH_POSTGRESQL, {"ids": ids, "topic": RUN_DISPATCH, "now": now})
        return
    rows = [{"topic": RUN_DISPATCH, "payload": {"run_id": run_id}, "created_at": now,
             "available_at": now, "attempts": 0} for run_id in ids]
    session.execute(insert(cast(Table, OutboxMessage.__table__)), rows)


_DISPATCH_POSTGRESQL = text("""
    INSERT INTO outbox (topic, payload, created_at, available_at, attempts)
    SELECT :topic, jsonb_build_object('run_id', run_id), :now, :now, 0
    FROM unnest(CAST(:ids AS text[])) AS run_id
""")


def backoff(attempts: int, rng: random.Random, *, base: float = 1.0, cap: float = 300.0
            ) -> float:
    """Exponential backoff with full jitter."""
    return rng.uniform(0, min(cap, base * (2 ** min(attempts, 20))))


def relay_once(
    sessions: sessionmaker[Session],
    handlers: Mapping[str, Handler],
    clock: Clock,
    *,
    batch: int = 500,
    topics: list[str] | None = None,
    rng: random.Random | None = None,
) -> int:
    """Deliver up to `batch` due messages; returns how many were delivered."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
    now = clock.now()
    delivered = 0
    wanted = topics or list(handlers)
    with sessions.begin() as session:
        messages = session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.sent_at.is_(None), OutboxMessage.available_at <= now,
                   OutboxMessage.topic.in_(wanted))
            .order_by(OutboxMessage.available_at, OutboxMessage.id)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        for message in messages:
            try:
                handlers[message.topic](dict(message.payload))
            except Exception as exc:  # any failure is retried later
                message.attempts += 1
                message.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                message.available_at = now + dt.timedelta(
                    seconds=backoff(message.attempts, rng, cap=600))
                log.warning("outbox %s #%s failed (attempt %s): %s", message.topic,
                            message.id, message.attempts, message.last_error)
                continue
            message.sent_at = now
            delivered += 1
    return delivered
