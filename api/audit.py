"""The signed-in user's own audit trail, as JSON.

    GET /api/audit?agent=&since=&until=&limit=&cursor=

Newest first, paginated with an opaque cursor (`next_cursor` of the previous page). Only the
signed-in user's chain is ever read: there is no parameter naming a user, and a cursor is a
position in the caller's own chain, so one user cannot reach another's events.

Wiring: the router reads the session factory from `request.app.state.sessions` (as
`create_app` sets it) and the user from the `signed_in_user` dependency, which by default asks
`request.app.state.services` (an `api.common.Services`); an app with its own sign-in
dependency overrides it: `app.dependency_overrides[audit.signed_in_user] = ...`.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import AfterValidator, BaseModel, BeforeValidator
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.common import PLAIN_TEXT
from delegation import audit
from models import AuditEvent

MAX_LIMIT = 200
_CURSOR = re.compile(r"^[0-9]{1,18}$")


@dataclass(frozen=True)
class Viewer:
    """Who is asking: a signed-in user."""

    user_id: uuid.UUID
    subject: str


def signed_in_user(request: Request) -> Viewer:
    """The signed-in user, or 401."""
    services = getattr(request.app.state, "services", None)
    current = services.signed_in(request) if services is not None else None
    if current is None:
        raise HTTPException(status_code=401, detail="Sign in first.")
    _browser, user = current
    return Viewer(user.id, user.subject)


class AuditEventOut(BaseModel):
    id: int
    seq: int
    at: dt.datetime
    action: str
    actor_type: str
    actor: str | None
    agent: str | None
    client_id: str | None
    delegation_id: uuid.UUID | None
    run_id: uuid.UUID | None
    request_id: str | None
    detail: dict[str, Any]
    summary: str
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    user: str
    events: list[AuditEventOut]
    next_cursor: str | None


def _sessions(request: Request) -> sessionmaker[Session]:
    sessions: sessionmaker[Session] = request.app.state.sessions
    return sessions


_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _iso_only(value: object) -> object:
    """Refuse what pydantic would also take for a date-time (a number of seconds since 1970):
    the schema promises ISO 8601, and a client sending anything else has a bug."""
    if isinstance(value, str) and not _ISO_DATE.match(value):
        raise ValueError("expected an ISO 8601 date-time, e.g. 2026-01-31T00:00:00Z")
    return value


def _utc(value: dt.datetime) -> dt.datetime:
    """In UTC (no zone means UTC); a moment outside the calendar in UTC is refused (422)
    rather than overflowing while the query is built."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("date-time out of range") from None


IsoDateTime = Annotated[dt.datetime, BeforeValidator(_iso_only), AfterValidator(_utc)]


router = APIRouter(tags=["audit"])


@router.get("/api/audit", response_model=AuditPage,
            responses={400: {"description": "bad cursor"}, 401: {"description": "not signed in"}})
def audit_trail(
    viewer: Annotated[Viewer, Depends(signed_in_user)],
    sessions: Annotated[sessionmaker[Session], Depends(_sessions)],
    agent: Annotated[str | None, Query(max_length=255, pattern=PLAIN_TEXT,
                                       description="agent name or client_id")] = None,
    since: Annotated[IsoDateTime | None, Query(description="from (ISO 8601; UTC if no zone)")]
    = None,
    until: Annotated[IsoDateTime | None, Query(description="before (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=40,
                                        description="next_cursor of the previous page")] = None,
) -> AuditPage:
    """What was done as the signed-in user — by which agent (and client_id), or by whom when
    it was not the agent — newest first. Never a token, code, secret or request body."""
    chain = audit.chain_of(viewer.user_id)
    query = audit.filtered(select(AuditEvent), chains=[chain], agent=agent, since=since,
                           until=until)
    if cursor is not None:
        if not _CURSOR.match(cursor):
            raise HTTPException(status_code=400, detail="bad cursor")
        query = query.where(AuditEvent.seq < int(cursor))
    query = query.order_by(AuditEvent.seq.desc()).limit(limit + 1)
    with sessions() as session:
        events = list(session.scalars(query).all())
    more = len(events) > limit
    events = events[:limit]
    return AuditPage(
        user=viewer.subject,
        events=[AuditEventOut(
            id=e.id, seq=e.seq, at=e.occurred_at, action=e.action, actor_type=e.actor_type,
            actor=e.actor, agent=e.agent_name, client_id=e.client_id,
            delegation_id=e.delegation_id, run_id=e.run_id, request_id=e.request_id,
            detail=dict(e.detail or {}), summary=audit.summarize(e.detail),
            prev_hash=e.prev_hash, hash=e.hash) for e in events],
        next_cursor=str(events[-1].seq) if more and events else None,
    )
