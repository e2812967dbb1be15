"""`behalf delegations list | notify | notifications` and `behalf revoke`."""

from __future__ import annotations

import json
import uuid

import click
from sqlalchemy import select

from behalf.cli.common import (
    AppContext,
    domain_errors,
    emit,
    json_option,
    operator_option,
    pass_app,
)
from behalf.notifications import notifier
from behalf.relay import publish_stop_now, relay_pending
from delegation import revocation
from delegation.notify import MAIL_TOPIC, NoSuchDelegation, NotBroken, notifications
from models import Agent, Delegation, DelegationStatus, User


@click.group("delegations")
def delegations() -> None:
    """Users' delegations to agents."""


@delegations.command("list")
@click.option("--status", type=click.Choice([s.value for s in DelegationStatus]))
@click.option("--user", "user", help="Only this user's (subject at the AS).")
@json_option
@pass_app
def list_delegations(app: AppContext, status: str | None, user: str | None,
                     as_json: bool) -> None:
    """List delegations with their status (no secrets)."""
    with app.deps.sessions() as session:
        query = select(Delegation, User.subject, Agent.name, Agent.client_id)\
            .join(User, Delegation.user_id == User.id)\
            .join(Agent, Delegation.agent_id == Agent.id).order_by(Delegation.granted_at.desc())
        if status:
            query = query.where(Delegation.status == status)
        if user:
            query = query.where(User.subject == user)
        rows = [
            {"delegation_id": str(d.id), "user": subject, "agent": agent, "client_id": client,
             "status": d.status, "reason": d.status_reason or "",
             "scopes": " ".join(d.granted_scopes or []),
             "granted_at": d.granted_at.isoformat(),
             "last_used_at": d.last_used_at.isoformat() if d.last_used_at else "",
             "broken_at": d.broken_at.isoformat() if d.broken_at else ""}
            for d, subject, agent, client in session.execute(query).all()
        ]
    emit(rows, as_json, ["delegation_id", "user", "agent", "status", "reason", "scopes",
                         "last_used_at"])


@click.command("revoke")
@click.option("--delegation", "delegation_id", required=True, type=click.UUID)
@operator_option
@json_option
@pass_app
@domain_errors
def revoke(app: AppContext, delegation_id: uuid.UUID, operator: str, as_json: bool) -> None:
    """Revoke a delegation: unusable when this returns, running jobs stopped, tokens revoked
    at the provider and destroyed."""
    deps = app.deps
    try:
        result = revocation.revoke(deps.sessions, deps.clock, delegation_id,
                                   actor_type="operator", actor=operator)
    except revocation.NotFound:
        raise click.BadParameter(f"no delegation {delegation_id}",
                                 param_hint="--delegation") from None
    if not result.already:
        publish_stop_now(deps, delegation_id, "delegation_revoked")
        relay_pending(deps, topics=[revocation.STOP_TOPIC, revocation.REVOKE_AT_PROVIDER_TOPIC])
    emit([{"delegation_id": str(delegation_id),
           "status": "revoked" if not result.already else "already revoked",
           "queued_runs_cancelled": result.runs_cancelled}], as_json,
         ["delegation_id", "status", "queued_runs_cancelled"])


# --- re-authorisation mails (issue #7) --------------------------------------------------------


_NOTIFICATION_COLUMNS = ["created_at", "user", "agent", "kind", "requested_by", "delivery",
                         "notified_at", "state", "expires_at"]


@delegations.command("notify")
@click.option("--delegation", "delegation_id", required=True, type=click.UUID)
@operator_option
@json_option
@pass_app
@domain_errors
def notify(app: AppContext, delegation_id: uuid.UUID, operator: str, as_json: bool) -> None:
    """Mail the user a fresh re-authorisation link for a broken delegation, now (audited; not
    held back by the de-duplication or the daily cap)."""
    deps = app.deps
    try:
        link = notifier(deps).request_link(delegation_id, operator)
    except (NoSuchDelegation, NotBroken) as exc:
        raise click.BadParameter(str(exc), param_hint="--delegation") from None
    relay_pending(deps, topics=[MAIL_TOPIC])
    with deps.sessions() as session:
        rows = [row for row in notifications(session, deps.clock.now(),
                                             delegation_id=delegation_id)
                if row["link_id"] == str(link.id)]
    emit(rows, as_json, ["link_id", "user", "email", "agent", "delivery", "notified_at",
                         "expires_at"])


@delegations.command("notifications")
@click.option("--delegation", "delegation_id", type=click.UUID, help="Only this delegation's.")
@click.option("--mail", "mail_link", type=click.UUID, metavar="LINK_ID",
              help="Print this link's mail as it was sent, live link included (the embedded "
                   "default only: dev with no BEHALF_SMTP_URL, where the log is the mailbox).")
@json_option
@pass_app
@domain_errors
def list_notifications(app: AppContext, delegation_id: uuid.UUID | None,
                       mail_link: uuid.UUID | None, as_json: bool) -> None:
    """Who was mailed a re-authorisation link, when, why, and what became of it."""
    deps = app.deps
    if mail_link is not None:
        if deps.settings.production or deps.settings.smtp_url:
            raise click.UsageError("--mail: only on the embedded default (dev, no "
                                   "BEHALF_SMTP_URL); elsewhere the mail went to the user")
        try:
            mail = notifier(deps).render_mail(mail_link)
        except LookupError as exc:
            raise click.BadParameter(str(exc), param_hint="--mail") from None
        if as_json:
            click.echo(json.dumps({"to": mail.to, "subject": mail.subject,
                                   "message_id": mail.message_id, "text": mail.text,
                                   "html": mail.html}, indent=2))
        else:
            click.echo(f"To: {mail.to or '(no address known)'}\nSubject: {mail.subject}\n"
                       f"Message-ID: {mail.message_id}\n\n{mail.text}")
        return
    with deps.sessions() as session:
        rows = notifications(session, deps.clock.now(), delegation_id=delegation_id)
    emit(rows, as_json, ["link_id", "delegation_id", *_NOTIFICATION_COLUMNS])
