"""The one revoke path (the user's grants page, the operator CLI, the provider side).

In one transaction the delegation becomes `revoked` (version bumped, so any refresh in flight
loses its compare-and-set), its queued runs are cancelled, and outbox entries ask for (1) a
stop push to running work and (2) revocation at the AS followed by crypto-shredding. The call
returns after the commit: from then on the token source refuses the delegation, whatever
happens to the push.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session, sessionmaker

from delegation import audit, outbox, reauth
from delegation.clock import Clock
from delegation.oauth import OAuthClient
from delegation.store import AgentDirectory
from delegation.tokens import TokenSet
from delegation.vault import Sealed, Vault, delegation_context
from models import Agent, Delegation, DelegationStatus, JobRun, RunStatus, User

STOP_TOPIC = "delegation.stop"
REVOKE_AT_PROVIDER_TOPIC = "delegation.revoke_at_provider"


@dataclass(frozen=True)
class Revoked:
    delegation_id: uuid.UUID
    version: int
    already: bool
    runs_cancelled: int


class NotFound(LookupError):
    """No such delegation (or not the caller's: the API answers 404 either way)."""


def revoke(
    sessions: sessionmaker[Session],
    clock: Clock,
    delegation_id: uuid.UUID,
    *,
    actor_type: str,
    actor: str,
    owner_user_id: uuid.UUID | None = None,
) -> Revoked:
    """Revoke `delegation_id`. With `owner_user_id`, only that user's delegation is touched.

    Idempotent: revoking a revoked delegation changes nothing and says so.
    """
    now = clock.now()
    with sessions.begin() as session:
        row = session.get(Delegation, delegation_id, with_for_update=True)
        if row is None or (owner_user_id is not None and row.user_id != owner_user_id):
            raise NotFound(f"no delegation {delegation_id}")
        if row.status == DelegationStatus.REVOKED:
            return Revoked(row.id, row.version, True, 0)
        previous = row.status
        row.status = DelegationStatus.REVOKED.value
        row.status_reason = f"revoked by {actor_type}"
        row.revoked_at = now
        row.version += 1
        row.updated_at = now
        cancelled = cast(CursorResult[Any], session.execute(
            update(JobRun)
            .where(JobRun.delegation_id == row.id,
                   JobRun.status.in_([RunStatus.QUEUED.value, RunStatus.PARKED.value]))
            .values(status=RunStatus.CANCELLED.value, reason="delegation_revoked",
                    finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )).rowcount
        reauth.invalidate(session, row.id, now)  # re-authorisation (issue #7): links die too
        user = session.get(User, row.user_id)
        agent = session.get(Agent, row.agent_id)
        audit.append(session, audit.AuditRecord(
            action="delegation:revoked", actor_type=actor_type, actor=actor,
            user_id=row.user_id, user_subject=user.subject if user else None,
            agent_name=agent.name if agent else None,
            client_id=agent.client_id if agent else None, delegation_id=row.id,
            detail={"previous_status": previous, "queued_runs_cancelled": cancelled},
        ), now)
        outbox.add(session, STOP_TOPIC, {"delegation_id": str(row.id),
                                         "reason": "delegation_revoked"}, now)
        outbox.add(session, REVOKE_AT_PROVIDER_TOPIC, {"delegation_id": str(row.id)}, now,
                   dedupe_key=f"{REVOKE_AT_PROVIDER_TOPIC}:{row.id}:{row.version}")
        return Revoked(row.id, row.version, False, int(cancelled))


def revoke_at_provider(
    sessions: sessionmaker[Session],
    vault: Vault,
    agents: AgentDirectory,
    oauth: OAuthClient,
    clock: Clock,
    delegation_id: uuid.UUID,
) -> bool:
    """RFC 7009 for the refresh and the access token, then crypto-shred. Raises a retryable
    error while the AS does not confirm (the outbox retries with backoff); True when done,
    False when there was nothing left to do (already shredded)."""
    with sessions() as session:
        row = session.get(Delegation, delegation_id)
        if row is None or row.status != DelegationStatus.REVOKED:
            return False
        if row.wrapped_key is None or row.key_id is None:
            return False
        sealed = Sealed(row.token_blob or b"", row.wrapped_key, row.key_id)
        context = delegation_context(row.user_id, row.id, row.agent_id)
        user_id, agent_id = row.user_id, row.agent_id
    tokens = TokenSet.from_bytes(vault.open(sealed, context))
    identity = agents.get(agent_id)
    revoked = []
    if tokens.refresh_token:
        oauth.revoke(identity.endpoints, identity.credentials, tokens.refresh_token,
                     "refresh_token")
        revoked.append("refresh_token")
    oauth.revoke(identity.endpoints, identity.credentials, tokens.access_token, "access_token")
    revoked.append("access_token")
    now = clock.now()
    with sessions.begin() as session:
        row = session.get(Delegation, delegation_id, with_for_update=True)
        if row is None or row.wrapped_key is None:
            return False
        user = session.get(User, user_id)
        base = audit.AuditRecord(
            action="", actor_type="system", actor="revocation-relay", user_id=user_id,
            user_subject=user.subject if user else None, agent_name=identity.name,
            client_id=identity.client_id, delegation_id=delegation_id)
        audit.append(session, dataclasses.replace(
            base, action="delegation:tokens:revoked_at_provider", detail={"tokens": revoked}),
            now)
        row.token_blob = None
        row.wrapped_key = None
        row.keys_destroyed_at = now
        row.updated_at = now
        audit.append(session, dataclasses.replace(
            base, action="delegation:keys:destroyed", detail={"key_id": sealed.key_id}), now)
    vault.forget(sealed, context)
    return True
