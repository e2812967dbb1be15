"""Re-authorising a broken delegation: the link in the mail, and the grants page's action.

    GET /reauth/{token}                  the link: what broke, the scopes, one button
    GET /reauth/{token}/start            the button: signed in as the link's user, off to the
                                         AS; not signed in, sign in first
    GET /reauth/resume                   back from sign-in: on to the AS
    GET /reauth/delegation/{id}[/start]  the same for a signed-in user's own broken
                                         delegation (the grants page's "Re-authorise")

The button is a link, like `/connect/{agent}`: a form post that redirects to another origin
(the AS) is blocked by the pages' `form-action 'self'` policy. Opening the page changes
nothing (mail scanners that fetch links in mails use nothing up); starting only creates a
pending authorisation request, and a start forced on someone else's browser ends refused
(the signed-in user must be the link's).

The consent is the connect flow (`Connector.start_connect` with the delegation's scopes and
the link); the callback is `/oauth/callback`, whose repair uses the link up
(`delegation.reauth.on_repaired`). Only the delegation's own user repairs anything: a link
opened while signed in as someone else is refused here, and a consent given at the AS as
someone else is refused by the callback; either way the page says why and nothing changes.

The token never reaches the database or a log: the way through sign-in remembers the link
by its id in a signed, short-lived cookie scoped to /reauth (not in the sign-in request's
`return_to`), and the access log shows `/reauth/<redacted>`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import func, select

from api.auth import login_redirect
from api.browser import BrowserSession
from api.common import Services, parse_uuid, refused
from api.pages import error_page, render
from delegation import reauth
from delegation.connect import ConnectRefused
from delegation.mail import scope_words
from delegation.notify import REASONS
from models import JobRun, RunStatus

LINK_COOKIE = "behalf_reauth"
LINK_COOKIE_SECONDS = 15 * 60
_SALT = "behalf.reauth-link.v1"
_FIXED = ("resume", "delegation")


class RedactReauthTokens(logging.Filter):
    """Access-log records show `/reauth/<redacted>` instead of a link's token."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path = args[2]
            if path.startswith("/reauth/"):
                first = path[len("/reauth/"):].split("/", 1)[0].split("?", 1)[0]
                if first not in _FIXED:
                    record.args = (*args[:2], "/reauth/<redacted>", *args[3:])
        return True


def install_log_filter(logger_name: str = "uvicorn.access") -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RedactReauthTokens) for f in logger.filters):
        logger.addFilter(RedactReauthTokens())


