"""The audit trail: one event model, appended to per-user hash chains.

Each event's hash covers its content and the previous hash of its chain; a chain head row per
chain is locked while appending, so concurrent writers for *different* users never contend and
writers for the same user serialise on one small row. Event tags read `subject:object:action`.
Nothing secret goes in: callers pass ids, names, a method and a path template, never a token,
code, secret, query string or body.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import AuditEvent, AuditHead

GENESIS = "0" * 64
SYSTEM_CHAIN = "system"


@dataclass(frozen=True)
class AuditRecord:
    """"user X, via agent Z (client_id), did Y" — plus who acted when it was not the agent."""

    action: str
    actor_type: str = "agent"  # agent | user | operator | system | provider
    actor: str | None = None
    user_id: uuid.UUID | None = None
    user_subject: str | None = None
    agent_name: str | None = None
    client_id: str | None = None
    delegation_id: uuid.UUID | None = None
    run_id: uuid.UUID | None = None
    request_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def chain(self) -> str:
        return str(self.user_id) if self.user_id else SYSTEM_CHAIN


def event_hash(event: AuditEvent) -> str:
    """The hash of an event: canonical JSON of every field but the hash itself."""
    doc = {
        "chain": event.chain,
        "seq": event.seq,
        "occurred_at": event.occurred_at.astimezone(dt.UTC).isoformat(),
        "action": event.action,
        "user_id": str(event.user_id) if event.user_id else None,
        "user_subject": event.user_subject,
        "agent_name": event.agent_name,
        "client_id": event.client_id,
        "actor_type": event.actor_type,
        "actor": event.actor,
        "delegation_id": str(event.delegation_id) if event.delegation_id else None,
        "run_id": str(event.run_id) if event.run_id else None,
        "request_id": event.request_id,
        "detail": event.detail,
        "prev_hash": event.prev_hash,
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def append(session: Session, record: AuditRecord, now: dt.datetime) -> AuditEvent:
    """Append `record` to its chain inside the caller's transaction."""
    chain = record.chain
    head = session.scalars(
        select(AuditHead).where(AuditHead.chain == chain).with_for_update()
    ).one_or_none()
    if head is None:
        head = AuditHead(chain=chain, seq=0, hash=GENESIS)
        session.add(head)
    event = AuditEvent(
        chain=chain,
        seq=head.seq + 1,
        occurred_at=now,
        action=record.action,
        user_id=record.user_id,
        user_subject=record.user_subject,
        agent_name=record.agent_name,
        client_id=record.client_id,
        actor_type=record.actor_type,
        actor=record.actor,
        delegation_id=record.delegation_id,
        run_id=record.run_id,
        request_id=record.request_id,
        detail=dict(record.detail),
        prev_hash=head.hash,
    )
    event.hash = event_hash(event)
    head.seq, head.hash = event.seq, event.hash
    session.add(event)
    return event
