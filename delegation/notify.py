"""Telling a user that a delegation broke, with a link that repairs it.

Three outbox topics, relayed like every other (`delegation.outbox`); each handler is idempotent:

    delegation.broken          written by `DelegationStore.mark_broken`: decide the first notice
    delegation.reauth_notify   a reminder, or a notice the daily cap put off, decided when due
    delegation.reauth_mail     send one mail, naming only its link (`reauth_links` row)

Deciding happens in one transaction that locks the user's row, so two delegations of one user
breaking at once are decided one after the other:

- only a delegation that is still broken is mailed about (repaired or revoked meanwhile:
  nothing); one failed run or fifty, `mark_broken` breaks it once (compare-and-set), so there
  is one `delegation.broken` per break, not one per run;
- a delegation mailed about within `quiet` (a day) is not mailed about again when it breaks
  again: flapping sends one mail a day at most;
- if `reminder_after` (48 h) after the break it is still broken by that same break, a reminder
  (a day after the latest mail at the earliest);
- at most `per_user_per_day` mails per user in any 24 hours: a notice over the cap is put off
  until the window has room again, not dropped;
- an operator's request (`request_link`, `behalf delegations notify`) is neither de-duplicated
  nor capped (it counts towards the cap) and is audited with their name.

Every mail gets a link of its own, created with the decision (only the token's hash is stored,
see `delegation.reauth`); the mail is rendered when it is sent.

Sending, exactly once as far as SMTP allows. The outbox redelivers a message whose relay died
before marking it sent; so a mail's own row records the outcome (`reauth_links.delivery`,
`notified_at`) in a transaction of its own right after the SMTP server accepted the mail, and
a redelivery that finds it set sends nothing. An SMTP outage raises `MailUnavailable`: nothing
is recorded, the outbox retries with backoff, and the mail goes out once the server is back.
What remains: a crash (or a lost connection) between the server's "250 accepted" and that
commit, a window of milliseconds, sends the mail again. The second copy is identical, down to
its Message-ID (derived from the link id) and its link (derived, not stored), so receiving
systems that de-duplicate by Message-ID show it once, and either copy's link works.

Where the link's plaintext lives: nowhere at rest. It is derived from the secret key when the
mail is rendered and exists in the SMTP message (and, in dev with no SMTP server, in the log:
`LogMailer`). In production without SMTP the logged mail carries a placeholder instead of the
link. Who was notified when: `notifications()` (the links and how their mails went) and the
audit trail (`delegation:notified`, `delegation:notification:*`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from delegation import audit, outbox
from delegation.clock import Clock
from delegation.errors import BehalfError
from delegation.mail import (
    CHANNEL_SMTP,
    Mail,
    Mailer,
    MailRejected,
    MailRenderer,
    message_id,
)
from delegation.reauth import KIND_BROKEN, KIND_OPERATOR, KIND_REMINDER, LinkKeys
from models import (
    Agent,
    Delegation,
    DelegationStatus,
    JobRun,
    OutboxMessage,
    ReauthLink,
    RunStatus,
    Schedule,
    User,
)

log = logging.getLogger(__name__)

BROKEN_TOPIC = "delegation.broken"
NOTIFY_TOPIC = "delegation.reauth_notify"
MAIL_TOPIC = "delegation.reauth_mail"
TEMPLATE = "reauth"
DAY = dt.timedelta(days=1)
WITHHELD = "(link withheld: no SMTP server is configured and links are logged only in dev)"

DELIVERY_SMTP = "smtp"
DELIVERY_LOG = "log"
DELIVERY_UNDELIVERABLE = "undeliverable"
DELIVERY_REJECTED = "rejected"
DELIVERY_SKIPPED = "skipped"
_NOT_MAILED = (DELIVERY_UNDELIVERABLE, DELIVERY_REJECTED, DELIVERY_SKIPPED)

REASONS = {
    "invalid_grant": "your authorization server no longer accepts its access (the permission "
                     "was withdrawn, expired, or replaced)",
    "refresh_response_lost": "its access was lost while being renewed (the authorization "
                             "server's answer never arrived)",
}


class NotBroken(BehalfError):
    """Only a broken delegation can be re-authorised (the message says what it is)."""


class NoSuchDelegation(BehalfError):
    pass


@dataclass(frozen=True)
class NotifyPolicy:
    link_ttl: dt.timedelta = dt.timedelta(days=7)
    reminder_after: dt.timedelta | None = dt.timedelta(hours=48)
    per_user_per_day: int = 3
    quiet: dt.timedelta = DAY


@dataclass(frozen=True)
class Decision:
    outcome: str  # queued | skipped | deferred
    reason: str
    link_id: uuid.UUID | None = None
    retry_at: dt.datetime | None = None


@dataclass(frozen=True)
class Sent:
    link_id: uuid.UUID
    delivery: str | None  # None: nothing done (already done before, or no such link)


# --- deciding ------------------------------------------------------------------------------


def _add_once(session: Session, topic: str, payload: dict[str, Any], now: dt.datetime, *,
              available_at: dt.datetime, dedupe_key: str) -> bool:
    """An outbox entry unless one with this key exists (a redelivered decision adds none)."""
    exists = session.scalar(select(OutboxMessage.id).where(
        OutboxMessage.dedupe_key == dedupe_key))
    if exists is not None:
        return False
    outbox.add(session, topic, payload, now, available_at=available_at, dedupe_key=dedupe_key)
    return True


def _locked(session: Session, delegation_id: uuid.UUID) -> tuple[Delegation, User] | None:
    delegation = session.get(Delegation, delegation_id)
    if delegation is None:
        return None
    user = session.get(User, delegation.user_id, with_for_update=True)
    session.refresh(delegation)  # as of after the lock
    assert user is not None
    return delegation, user


class Notifier:
    """Decides and sends re-authorisation mails; `handlers()` is what the relay calls."""

    def __init__(self, sessions: sessionmaker[Session], clock: Clock, policy: NotifyPolicy,
                 keys: LinkKeys, renderer: MailRenderer, mailer: Mailer, *, public_url: str,
                 mail_from: str, log_links: bool) -> None:
        self._sessions = sessions
        self._clock = clock
        self._policy = policy
        self._keys = keys
        self._renderer = renderer
        self._mailer = mailer
        self._public_url = public_url.rstrip("/")
        self._mail_from = mail_from
        self._log_links = log_links

    @property
    def channel(self) -> str:
        return self._mailer.channel

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        def broken(payload: dict[str, Any]) -> None:
            self.on_broken(payload)

        def due(payload: dict[str, Any]) -> None:
            self.on_due(payload)

        def mail(payload: dict[str, Any]) -> None:
            self.send(payload)

        return {BROKEN_TOPIC: broken, NOTIFY_TOPIC: due, MAIL_TOPIC: mail}

    def link_url(self, link_id: uuid.UUID) -> str:
        return f"{self._public_url}/reauth/{self._keys.token(link_id)}"

    # --- the three handlers ---------------------------------------------------------------

    def on_broken(self, payload: dict[str, Any]) -> Decision:
        """A delegation broke: schedule its reminder, decide its first notice."""
        now = self._clock.now()
        with self._sessions.begin() as session:
            found = _locked(session, uuid.UUID(str(payload["delegation_id"])))
            if found is None:
                return Decision("skipped", "no_delegation")
            delegation, user = found
            if delegation.status != DelegationStatus.BROKEN:
                return self._log(delegation, Decision("skipped", "not_broken"))
            if self._policy.reminder_after is not None:
                _add_once(session, NOTIFY_TOPIC,
                          {"delegation_id": str(delegation.id), "kind": KIND_REMINDER,
                           "version": delegation.version}, now,
                          available_at=(delegation.broken_at or now)
                          + self._policy.reminder_after,
                          dedupe_key=f"{NOTIFY_TOPIC}:{KIND_REMINDER}:{delegation.id}:"
                                     f"{delegation.version}")
            return self._log(delegation, self._decide(session, delegation, user, KIND_BROKEN,
                                                      now))

    def on_due(self, payload: dict[str, Any]) -> Decision:
        """A reminder, or a notice put off by the cap, is due: decide it now."""
        now = self._clock.now()
        kind = str(payload.get("kind", KIND_REMINDER))
        with self._sessions.begin() as session:
            found = _locked(session, uuid.UUID(str(payload["delegation_id"])))
            if found is None:
                return Decision("skipped", "no_delegation")
            delegation, user = found
            version = payload.get("version")
            if delegation.status == DelegationStatus.BROKEN and version is not None \
                    and delegation.version != version:
                # Repaired and broken again since: that break has its own notices.
                return self._log(delegation, Decision("skipped", "broken_again"))
            return self._log(delegation, self._decide(session, delegation, user, kind, now))

    def send(self, payload: dict[str, Any]) -> Sent:
        """Render and deliver one link's mail; record how it went (once)."""
        link_id = uuid.UUID(str(payload["link_id"]))
        now = self._clock.now()
        with self._sessions() as session:
            link = session.get(ReauthLink, link_id)
            if link is None or link.delivery is not None:
                return Sent(link_id, None)  # sent (or settled) before: a redelivery
            delegation = session.get(Delegation, link.delegation_id)
            user = session.get(User, link.user_id)
            agent = session.get(Agent, delegation.agent_id) if delegation else None
            assert delegation is not None and user is not None and agent is not None
            record = audit.AuditRecord(
                action="", actor_type="system", actor="notifier", user_id=user.id,
                user_subject=user.subject, agent_name=agent.name, client_id=agent.client_id,
                delegation_id=delegation.id,
                detail={"link_id": str(link.id), "kind": link.kind,
                        "requested_by": link.requested_by,
                        "expires_at": link.expires_at.isoformat()})
            if (delegation.status != DelegationStatus.BROKEN or link.used_at is not None
                    or link.invalidated_at is not None or link.expires_at <= now):
                log.info("re-authorisation mail for %s not sent: %s is %s", link.id,
                         delegation.id, delegation.status)
                self._settle(link.id, DELIVERY_SKIPPED, now, None)
                return Sent(link_id, DELIVERY_SKIPPED)
            mail = self._render(session, link, delegation, user, agent)
        if mail.to is None and self._mailer.channel == CHANNEL_SMTP:
            log.warning("no e-mail address is known for user %s: the re-authorisation mail "
                        "for delegation %s cannot be sent (the grants page offers the same "
                        "action)", user.subject, delegation.id)
            self._settle(link_id, DELIVERY_UNDELIVERABLE, now, dataclasses.replace(
                record, action="delegation:notification:undeliverable",
                detail={**record.detail, "why": "no e-mail address known"}))
            return Sent(link_id, DELIVERY_UNDELIVERABLE)
        try:
            self._mailer.deliver(mail.message(self._mail_from))
        except MailRejected as exc:
            log.warning("the SMTP server refused the mail for delegation %s: %s",
                        delegation.id, exc)
            self._settle(link_id, DELIVERY_REJECTED, now, dataclasses.replace(
                record, action="delegation:notification:undeliverable",
                detail={**record.detail, "why": str(exc)[:200]}))
            return Sent(link_id, DELIVERY_REJECTED)
        # MailUnavailable (and anything else) propagates: the outbox retries with backoff.
        delivery = self._mailer.channel
        self._settle(link_id, delivery, self._clock.now(), dataclasses.replace(
            record, action="delegation:notified",
            detail={**record.detail, "delivery": delivery}))
        return Sent(link_id, delivery)

    # --- operators ------------------------------------------------------------------------

    def request_link(self, delegation_id: uuid.UUID, operator: str) -> ReauthLink:
        """A fresh link and mail for a broken delegation, now (not de-duplicated or capped)."""
        now = self._clock.now()
        with self._sessions.begin() as session:
            found = _locked(session, delegation_id)
            if found is None:
                raise NoSuchDelegation(f"no delegation {delegation_id}")
            delegation, user = found
            if delegation.status != DelegationStatus.BROKEN:
                raise NotBroken(f"delegation {delegation_id} is {delegation.status}: only a "
                                "broken delegation can be re-authorised")
            link = self._new_link(session, delegation, KIND_OPERATOR, now, requested_by=operator)
            agent = session.get(Agent, delegation.agent_id)
            audit.append(session, audit.AuditRecord(
                action="delegation:notification:requested", actor_type="operator",
                actor=operator, user_id=user.id, user_subject=user.subject,
                agent_name=agent.name if agent else None,
                client_id=agent.client_id if agent else None, delegation_id=delegation.id,
                detail={"link_id": str(link.id), "expires_at": link.expires_at.isoformat()},
            ), now)
            return link

    def render_mail(self, link_id: uuid.UUID) -> Mail:
        """The mail of a link, exactly as it was (or will be) sent: for `behalf dev`."""
        with self._sessions() as session:
            link = session.get(ReauthLink, link_id)
            if link is None:
                raise LookupError(f"no re-authorisation link {link_id}")
            delegation = session.get(Delegation, link.delegation_id)
            user = session.get(User, link.user_id)
            agent = session.get(Agent, delegation.agent_id) if delegation else None
            assert delegation is not None and user is not None and agent is not None
            return self._render(session, link, delegation, user, agent)

    # --- inside -------------------------------------------------------------------------------

    def _decide(self, session: Session, delegation: Delegation, user: User, kind: str,
                now: dt.datetime) -> Decision:
        if delegation.status != DelegationStatus.BROKEN:
            return Decision("skipped", "not_broken")
        policy = self._policy
        latest = session.scalars(
            select(ReauthLink).where(ReauthLink.delegation_id == delegation.id)
            .order_by(ReauthLink.created_at.desc()).limit(1)).first()
        if latest is not None and latest.created_at > now - policy.quiet:
            if kind == KIND_BROKEN:
                return Decision("skipped", "mailed_within_a_day", link_id=latest.id)
            return self._defer(session, delegation, kind, now, latest.created_at + policy.quiet,
                               "mailed_within_a_day")
        window = list(session.scalars(
            select(ReauthLink.created_at)
            .where(ReauthLink.user_id == user.id, ReauthLink.created_at > now - DAY,
                   func.coalesce(ReauthLink.delivery, "").not_in(_NOT_MAILED))
            .order_by(ReauthLink.created_at)).all())
        if len(window) >= policy.per_user_per_day:
            frees_at = window[len(window) - policy.per_user_per_day] + DAY
            return self._defer(session, delegation, kind, now, frees_at, "daily_cap")
        link = self._new_link(session, delegation, kind, now)
        return Decision("queued", kind, link_id=link.id)

    def _defer(self, session: Session, delegation: Delegation, kind: str, now: dt.datetime,
               at: dt.datetime, reason: str) -> Decision:
        at = max(at, now) + dt.timedelta(seconds=1)
        _add_once(session, NOTIFY_TOPIC,
                  {"delegation_id": str(delegation.id), "kind": kind,
                   "version": delegation.version}, now, available_at=at,
                  dedupe_key=f"{NOTIFY_TOPIC}:{kind}:{delegation.id}:{delegation.version}:"
                             f"{at.isoformat()}")
        return Decision("deferred", reason, retry_at=at)

    def _new_link(self, session: Session, delegation: Delegation, kind: str, now: dt.datetime,
                  *, requested_by: str | None = None) -> ReauthLink:
        link_id = uuid.uuid4()
        link = ReauthLink(id=link_id, token_hash=self._keys.token_hash(link_id),
                          delegation_id=delegation.id, user_id=delegation.user_id,
                          created_at=now, expires_at=now + self._policy.link_ttl, kind=kind,
                          requested_by=requested_by)
        session.add(link)
        session.flush()
        outbox.add(session, MAIL_TOPIC, {"link_id": str(link_id), "kind": kind,
                                         "delegation_id": str(delegation.id)}, now,
                   dedupe_key=f"{MAIL_TOPIC}:{link_id}")
        return link

    def _settle(self, link_id: uuid.UUID, delivery: str, now: dt.datetime,
                record: audit.AuditRecord | None) -> None:
        """Record how a link's mail went, once (compare-and-set), with its audit record."""
        with self._sessions.begin() as session:
            values: dict[str, Any] = {"delivery": delivery}
            if delivery in (DELIVERY_SMTP, "log"):
                values["notified_at"] = now
            done = cast(CursorResult[Any], session.execute(
                update(ReauthLink).where(ReauthLink.id == link_id, ReauthLink.delivery.is_(None))
                .values(**values).execution_options(synchronize_session=False))).rowcount
            if done == 1 and record is not None:
                audit.append(session, record, now)

    def _render(self, session: Session, link: ReauthLink, delegation: Delegation, user: User,
                agent: Agent) -> Mail:
        jobs = [
            {"job": job, "parked": int(parked), "latest": latest}
            for job, parked, latest in session.execute(
                select(JobRun.job, func.count(), func.max(JobRun.queued_at))
                .where(JobRun.delegation_id == delegation.id,
                       JobRun.status == RunStatus.PARKED.value)
                .group_by(JobRun.job).order_by(JobRun.job)).all()
        ]
        schedules = [
            {"job": s.job, "cron": s.cron, "timezone": s.timezone}
            for s in session.scalars(
                select(Schedule).where(Schedule.user_id == user.id,
                                       Schedule.agent_id == agent.id,
                                       Schedule.paused.is_(False)).order_by(Schedule.job))
        ]
        reveal = self._mailer.channel == CHANNEL_SMTP or self._log_links
        context = {
            "kind": link.kind, "user": user.subject, "agent": agent.name,
            "since": delegation.broken_at,
            "reason": REASONS.get(delegation.status_reason or "",
                                  delegation.status_reason or "unknown"),
            "jobs": jobs, "schedules": schedules,
            "scopes": [s for s in (delegation.granted_scopes or []) if s != "openid"],
            "link": self.link_url(link.id) if reveal else WITHHELD,
            "expires_at": link.expires_at, "grants_url": f"{self._public_url}/grants",
        }
        return self._renderer.render(TEMPLATE, context, to=user.email,
                                     message_id=message_id("reauth", str(link.id),
                                                           self._mail_from))

    @staticmethod
    def _log(delegation: Delegation, decision: Decision) -> Decision:
        if decision.outcome != "queued":
            log.info("re-authorisation notice for %s %s (%s)%s", delegation.id,
                     decision.outcome, decision.reason,
                     f", due {decision.retry_at.isoformat()}" if decision.retry_at else "")
        return decision


