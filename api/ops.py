"""Operator endpoints under `/api/ops`: parked runs, broken delegations, re-queue.

Authenticated separately from users: `Authorization: Bearer <BEHALF_OPS_TOKEN>`, compared in
constant time. A user's session gives no access. With no ops token configured the whole
router answers 404, as if it did not exist. Re-queues are audited with the operator's name
given in the request body (the token says that an operator acts; the name says which).

The router reads `sessions`, `clock` and `ops_token` from `request.app.state`.
"""

from __future__ import annotations

import hmac
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.common import AGENT_NAME, PLAIN_TEXT
from delegation.clock import Clock, SystemClock
from delegation.requeue import Actor, RequeueError, requeue
from models import Agent, Delegation, DelegationStatus, JobRun, RunStatus, User

MAX_LIMIT = 1000


def require_operator(request: Request) -> None:
    """404 when the ops API is off; 401 unless the bearer token is the ops token."""
    expected = str(getattr(request.app.state, "ops_token", "") or "")
    if not expected:
        raise HTTPException(status_code=404, detail="Not Found")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode(), expected.encode()
    ):
        raise HTTPException(status_code=401, detail="operator token required",
                            headers={"WWW-Authenticate": 'Bearer realm="behalf-ops"'})


class OpsError(BaseModel):
    detail: str


router = APIRouter(prefix="/api/ops", tags=["ops"], dependencies=[Depends(require_operator)],
                   responses={401: {"model": OpsError, "description": "no operator token"},
                              404: {"model": OpsError,
                                    "description": "the operator API is off"}})


def _sessions(request: Request) -> sessionmaker[Session]:
    sessions: sessionmaker[Session] = request.app.state.sessions
    return sessions


def _clock(request: Request) -> Clock:
    clock: Clock | None = getattr(request.app.state, "clock", None)
    return clock or SystemClock()


class RequeueRequest(BaseModel):
    """Exactly one of `run_id`, `delegation_id` or `agent` (the agent's name)."""

    run_id: uuid.UUID | None = None
    delegation_id: uuid.UUID | None = None
    agent: str | None = Field(default=None, max_length=100, pattern=AGENT_NAME)
    operator: str = Field(min_length=1, max_length=100, pattern=PLAIN_TEXT,
                          description="Who is re-queuing (recorded in the audit trail).")

    @model_validator(mode="after")
    def _one_selector(self) -> RequeueRequest:
        given = [v for v in (self.run_id, self.delegation_id, self.agent) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of run_id, delegation_id or agent")
        return self


class RequeueResponse(BaseModel):
    matched: int
    requeued: int
    already_handled: int


@router.get("/runs")
def list_runs(
    request: Request,
    status: Annotated[RunStatus | None, Query()] = None,
    agent: Annotated[str | None, Query(max_length=100, pattern=AGENT_NAME)] = None,
    delegation_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> dict[str, Any]:
    """Runs, newest first, optionally by status (e.g. `parked`), agent name or delegation."""
    query = (
        select(JobRun, User.subject, Agent.name)
        .join(User, JobRun.user_id == User.id).join(Agent, JobRun.agent_id == Agent.id)
        .order_by(JobRun.queued_at.desc(), JobRun.id).limit(limit)
    )
    if status is not None:
        query = query.where(JobRun.status == status.value)
    if agent is not None:
        query = query.where(Agent.name == agent)
    if delegation_id is not None:
        query = query.where(JobRun.delegation_id == delegation_id)
    with _sessions(request)() as session:
        rows = session.execute(query).all()
    return {"runs": [
        {"run_id": str(run.id), "job": run.job, "user": subject, "agent": agent_name,
         "delegation_id": str(run.delegation_id) if run.delegation_id else None,
         "schedule_id": str(run.schedule_id) if run.schedule_id else None,
         "slot_at": run.slot_at.isoformat() if run.slot_at else None,
         "status": run.status, "reason": run.reason, "attempts": run.attempts,
         "queued_at": run.queued_at.isoformat(),
         "finished_at": run.finished_at.isoformat() if run.finished_at else None}
        for run, subject, agent_name in rows
    ]}


@router.get("/delegations")
def list_delegations(
    request: Request,
    status: Annotated[DelegationStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> dict[str, Any]:
    """Delegations (e.g. `status=broken`) with their count of parked runs. No token data."""
    parked = (
        select(func.count()).select_from(JobRun)
        .where(JobRun.delegation_id == Delegation.id, JobRun.status == RunStatus.PARKED.value)
        .correlate(Delegation).scalar_subquery()
    )
    query = (
        select(Delegation.id, Delegation.status, Delegation.status_reason, Delegation.broken_at,
               Delegation.granted_at, Delegation.last_used_at, User.subject, Agent.name,
               parked)
        .join(User, Delegation.user_id == User.id).join(Agent, Delegation.agent_id == Agent.id)
        .order_by(Delegation.updated_at.desc(), Delegation.id).limit(limit)
    )
    if status is not None:
        query = query.where(Delegation.status == status.value)
    with _sessions(request)() as session:
        rows = session.execute(query).all()
    return {"delegations": [
        {"delegation_id": str(row.id), "user": row.subject, "agent": row.name,
         "status": row.status, "status_reason": row.status_reason,
         "broken_at": row.broken_at.isoformat() if row.broken_at else None,
         "granted_at": row.granted_at.isoformat(),
         "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
         "parked_runs": int(row[8])}
        for row in rows
    ]}


@router.post("/requeue", responses={
    400: {"model": OpsError, "description": "the body is not JSON"},
    404: {"model": OpsError, "description": "no such run, delegation or agent"},
    409: {"model": OpsError, "description": "the agent's name is ambiguous"}})
def requeue_runs(request: Request, body: RequeueRequest) -> RequeueResponse:
    """Re-queue parked runs (exactly once, whoever else re-queues at the same moment)."""
    sessions = _sessions(request)
    agent_id = None
    if body.agent is not None:
        with sessions() as session:
            ids = session.scalars(select(Agent.id).where(Agent.name == body.agent)).all()
        if len(ids) != 1:
            raise HTTPException(status_code=404 if not ids else 409,
                                detail=f"no agent named {body.agent!r}" if not ids
                                else f"agent {body.agent!r} exists in several environments")
        agent_id = ids[0]
    try:
        result = requeue(sessions, _clock(request), Actor(name=body.operator, via="api"),
                         run_id=body.run_id, delegation_id=body.delegation_id,
                         agent_id=agent_id)
    except RequeueError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    return RequeueResponse(matched=result.matched, requeued=result.requeued,
                           already_handled=result.already)
