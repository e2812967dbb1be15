"""Durable delegation state: load and open tokens, compare-and-set writes, mark broken.

Every write is `UPDATE … WHERE id = ? AND version = ? AND status = 'active'`, bumping the
version: a writer that lost a race (a stalled refresher, a refresh racing a revoke) changes
nothing and learns it from the row count.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Result, select, update
from sqlalchemy.orm import Session, sessionmaker

from delegation import audit
from delegation.clock import Clock
from delegation.errors import AgentMisconfigured, DelegationUnusable
from delegation.oauth import Endpoints
from delegation.tokens import ClientCredentials, TokenSet
from delegation.vault import Sealed, Vault, agent_context, delegation_context
from models import (
    Agent,
    AuditEvent,
    Delegation,
    DelegationStatus,
    JobRun,
    OutboxMessage,
    Provider,
    RunStatus,
    User,
)

_REFRESH_OUTCOMES = (
    "delegation:token:refresh_started",
    "delegation:token:refresh_unconfirmed",
    "delegation:token:refresh_failed",
    "delegation:token:refreshed",
)


@dataclass(frozen=True)
class DelegationState:
    """The durable facts about a delegation that gate token use (no secrets)."""

    id: uuid.UUID
    user_id: uuid.UUID
    agent_id: uuid.UUID
    version: int
    status: str
    status_reason: str | None
    granted_scopes: tuple[str, ...]
    access_expires_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.status == DelegationStatus.ACTIVE

    def require_active(self) -> None:
        if not self.active:
            reason = "delegation_revoked" if self.status == DelegationStatus.REVOKED \
                else "delegation_broken"
            raise DelegationUnusable(f"delegation {self.id} is {self.status}", reason=reason)


@dataclass(frozen=True)
class AgentIdentity:
    """Who acts: the agent's name, its OAuth client and where its AS and API are."""

    id: uuid.UUID
    name: str
    client_id: str
    status: str
    endpoints: Endpoints
    api_base: str | None
    credentials: ClientCredentials
    provider_id: uuid.UUID | None = None


@dataclass(frozen=True)
class UserIdentity:
    id: uuid.UUID
    subject: str


def _rowcount(result: Result[Any]) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _state(row: Delegation) -> DelegationState:
    return DelegationState(
        id=row.id, user_id=row.user_id, agent_id=row.agent_id, version=row.version,
        status=row.status, status_reason=row.status_reason,
        granted_scopes=tuple(row.granted_scopes or ()), access_expires_at=row.access_expires_at,
    )


