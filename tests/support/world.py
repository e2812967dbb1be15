"""A small world for runtime tests: provider, agent, users with delegations, and the runtime
pieces wired the way `behalf.runtime` wires them, over any sessions/redis/transport."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from delegation.clock import Clock
from delegation.oauth import OAuthClient
from delegation.store import AgentDirectory, DelegationStore
from delegation.token_source import TokenSource
from delegation.tokens import ClientCredentials, TokenSet
from delegation.vault import Vault, agent_context, delegation_context
from models import Agent, Delegation, Provider, User
from worker.jobs import JobRegistry
from worker.runner import Runner, RunnerConfig


@dataclass
class World:
    sessions: sessionmaker[Session]
    vault: Vault
    clock: Clock
    redis: Any
    transport: httpx.BaseTransport
    provider_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    client_id: str = "client-reporter"
    jobs: JobRegistry = field(default_factory=JobRegistry)
    _tokens: TokenSource | None = None

    def setup_agent(self, metadata: dict[str, Any], api_base: str, *,
                    credentials: ClientCredentials | None = None,
                    scopes: list[str] | None = None, name: str = "reporter") -> uuid.UUID:
        now = self.clock.now()
        credentials = credentials or ClientCredentials(
            client_id=self.client_id, auth_method="client_secret_basic", secret="s3cret")
        with self.sessions.begin() as s:
            provider = Provider(name=f"prov-{uuid.uuid4().hex[:6]}", issuer=metadata["issuer"],
                                discovered=metadata, api_base=api_base, created_at=now)
            s.add(provider)
            s.flush()
            agent = Agent(name=name, environment="test", provider_id=provider.id,
                          client_id=credentials.client_id, auth_method=credentials.auth_method,
                          scopes=scopes or ["reports:read"], required_scopes=[],
                          created_at=now, updated_at=now)
            s.add(agent)
            s.flush()
            sealed = self.vault.seal(credentials.to_bytes(), agent_context(agent.id))
            agent.credential_blob = sealed.blob
            agent.credential_wrapped_key = sealed.wrapped_key
            agent.credential_key_id = sealed.key_id
            self.provider_id, self.agent_id = provider.id, agent.id
            self.client_id = credentials.client_id
        return agent.id

    def add_delegation(self, subject: str, tokens: TokenSet, *,
                       scopes: list[str] | None = None) -> tuple[uuid.UUID, uuid.UUID]:
        assert self.agent_id is not None
        now = self.clock.now()
        with self.sessions.begin() as s:
            user = User(issuer="test", subject=subject, created_at=now)
            s.add(user)
            s.flush()
            row = Delegation(id=uuid.uuid4(), user_id=user.id, agent_id=self.agent_id,
                             requested_scopes=scopes or ["reports:read"],
                             granted_scopes=scopes or ["reports:read"], granted_at=now,
                             access_expires_at=tokens.expires_at,
                             created_at=now, updated_at=now)
            sealed = self.vault.seal(tokens.to_bytes(),
                                     delegation_context(user.id, row.id, self.agent_id))
            row.token_blob, row.wrapped_key, row.key_id = (sealed.blob, sealed.wrapped_key,
                                                           sealed.key_id)
            s.add(row)
            return user.id, row.id

    def token_set(self, access: str, refresh: str | None, ttl: float) -> TokenSet:
        now = self.clock.now()
        return TokenSet(access, refresh, now + dt.timedelta(seconds=ttl), now,
                        ("reports:read",))

    def token_source(self, **kwargs: Any) -> TokenSource:
        if self._tokens is None or kwargs:
            kwargs.setdefault("poll_interval", 0.005)
            source = TokenSource(
                store=DelegationStore(self.sessions, self.vault, self.clock),
                agents=AgentDirectory(self.sessions, self.vault),
                oauth=OAuthClient(httpx.Client(transport=self.transport), self.clock),
                redis=self.redis, clock=self.clock, rng=random.Random(0), **kwargs,
            )
            if kwargs:
                return source
            self._tokens = source
        return self._tokens

    def runner(self, worker_id: str = "test-worker", **config: Any) -> Runner:
        return Runner(
            sessions=self.sessions, tokens=self.token_source(),
            agents=AgentDirectory(self.sessions, self.vault), jobs=self.jobs,
            clock=self.clock, config=RunnerConfig(worker_id=worker_id, **config),
            transport=self.transport, rng=random.Random(0),
        )
