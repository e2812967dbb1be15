"""The signed-in user's grants: a page, the same as JSON, and revocation.

    GET  /grants                      HTML, works without JavaScript
    GET  /api/grants                  JSON (with the CSRF token a client must send back)
    POST /api/grants/{id}/revoke      CSRF-protected; a form post is answered with a redirect

A user only ever sees their own delegations; anyone else's id answers 404, exactly like an id
that does not exist.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import login_redirect
from api.common import Services, is_form, log, parse_uuid, read_form
from api.pages import error_page, render
from delegation import revocation
from delegation.providers import NAME_PATTERN, ROLE_AGENT
from models import Agent, AuditEvent, Delegation, DelegationStatus, Provider, Schedule, User

RECENT_ACTIVITY = 5
_SUMMARY_KEYS = ("method", "path", "status", "job", "reason", "scopes_granted", "version")


class ScheduleOut(BaseModel):
    id: uuid.UUID
    job: str
    cron: str
    timezone: str
    paused: bool
    next_run_at: dt.datetime | None


class ActivityOut(BaseModel):
    at: dt.datetime
    action: str
    actor_type: str
    actor: str | None
    detail: dict[str, Any]
    summary: str


class GrantOut(BaseModel):
    id: uuid.UUID
    agent: str
    client_id: str
    scopes_requested: list[str]
    scopes_granted: list[str]
    status: str
    status_reason: str | None
    granted_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    schedules: list[ScheduleOut]
    recent_activity: list[ActivityOut]
    # Re-authorisation (issue #7): where a broken grant is repaired (a page: GET it, or send
    # the user there); None unless the status is "broken".
    reauthorize_url: str | None = None


class GrantsOut(BaseModel):
    user: str
    csrf_token: str
    grants: list[GrantOut]


class RevokeOut(BaseModel):
    id: uuid.UUID
    status: str
    already_revoked: bool


class ErrorOut(BaseModel):
    error: str
    message: str


class AvailableAgent(BaseModel):
    name: str
    scopes: list[str]


def _summary(detail: dict[str, Any]) -> str:
    parts = []
    for key in _SUMMARY_KEYS:
        value = detail.get(key)
        if value is None or value == "":
            continue
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{key}={shown}"[:80])
    return ", ".join(parts)


def load_grants(session: Session, user_id: uuid.UUID) -> list[GrantOut]:
    rows = session.execute(
        select(Delegation, Agent).join(Agent, Delegation.agent_id == Agent.id)
        .where(Delegation.user_id == user_id).order_by(Agent.name)
    ).all()
    schedules = session.scalars(
        select(Schedule).where(Schedule.user_id == user_id).order_by(Schedule.job)
    ).all()
    grants = []
    for delegation, agent in (row._tuple() for row in rows):
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.user_id == user_id, AuditEvent.delegation_id == delegation.id)
            .order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc())
            .limit(RECENT_ACTIVITY)
        ).all()
        grants.append(GrantOut(
            id=delegation.id, agent=agent.name, client_id=agent.client_id,
            scopes_requested=list(delegation.requested_scopes or []),
            scopes_granted=list(delegation.granted_scopes or []), status=delegation.status,
            status_reason=delegation.status_reason, granted_at=delegation.granted_at,
            last_used_at=delegation.last_used_at, revoked_at=delegation.revoked_at,
            schedules=[ScheduleOut(id=s.id, job=s.job, cron=s.cron, timezone=s.timezone,
                                   paused=s.paused, next_run_at=s.next_run_at)
                       for s in schedules if s.agent_id == agent.id],
            recent_activity=[ActivityOut(at=e.occurred_at, action=e.action,
                                         actor_type=e.actor_type, actor=e.actor,
                                         detail=dict(e.detail or {}),
                                         summary=_summary(e.detail or {}))
                             for e in events],
            reauthorize_url=f"/reauth/delegation/{delegation.id}"
            if delegation.status == DelegationStatus.BROKEN else None,
        ))
    return grants


def load_available(session: Session, user: User, environment: str,
                   grants: list[GrantOut]) -> list[AvailableAgent]:
    """Agents of the user's AS not connected yet (revoked or broken ones have a link)."""
    taken = {g.agent for g in grants}
    agents = session.scalars(
        select(Agent).join(Provider, Agent.provider_id == Provider.id)
        .where(Agent.environment == environment, Agent.role == ROLE_AGENT,
               Agent.status == "active", Provider.issuer == user.issuer)
        .order_by(Agent.name)
    ).all()
    return [AvailableAgent(name=a.name, scopes=list(a.scopes or []))
            for a in agents if a.name not in taken]