class DelegationStore:
    def __init__(self, sessions: sessionmaker[Session], vault: Vault, clock: Clock) -> None:
        self._sessions = sessions
        self._vault = vault
        self._clock = clock

    def state(self, delegation_id: uuid.UUID) -> DelegationState:
        with self._sessions() as session:
            row = session.get(Delegation, delegation_id)
            if row is None:
                raise DelegationUnusable(f"delegation {delegation_id} does not exist",
                                         reason="delegation_missing")
            return _state(row)

    def load(self, delegation_id: uuid.UUID) -> tuple[DelegationState, TokenSet]:
        """The state and the opened tokens; refuses a delegation that is not active."""
        with self._sessions() as session:
            row = session.get(Delegation, delegation_id)
            if row is None:
                raise DelegationUnusable(f"delegation {delegation_id} does not exist",
                                         reason="delegation_missing")
            state = _state(row)
            state.require_active()
            sealed = Sealed(row.token_blob or b"", row.wrapped_key or b"", row.key_id or "")
        raw = self._vault.open(sealed, delegation_context(state.user_id, state.id,
                                                          state.agent_id))
        return state, TokenSet.from_bytes(raw)

    def save_refreshed(self, state: DelegationState, tokens: TokenSet,
                       identity: AgentIdentity) -> DelegationState | None:
        """Store rotated tokens if nobody changed the delegation since `state`; else None.

        The new refresh token is committed here, before the caller uses the access token.
        """
        now = self._clock.now()
        context = delegation_context(state.user_id, state.id, state.agent_id)
        with self._sessions.begin() as session:
            row = session.get(Delegation, state.id)
            if row is None or row.wrapped_key is None or row.key_id is None:
                return None
            current = Sealed(row.token_blob or b"", row.wrapped_key, row.key_id)
            sealed = self._vault.seal(tokens.to_bytes(), context, reuse=current)
            result = session.execute(
                update(Delegation)
                .where(Delegation.id == state.id, Delegation.version == state.version,
                       Delegation.status == DelegationStatus.ACTIVE.value)
                .values(token_blob=sealed.blob, version=Delegation.version + 1,
                        access_expires_at=tokens.expires_at, refreshed_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                session.rollback()
                return None
            user = session.get(User, state.user_id)
            audit.append(session, audit.AuditRecord(
                action="delegation:token:refreshed", actor_type="system", actor="token-source",
                user_id=state.user_id, user_subject=user.subject if user else None,
                agent_name=identity.name, client_id=identity.client_id,
                delegation_id=state.id,
                detail={"version": state.version + 1,
                        "rotated": True,
                        "expires_at": tokens.expires_at.isoformat() if tokens.expires_at
                        else None},
            ), now)
        return DelegationState(
            id=state.id, user_id=state.user_id, agent_id=state.agent_id,
            version=state.version + 1, status=state.status, status_reason=None,
            granted_scopes=state.granted_scopes, access_expires_at=tokens.expires_at,
        )

    def mark_broken(self, state: DelegationState, identity: AgentIdentity, reason: str,
                    *, detail: str) -> bool:
        """Break the delegation (CAS), park its queued and running runs, queue the notice."""
        now = self._clock.now()
        with self._sessions.begin() as session:
            result = session.execute(
                update(Delegation)
                .where(Delegation.id == state.id, Delegation.version == state.version,
                       Delegation.status == DelegationStatus.ACTIVE.value)
                .values(status=DelegationStatus.BROKEN.value, status_reason=reason,
                        broken_at=now, version=Delegation.version + 1, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                return False
            parked_result = session.execute(
                update(JobRun)
                .where(JobRun.delegation_id == state.id,
                       JobRun.status.in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value]))
                .values(status=RunStatus.PARKED.value, reason="delegation_broken",
                        lease_owner=None, lease_expires_at=None, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            parked = _rowcount(parked_result)
            user = session.get(User, state.user_id)
            audit.append(session, audit.AuditRecord(
                action="delegation:token:broken", actor_type="provider",
                actor=identity.endpoints.issuer,
                user_id=state.user_id, user_subject=user.subject if user else None,
                agent_name=identity.name, client_id=identity.client_id,
                delegation_id=state.id, detail={"reason": reason, "detail": detail[:300],
                                                "runs_parked": parked},
            ), now)
            session.add(OutboxMessage(
                topic="delegation.broken", payload={"delegation_id": str(state.id)},
                dedupe_key=f"delegation.broken:{state.id}:{state.version + 1}",
                created_at=now, available_at=now,
            ))
            session.add(OutboxMessage(
                topic="delegation.stop", payload={"delegation_id": str(state.id),
                                                  "reason": "delegation_broken"},
                created_at=now, available_at=now,
            ))
        return True

    def record_refresh_started(self, state: DelegationState, identity: AgentIdentity) -> int:
        """Durably note that a refresh of this version is about to leave; returns the event id.

        If the process dies with the request in flight (SIGKILL, lost node, database gone
        before the answer was stored), the AS may have rotated the token with nobody left to
        store it: this record is what later explains the resulting `invalid_grant`.
        """
        return self._refresh_event(state, identity, "delegation:token:refresh_started", None)

    def record_unconfirmed_refresh(self, state: DelegationState, identity: AgentIdentity,
                                   detail: str) -> None:
        """A refresh request left but no answer came back (the AS may have rotated)."""
        self._refresh_event(state, identity, "delegation:token:refresh_unconfirmed", detail)

    def record_refresh_failed(self, state: DelegationState, identity: AgentIdentity,
                              detail: str) -> None:
        """The AS answered the refresh with an error (5xx, 429, ...): nothing was rotated."""
        self._refresh_event(state, identity, "delegation:token:refresh_failed", detail)

    def _refresh_event(self, state: DelegationState, identity: AgentIdentity, action: str,
                       detail: str | None) -> int:
        now = self._clock.now()
        body: dict[str, Any] = {"version": state.version}
        if detail is not None:
            body["detail"] = detail[:300]
        with self._sessions.begin() as session:
            user = session.get(User, state.user_id)
            event = audit.append(session, audit.AuditRecord(
                action=action, actor_type="system", actor="token-source",
                user_id=state.user_id, user_subject=user.subject if user else None,
                agent_name=identity.name, client_id=identity.client_id,
                delegation_id=state.id, detail=body,
            ), now)
        return int(event.id)

    def last_refresh_unconfirmed(self, state: DelegationState, *,
                                 before: int | None = None) -> bool:
        """Did an earlier refresh of this very version (before event `before`) leave without
        an answer being stored: unanswered, or its process gone before it could say?"""
        query = (select(AuditEvent)
                 .where(AuditEvent.delegation_id == state.id,
                        AuditEvent.action.in_(_REFRESH_OUTCOMES))
                 .order_by(AuditEvent.id.desc()).limit(1))
        if before is not None:
            query = query.where(AuditEvent.id < before)
        with self._sessions() as session:
            event = session.scalars(query).first()
        return bool(event is not None
                    and event.action in ("delegation:token:refresh_unconfirmed",
                                         "delegation:token:refresh_started")
                    and event.detail.get("version") == state.version)

    def mark_agent_misconfigured(self, identity: AgentIdentity, detail: str) -> None:
        now = self._clock.now()
        with self._sessions.begin() as session:
            session.execute(
                update(Agent).where(Agent.id == identity.id)
                .values(status="misconfigured", status_reason=detail[:500], updated_at=now)
            )
            audit.append(session, audit.AuditRecord(
                action="agent:client:misconfigured", actor_type="provider",
                actor=identity.endpoints.issuer, agent_name=identity.name,
                client_id=identity.client_id, detail={"detail": detail[:300]},
            ), now)


class AgentDirectory:
    """Agent identities with opened credentials, cached in memory for a short while."""

    def __init__(self, sessions: sessionmaker[Session], vault: Vault, *,
                 ttl: float = 30.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._sessions = sessions
        self._vault = vault
        self._ttl = ttl
        self._monotonic = monotonic
        self._cache: dict[uuid.UUID, tuple[float, AgentIdentity]] = {}
        self._lock = threading.Lock()

    def get(self, agent_id: uuid.UUID) -> AgentIdentity:
        now = self._monotonic()
        with self._lock:
            hit = self._cache.get(agent_id)
            if hit is not None and now - hit[0] < self._ttl:
                return hit[1]
        identity = self._load(agent_id)
        with self._lock:
            self._cache[agent_id] = (now, identity)
        return identity

    def forget(self, agent_id: uuid.UUID) -> None:
        with self._lock:
            self._cache.pop(agent_id, None)

    def _load(self, agent_id: uuid.UUID) -> AgentIdentity:
        with self._sessions() as session:
            row = session.execute(
                select(Agent, Provider).join(Provider, Agent.provider_id == Provider.id)
                .where(Agent.id == agent_id)
            ).one_or_none()
            if row is None:
                raise AgentMisconfigured(f"agent {agent_id} does not exist")
            agent, provider = row._tuple()
            if agent.credential_blob and agent.credential_wrapped_key and \
                    agent.credential_key_id:
                raw = self._vault.open(
                    Sealed(agent.credential_blob, agent.credential_wrapped_key,
                           agent.credential_key_id),
                    agent_context(agent.id),
                )
                credentials = ClientCredentials.from_bytes(raw)
            else:
                credentials = ClientCredentials(client_id=agent.client_id, auth_method="none")
            return AgentIdentity(
                id=agent.id, name=agent.name, client_id=agent.client_id, status=agent.status,
                endpoints=Endpoints.from_metadata(provider.discovered),
                api_base=provider.api_base, credentials=credentials,
                provider_id=provider.id,
            )
