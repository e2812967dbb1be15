"""Re-authorisation links: minting their tokens, checking them, using them up, retiring them.

A link is one `reauth_links` row, bound to one delegation and its user, made for one mail
(`delegation.notify`). Its token is

    base64url(HMAC-SHA256(link key, "reauth-link/v1" || link id))        43 characters

where the link key is derived (HKDF) from the deployment's secret key and the link id is a
random UUID. Only SHA-256(token) is stored. So the database alone never yields a live link (as
with the PKCE verifiers of `delegation.connect`); the same mail can be rendered again, byte for
byte, if a crash makes the relay send it a second time (nothing in plaintext is kept to do it);
and rotating `BEHALF_SECRET_KEY` retires every outstanding link (an operator sends fresh ones).
Checking a presented token needs no key: hash it, look it up.

A link works until it has repaired its delegation once (`used_at`, set in the same transaction
as the repair), until it expires (`expires_at`), or until it is retired (`invalidated_at`)
because the delegation was repaired another way or revoked. Opening a link and abandoning the
consent at the AS uses nothing up.

`on_repaired` is the one place a repair's consequences happen (called by `delegation.connect`
inside the transaction that stores the new tokens): the link used (compare-and-set), every
other link of the delegation retired, the parked runs re-queued (`requeue_after_repair`) and
`delegation:reauthorized` audited.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from typing import Any, cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from delegation import audit
from delegation.errors import BehalfError
from delegation.requeue import Actor, requeue_after_repair
from models import Agent, Delegation, DelegationStatus, ReauthLink, User

TOKEN_LENGTH = 43
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{43}")
_INFO = b"behalf/reauth-link/v1"

KIND_BROKEN = "broken"
KIND_REMINDER = "reminder"
KIND_OPERATOR = "operator"


class LinkRefused(BehalfError):
    """A link that cannot be used; the message is safe to show to whoever holds it."""

    def __init__(self, reason: str, message: str, *, status: int = 410) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class LinkKeys:
    """Derives link tokens from the deployment's secret key (never stored)."""

    def __init__(self, secret_key: bytes) -> None:
        if len(secret_key) < 32:
            raise ValueError("the secret key must be at least 32 bytes")
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                         info=_INFO).derive(secret_key)

    def __repr__(self) -> str:
        return "LinkKeys(<secret>)"

    def token(self, link_id: uuid.UUID) -> str:
        mac = hmac.new(self._key, _INFO + link_id.bytes, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def token_hash(self, link_id: uuid.UUID) -> str:
        return digest(self.token(link_id))


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def valid_syntax(token: str) -> bool:
    return bool(_TOKEN.fullmatch(token))


@dataclass(frozen=True)
class Target:
    """What a link (or the grants page's re-authorise action) would repair; no secrets."""

    delegation_id: uuid.UUID
    user_id: uuid.UUID
    user_subject: str
    agent_id: uuid.UUID
    agent_name: str
    status: str
    status_reason: str | None
    broken_at: dt.datetime | None
    granted_scopes: tuple[str, ...]
    scopes: tuple[str, ...]  # what re-authorising asks for (and grants again)
    link_id: uuid.UUID | None = None
    expires_at: dt.datetime | None = None


def reauth_scopes(granted: list[str] | None, agent_scopes: list[str] | None) -> list[str]:
    """Ask again for what was granted (as far as the agent still wants it); if that leaves
    nothing, for everything the agent asks for."""
    wanted = list(agent_scopes or [])
    again = [s for s in wanted if s in set(granted or [])]
    return again or wanted


def _target(delegation: Delegation, user: User, agent: Agent,
            link: ReauthLink | None) -> Target:
    return Target(
        delegation_id=delegation.id, user_id=user.id, user_subject=user.subject,
        agent_id=agent.id, agent_name=agent.name, status=delegation.status,
        status_reason=delegation.status_reason, broken_at=delegation.broken_at,
        granted_scopes=tuple(delegation.granted_scopes or ()),
        scopes=tuple(reauth_scopes(delegation.granted_scopes, agent.scopes)),
        link_id=link.id if link else None, expires_at=link.expires_at if link else None,
    )


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _check(link: ReauthLink, delegation: Delegation, agent_name: str, now: dt.datetime
           ) -> None:
    if link.used_at is not None:
        raise LinkRefused("link_used", f"This link was already used, on {_when(link.used_at)}, "
                          f"to re-authorise {agent_name}. It works only once.")
    if link.invalidated_at is not None or delegation.status != DelegationStatus.BROKEN:
        if delegation.status == DelegationStatus.REVOKED:
            raise LinkRefused("delegation_revoked", f"{agent_name} was revoked, so this link "
                              "no longer works. To use the agent again, connect it from your "
                              "grants page.")
        raise LinkRefused("link_retired", f"This link is no longer needed: {agent_name} was "
                          "re-authorised another way and works again.")
    if link.expires_at <= now:
        raise LinkRefused("link_expired", f"This link expired on {_when(link.expires_at)}. "
                          f"You can still re-authorise {agent_name} from your grants page.")


def _load(session: Session, link: ReauthLink | None) -> tuple[ReauthLink, Delegation, User,
                                                                Agent]:
    if link is None:
        raise LinkRefused("unknown_link", "This link is not valid. Check that it was copied "
                          "completely, or re-authorise from your grants page.", status=404)
    delegation = session.get(Delegation, link.delegation_id)
    user = session.get(User, link.user_id)
    agent = session.get(Agent, delegation.agent_id) if delegation else None
    if delegation is None or user is None or agent is None or delegation.user_id != user.id:
        raise LinkRefused("unknown_link", "This link is not valid.", status=404)
    return link, delegation, user, agent


def find(session: Session, token: str, now: dt.datetime) -> Target:
    """The target of a presented token, or `LinkRefused` (malformed, unknown, tampered,
    expired, used, retired)."""
    link = None
    if valid_syntax(token):
        link = session.scalars(
            select(ReauthLink).where(ReauthLink.token_hash == digest(token))).one_or_none()
    link, delegation, user, agent = _load(session, link)
    _check(link, delegation, agent.name, now)
    return _target(delegation, user, agent, link)


def find_by_id(session: Session, link_id: uuid.UUID, now: dt.datetime) -> Target:
    """As `find`, for a link this browser already proved it holds (a signed cookie)."""
    link, delegation, user, agent = _load(session, session.get(ReauthLink, link_id))
    _check(link, delegation, agent.name, now)
    return _target(delegation, user, agent, link)


def broken_target(session: Session, delegation_id: uuid.UUID, user_id: uuid.UUID) -> Target:
    """The grants page's re-authorise action: one of `user_id`'s own broken delegations."""
    delegation = session.get(Delegation, delegation_id)
    if delegation is None or delegation.user_id != user_id:
        raise LinkRefused("not_found", "No such grant.", status=404)
    user = session.get(User, user_id)
    agent = session.get(Agent, delegation.agent_id)
    assert user is not None and agent is not None
    if delegation.status != DelegationStatus.BROKEN:
        raise LinkRefused("not_broken", f"{agent.name} is {delegation.status}: there is "
                          "nothing to re-authorise.", status=409)
    return _target(delegation, user, agent, None)


def invalidate(session: Session, delegation_id: uuid.UUID, now: dt.datetime, *,
               keep: uuid.UUID | None = None) -> int:
    """Retire every live link of a delegation (but `keep`), in the caller's transaction."""
    query = (update(ReauthLink)
             .where(ReauthLink.delegation_id == delegation_id, ReauthLink.used_at.is_(None),
                    ReauthLink.invalidated_at.is_(None))
             .values(invalidated_at=now)
             .execution_options(synchronize_session=False))
    if keep is not None:
        query = query.where(ReauthLink.id != keep)
    return int(cast(CursorResult[Any], session.execute(query)).rowcount)


@dataclass(frozen=True)
class Repair:
    link_id: uuid.UUID | None
    links_retired: int
    runs_requeued: int
    runs_superseded: int


def on_repaired(session: Session, *, delegation_id: uuid.UUID, user_id: uuid.UUID,
                previous_status: str, link_id: uuid.UUID | None, now: dt.datetime,
                user_subject: str, agent_name: str, client_id: str) -> Repair | None:
    """A consent just stored new tokens for `delegation_id` (in this transaction).

    With a link: the link must still be live and this delegation's (else `LinkRefused`, and
    the caller's transaction must not commit). A broken delegation that works again has its
    other links retired, its parked runs re-queued, and `delegation:reauthorized` audited.
    """
    if link_id is not None:
        used = cast(CursorResult[Any], session.execute(
            update(ReauthLink)
            .where(ReauthLink.id == link_id, ReauthLink.delegation_id == delegation_id,
                   ReauthLink.user_id == user_id, ReauthLink.used_at.is_(None),
                   ReauthLink.invalidated_at.is_(None))
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )).rowcount
        if used != 1:
            raise LinkRefused("link_retired", "This link was used or retired while you were "
                              f"at the authorization server; {agent_name} was not changed.",
                              status=409)
    if previous_status != DelegationStatus.BROKEN:
        return None
    retired = invalidate(session, delegation_id, now, keep=link_id)
    requeued = requeue_after_repair(session, delegation_id, now, actor=Actor(
        name=user_subject, via="reauth" if link_id else "connect", actor_type="user"))
    audit.append(session, audit.AuditRecord(
        action="delegation:reauthorized", actor_type="user", actor=user_subject,
        user_id=user_id, user_subject=user_subject, agent_name=agent_name,
        client_id=client_id, delegation_id=delegation_id,
        detail={"via": "link" if link_id else "connect",
                "link_id": str(link_id) if link_id else None,
                "links_retired": retired, "runs_requeued": requeued.requeued,
                "runs_superseded": requeued.superseded},
    ), now)
    return Repair(link_id, retired, requeued.requeued, requeued.superseded)