# --- who was notified when ---------------------------------------------------------------


def link_state(link: ReauthLink, now: dt.datetime) -> str:
    if link.used_at is not None:
        return "used"
    if link.invalidated_at is not None:
        return "retired"
    if link.expires_at <= now:
        return "expired"
    return "live"


def notifications(session: Session, now: dt.datetime, *,
                  delegation_id: uuid.UUID | None = None, limit: int = 500
                  ) -> list[dict[str, Any]]:
    """Every link (one per mail), newest first: for whom, why, how its mail went, its state."""
    query = (select(ReauthLink, User.subject, User.email, Agent.name)
             .join(User, ReauthLink.user_id == User.id)
             .join(Delegation, ReauthLink.delegation_id == Delegation.id)
             .join(Agent, Delegation.agent_id == Agent.id)
             .order_by(ReauthLink.created_at.desc(), ReauthLink.id).limit(limit))
    if delegation_id is not None:
        query = query.where(ReauthLink.delegation_id == delegation_id)
    rows = []
    for link, subject, email, agent in session.execute(query).tuples():
        rows.append({
            "link_id": str(link.id), "delegation_id": str(link.delegation_id),
            "user": subject, "email": email or "", "agent": agent, "kind": link.kind,
            "requested_by": link.requested_by or "",
            "created_at": link.created_at.isoformat(),
            "notified_at": link.notified_at.isoformat() if link.notified_at else "",
            "delivery": link.delivery or "pending",
            "expires_at": link.expires_at.isoformat(),
            "used_at": link.used_at.isoformat() if link.used_at else "",
            "state": link_state(link, now),
        })
    return rows
