"""Rows for tests, built the way the product builds them."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from sqlalchemy.orm import Session

from delegation.vault import Vault, delegation_context
from models import Agent, Delegation, Provider, User

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def provider(session: Session, *, name: str = "acme", issuer: str = "https://as.example",
             api_base: str = "https://api.example") -> Provider:
    row = Provider(name=name, issuer=issuer, api_base=api_base, discovered={}, created_at=NOW)
    session.add(row)
    session.flush()
    return row


def agent(session: Session, prov: Provider, *, name: str = "reporter",
          client_id: str | None = None, scopes: list[str] | None = None) -> Agent:
    row = Agent(
        name=name, environment="test", provider_id=prov.id,
        client_id=client_id or f"client-{uuid.uuid4().hex[:8]}", auth_method="client_secret_basic",
        scopes=scopes or ["reports:read"], required_scopes=[], created_at=NOW, updated_at=NOW,
    )
    session.add(row)
    session.flush()
    return row


def user(session: Session, subject: str = "alice", issuer: str = "https://as.example") -> User:
    row = User(issuer=issuer, subject=subject, created_at=NOW)
    session.add(row)
    session.flush()
    return row


def delegation(session: Session, vault: Vault, usr: User, agt: Agent, *,
               tokens: dict[str, object] | None = None) -> Delegation:
    row = Delegation(
        id=uuid.uuid4(), user_id=usr.id, agent_id=agt.id, requested_scopes=agt.scopes,
        granted_scopes=agt.scopes, granted_at=NOW, created_at=NOW, updated_at=NOW,
    )
    sealed = vault.seal(
        json.dumps(tokens or {"access_token": "at", "refresh_token": "rt"}).encode(),
        delegation_context(usr.id, row.id, agt.id),
    )
    row.token_blob, row.wrapped_key, row.key_id = sealed.blob, sealed.wrapped_key, sealed.key_id
    session.add(row)
    session.flush()
    return row