def _not_signed_in() -> JSONResponse:
    return JSONResponse({"error": "not_signed_in", "message": "Sign in first."},
                        status_code=401)


def _not_found() -> JSONResponse:
    return JSONResponse({"error": "not_found", "message": "No such grant."}, status_code=404)


def build(services: Services) -> APIRouter:
    router = APIRouter()
    deps = services.deps

    @router.get("/grants", include_in_schema=False)
    def grants_page(request: Request, connected: str | None = None,
                    revoked: str | None = None) -> Response:
        current = services.signed_in(request)
        if current is None:
            return login_redirect("/grants")
        session, user = current
        with deps.sessions() as db:
            grants = load_grants(db, user.id)
            available = load_available(db, user, deps.environment, grants)
        # Notices only name the user's own grants: a crafted link cannot make one up.
        connected_name = next((g.agent for g in grants if connected and g.agent == connected
                               and NAME_PATTERN.fullmatch(connected)), None)
        revoked_name = next((g.agent for g in grants if revoked and str(g.id) == revoked
                             and g.status == "revoked"), None)
        return render("grants.html", title="Your grants", user=user.subject,
                      csrf_token=session.csrf, grants=grants, available=available,
                      connected=connected_name, revoked=revoked_name)

    @router.get("/api/grants", response_model=GrantsOut, tags=["grants"],
                responses={401: {"model": ErrorOut}})
    def api_grants(request: Request) -> Any:
        """The signed-in user's delegations, newest activity first within each."""
        current = services.signed_in(request)
        if current is None:
            return _not_signed_in()
        session, user = current
        with deps.sessions() as db:
            grants = load_grants(db, user.id)
        return GrantsOut(user=user.subject, csrf_token=session.csrf, grants=grants)

    @router.post("/api/grants/{grant_id}/revoke", response_model=RevokeOut, tags=["grants"],
                 responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut},
                            404: {"model": ErrorOut}})
    async def revoke(
        grant_id: str, request: Request,
        x_csrf_token: str | None = Header(None, max_length=200,
                                          description="the csrf_token of GET /api/grants"),
    ) -> Any:
        """Revoke one of the signed-in user's delegations, at once and for good.

        Its jobs stop, no token of it is handed out again, and its tokens are revoked at the
        authorization server and then destroyed. Revoking a revoked grant changes nothing.
        """
        form_post = is_form(request)
        token = x_csrf_token
        if form_post:
            form = await read_form(request)
            if form is None:
                return error_page(400, "This request is too large or malformed. Nothing was "
                                  "revoked.")
            token = form.get("csrf_token")
        current = await run_in_threadpool(services.signed_in, request)
        if current is None:
            return login_redirect("/grants") if form_post else _not_signed_in()
        session, user = current
        origin = request.headers.get("origin")
        if not session.csrf_ok(token) or (origin is not None and origin != deps.origin):
            if form_post:
                return error_page(403, "This request did not come from this site's page. "
                                  "Nothing was revoked.", signed_in=True)
            return JSONResponse({"error": "csrf", "message": "Missing or wrong CSRF token."},
                                status_code=403)
        delegation_id = parse_uuid(grant_id)
        if delegation_id is None:
            return error_page(404, "No such grant.", signed_in=True) if form_post \
                else _not_found()
        try:
            result = await run_in_threadpool(
                revocation.revoke, deps.sessions, deps.clock, delegation_id,
                actor_type="user", actor=user.subject, owner_user_id=user.id)
        except revocation.NotFound:
            return error_page(404, "No such grant.", signed_in=True) if form_post \
                else _not_found()
        if not result.already:
            try:
                await run_in_threadpool(deps.publish_stop, delegation_id)
            except Exception:  # the revocation is committed; the outbox also carries the stop
                log.warning("stop push for %s failed; the outbox will deliver it",
                            delegation_id, exc_info=True)
        if form_post:
            return RedirectResponse(f"/grants?revoked={delegation_id}", status_code=303)
        return RevokeOut(id=delegation_id, status="revoked", already_revoked=result.already)

    return router