def build(services: Services) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    deps = services.deps
    links = URLSafeTimedSerializer(deps.secret_key, salt=_SALT)
    install_log_filter()

    def remember_link(response: Response, link_id: uuid.UUID) -> None:
        response.set_cookie(
            LINK_COOKIE, links.dumps(str(link_id)), max_age=LINK_COOKIE_SECONDS,
            path="/reauth", httponly=True, secure=services.cookie.settings.secure,
            samesite="lax")

    def remembered_link(request: Request) -> uuid.UUID | None:
        raw = request.cookies.get(LINK_COOKIE)
        if not raw or len(raw) > 500:
            return None
        try:
            value = links.loads(raw, max_age=LINK_COOKIE_SECONDS)
        except BadSignature:
            return None
        return parse_uuid(str(value))

    def forget_link(response: Response) -> None:
        response.delete_cookie(LINK_COOKIE, path="/reauth", httponly=True,
                               secure=services.cookie.settings.secure, samesite="lax")

    def landing(request: Request, target: reauth.Target, action: str) -> Response:
        current = services.signed_in(request)
        if current is not None and current[1].id != target.user_id:
            return other_account(current)
        with deps.sessions() as db:
            jobs = [{"job": job, "parked": int(n)} for job, n in db.execute(
                select(JobRun.job, func.count())
                .where(JobRun.delegation_id == target.delegation_id,
                       JobRun.status == RunStatus.PARKED.value)
                .group_by(JobRun.job).order_by(JobRun.job)).tuples()]
        page = render(
            "reauth.html", title=f"Re-authorise {target.agent_name}",
            agent=target.agent_name, since=target.broken_at,
            reason=REASONS.get(target.status_reason or "", "it can no longer use its access"),
            jobs=jobs, scopes=[{"scope": s, "words": scope_words(s)}
                               for s in target.scopes if s != "openid"],
            expires_at=target.expires_at, action=action, signed_in=current is not None,
            user=current[1].subject if current else None,
            csrf_token=current[0].csrf if current else None)
        return page

    def other_account(current: tuple[BrowserSession, Any]) -> HTMLResponse:
        session, user = current
        return render(
            "error.html", status=403, title="This is not your link",
            message=f"You are signed in as {user.subject}, but this re-authorisation is for "
                    "another account. Nothing was changed. Sign out (top right), then open the "
                    "link again and sign in as the person it was sent to.",
            retry_url=None, signed_in=True, user=user.subject, csrf_token=session.csrf)

    def link_refused(exc: reauth.LinkRefused, request: Request) -> HTMLResponse:
        return error_page(exc.status, str(exc), signed_in=services.signed_in(request) is not None)

    def start(target: reauth.Target, session: BrowserSession, user_id: uuid.UUID) -> Response:
        try:
            url = services.connector.start_connect(
                target.agent_name, user_id=user_id, browser=session.binding,
                scopes=list(target.scopes), reauth_link_id=target.link_id)
        except ConnectRefused as exc:
            return refused(exc, signed_in=True)
        response = RedirectResponse(url, status_code=303)
        forget_link(response)
        return response

    # --- after sign-in (declared before /reauth/{token}) --------------------------------

    @router.get("/reauth/resume")
    def resume(request: Request) -> Response:
        link_id = remembered_link(request)
        if link_id is None:
            return error_page(400, "This re-authorisation was started in another browser or "
                              "too long ago. Open the link from your mail again.")
        try:
            with deps.sessions() as db:
                target = reauth.find_by_id(db, link_id, deps.clock.now())
        except reauth.LinkRefused as exc:
            return link_refused(exc, request)
        current = services.signed_in(request)
        if current is None:
            return login_redirect("/reauth/resume")
        if current[1].id != target.user_id:
            response = other_account(current)
            forget_link(response)
            return response
        return start(target, current[0], current[1].id)

    # --- the grants page's action --------------------------------------------------------

    @router.get("/reauth/delegation/{delegation_id}")
    def delegation_page(delegation_id: str, request: Request) -> Response:
        parsed = parse_uuid(delegation_id)
        current = services.signed_in(request)
        if current is None:
            return login_redirect(f"/reauth/delegation/{parsed}" if parsed else "/grants")
        if parsed is None:
            return error_page(404, "No such grant.", signed_in=True)
        try:
            with deps.sessions() as db:
                target = reauth.broken_target(db, parsed, current[1].id)
        except reauth.LinkRefused as exc:
            return error_page(exc.status, str(exc), signed_in=True)
        return landing(request, target, f"/reauth/delegation/{parsed}/start")

    @router.get("/reauth/delegation/{delegation_id}/start")
    def delegation_start(delegation_id: str, request: Request) -> Response:
        parsed = parse_uuid(delegation_id)
        current = services.signed_in(request)
        if current is None:
            return login_redirect(f"/reauth/delegation/{parsed}" if parsed else "/grants")
        if parsed is None:
            return error_page(404, "No such grant.", signed_in=True)
        try:
            with deps.sessions() as db:
                target = reauth.broken_target(db, parsed, current[1].id)
        except reauth.LinkRefused as exc:
            return error_page(exc.status, str(exc), signed_in=True)
        return start(target, current[0], current[1].id)

    # --- the link ----------------------------------------------------------------------------

    @router.get("/reauth/{token}")
    def link_page(token: str, request: Request) -> Response:
        try:
            with deps.sessions() as db:
                target = reauth.find(db, token, deps.clock.now())
        except reauth.LinkRefused as exc:
            return link_refused(exc, request)
        return landing(request, target, f"/reauth/{token}/start")

    @router.get("/reauth/{token}/start")
    def link_start(token: str, request: Request) -> Response:
        try:
            with deps.sessions() as db:
                target = reauth.find(db, token, deps.clock.now())
        except reauth.LinkRefused as exc:
            return link_refused(exc, request)
        current = services.signed_in(request)
        if current is None:
            response = login_redirect("/reauth/resume")
            assert target.link_id is not None
            remember_link(response, target.link_id)
            return response
        if current[1].id != target.user_id:
            return other_account(current)
        return start(target, current[0], current[1].id)

    return router
