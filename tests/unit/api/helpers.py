"""Assertions shared by the connect unit tests."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from delegation.tokens import TokenSet
from delegation.vault import Sealed, Vault, delegation_context
from models import AuditEvent, Delegation, User


def snapshot(sessions: sessionmaker[Session]) -> dict[str, Any]:
    """What a refused callback must leave as it was."""
    with sessions() as s:
        delegations = sorted(
            (str(d.id), d.version, d.status, d.token_blob, tuple(d.granted_scopes))
            for d in s.scalars(select(Delegation))
        )
        return {
            "delegations": delegations,
            "users": s.scalar(select(func.count()).select_from(User)),
            "audit": s.scalar(select(func.count()).select_from(AuditEvent)),
        }


def delegations(sessions: sessionmaker[Session]) -> list[Delegation]:
    with sessions() as s:
        return list(s.scalars(select(Delegation)))


def open_tokens(vault: Vault, row: Delegation) -> TokenSet:
    assert row.token_blob and row.wrapped_key and row.key_id
    raw = vault.open(Sealed(row.token_blob, row.wrapped_key, row.key_id),
                     delegation_context(row.user_id, row.id, row.agent_id))
    return TokenSet.from_bytes(raw)


def actions(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as s:
        return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
