"""Helpers for audit-trail tests: write a small trail, then tamper with it as an attacker
with write access to the database would."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from delegation import audit
from delegation.clock import FrozenClock


def call_record(user_id: uuid.UUID | None, n: int = 0, **overrides: Any) -> audit.AuditRecord:
    fields: dict[str, Any] = {
        "action": "api:call", "actor_type": "agent", "actor": "reporter", "user_id": user_id,
        "user_subject": f"user-{str(user_id)[:4]}" if user_id else None,
        "agent_name": "reporter", "client_id": "client-reporter",
        "delegation_id": uuid.UUID(int=n + 1), "run_id": uuid.UUID(int=n + 2),
        "request_id": f"req-{n}",
        "detail": {"method": "GET", "path": "/v2/reports/{id}", "status": 200, "n": n},
    }
    fields.update(overrides)
    return audit.AuditRecord(**fields)


def write_trail(sessions: sessionmaker[Session], clock: FrozenClock, users: list[uuid.UUID],
                per_user: int) -> None:
    """`per_user` events for each user, interleaved across users, one transaction each."""
    for n in range(per_user):
        for user in users:
            clock.advance(1)
            with sessions.begin() as session:
                audit.append(session, call_record(user, n), clock.now())


def tamper(engine: Engine, sql: str, **params: Any) -> None:
    """Run `sql` as the owner would to get round the append-only trigger (PostgreSQL: with
    triggers off for the session, as a superuser can; SQLite has no trigger)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text(sql), params)


def event_id(engine: Engine, chain: str, seq: int) -> int:
    with engine.connect() as conn:
        value = conn.scalar(text("SELECT id FROM audit_events WHERE chain = :c AND seq = :s"),
                            {"c": chain, "s": seq})
    assert value is not None
    return int(value)


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]
