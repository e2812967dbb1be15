"""The tables. Secrets live only as sealed blobs (`*_blob`) with their wrapped data key."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


def _uuid() -> uuid.UUID:
    return uuid.uuid4()


class DelegationStatus(enum.StrEnum):
    ACTIVE = "active"
    BROKEN = "broken"
    REVOKED = "revoked"


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PARKED = "parked"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    MISSED = "missed"


class Provider(Base):
    """An OAuth authorisation server and the API it protects."""

    __tablename__ = "providers"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    issuer: Mapped[str] = mapped_column(String(500))
    discovered: Mapped[dict[str, Any]] = mapped_column(default=dict)
    api_base: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime]


class Agent(Base):
    """One OAuth client per agent per environment; its credential is sealed by the vault."""

    __tablename__ = "agents"
    __table_args__ = (
        UniqueConstraint("name", "environment", name="uq_agents_name_environment"),
        UniqueConstraint("provider_id", "client_id", name="uq_agents_provider_client"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    name: Mapped[str] = mapped_column(String(100))
    environment: Mapped[str] = mapped_column(String(50))
    provider_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("providers.id"))
    client_id: Mapped[str] = mapped_column(String(255))
    auth_method: Mapped[str] = mapped_column(String(40))
    # "agent" (users connect it) or "signin" (the deployment's own OIDC client, `openid` only,
    # that users sign in to the pages with); both are OAuth clients sealed the same way.
    role: Mapped[str] = mapped_column(String(20), default="agent", server_default="agent")
    scopes: Mapped[list[str]] = mapped_column(default=list)
    required_scopes: Mapped[list[str]] = mapped_column(default=list)
    public_jwks: Mapped[dict[str, Any] | None]
    # The AS's client information response (RFC 7591/7592) without any secret: it names the
    # registration_client_uri that key rotation updates.
    registration: Mapped[dict[str, Any] | None]
    credential_blob: Mapped[bytes | None] = mapped_column(LargeBinary)
    credential_wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    credential_key_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(20), default="active")
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class User(Base):
    """A person, as the authorisation server names them (`sub`)."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("issuer", "subject", name="uq_users_issuer_subject"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    issuer: Mapped[str] = mapped_column(String(500))
    subject: Mapped[str] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[dt.datetime]


class Delegation(Base):
    """User x agent: what was granted, its state, and the sealed tokens.

    `version` is bumped by every change; writers compare-and-set on it, so a stale writer
    (a refresher whose lease ran out, a refresh racing a revoke) changes nothing.
    """

    __tablename__ = "delegations"
    __table_args__ = (
        UniqueConstraint("user_id", "agent_id", name="uq_delegations_user_agent"),
        Index("ix_delegations_expiring", "status", "access_expires_at"),
        Index("ix_delegations_agent_status", "agent_id", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"))
    requested_scopes: Mapped[list[str]] = mapped_column(default=list)
    granted_scopes: Mapped[list[str]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(20), default=DelegationStatus.ACTIVE.value)
    status_reason: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=1)
    granted_at: Mapped[dt.datetime]
    broken_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]
    refreshed_at: Mapped[dt.datetime | None]
    access_expires_at: Mapped[dt.datetime | None]
    token_blob: Mapped[bytes | None] = mapped_column(LargeBinary)
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_id: Mapped[str | None] = mapped_column(String(255))
    keys_destroyed_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class Schedule(Base):
    """A cron slot series for one job of one user's agent."""

    __tablename__ = "schedules"
    __table_args__ = (
        Index(
            "ix_schedules_due",
            "next_run_at",
            postgresql_where=text("NOT paused"),
            sqlite_where=text("NOT paused"),
        ),
        Index("ix_schedules_user", "user_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"))
    job: Mapped[str] = mapped_column(String(200))
    cron: Mapped[str] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    spread_seconds: Mapped[int] = mapped_column(Integer, default=0)
    catch_up_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    overlap: Mapped[str] = mapped_column(String(20), default="skip")
    requeue_all: Mapped[bool] = mapped_column(default=False, server_default=false())
    paused: Mapped[bool] = mapped_column(default=False, server_default=false())
    next_slot_at: Mapped[dt.datetime]
    next_run_at: Mapped[dt.datetime]
    last_slot_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class JobRun(Base):
    """One run of a job: the row is the truth, a broker message is only a wake-up."""

    __tablename__ = "job_runs"
    __table_args__ = (
        UniqueConstraint("schedule_id", "slot_at", name="uq_job_runs_schedule_slot"),
        Index("ix_job_runs_status_lease", "status", "lease_expires_at"),
        Index("ix_job_runs_delegation_status", "delegation_id", "status"),
        Index("ix_job_runs_agent_status", "agent_id", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    job: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"))
    delegation_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("delegations.id"))
    schedule_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("schedules.id"))
    slot_at: Mapped[dt.datetime | None]
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.QUEUED.value)
    reason: Mapped[str | None] = mapped_column(String(100))
    detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[dt.datetime | None]
    not_before: Mapped[dt.datetime | None]
    queued_at: Mapped[dt.datetime]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime]


class AuditEvent(Base):
    """An append-only, hash-chained record: "user X, via agent Z (client_id), did Y"."""

    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("chain", "seq", name="uq_audit_events_chain_seq"),
        Index("ix_audit_events_user_time", "user_id", "occurred_at"),
        Index("ix_audit_events_delegation", "delegation_id"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    chain: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    occurred_at: Mapped[dt.datetime]
    action: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[uuid.UUID | None]
    user_subject: Mapped[str | None] = mapped_column(String(255))
    agent_name: Mapped[str | None] = mapped_column(String(100))
    client_id: Mapped[str | None] = mapped_column(String(255))
    actor_type: Mapped[str] = mapped_column(String(20))
    actor: Mapped[str | None] = mapped_column(String(200))
    delegation_id: Mapped[uuid.UUID | None]
    run_id: Mapped[uuid.UUID | None]
    request_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The latest (seq, hash) of one chain; locked while appending to that chain.

    `checkpointed_seq` is the seq the latest checkpoint recorded for this chain: a checkpoint
    lists only the chains whose head moved since (`seq <> checkpointed_seq`).
    """

    __tablename__ = "audit_heads"

    chain: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    checkpointed_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class AuditCheckpoint(Base):
    """A signed digest of the chain heads that moved since the previous checkpoint.

    Checkpoints form a chain of their own (`prev_digest`, unique: two concurrent checkpoints
    cannot both follow the same one). `signature` is an HMAC-SHA256 of `digest` under a fresh
    KMS data key whose wrapped form is `wrapped_key` (encryption context binds the digest).
    A `base` checkpoint is written by pruning: its `heads` are where each pruned chain now
    starts, and `detail.base_digest` names the last checkpoint the pruning removed.
    """

    __tablename__ = "audit_checkpoints"
    __table_args__ = (
        UniqueConstraint("prev_digest", name="uq_audit_checkpoints_prev_digest"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    created_at: Mapped[dt.datetime]
    kind: Mapped[str] = mapped_column(String(20), default="periodic", server_default="periodic")
    prev_digest: Mapped[str | None] = mapped_column(String(64))
    heads: Mapped[dict[str, Any]]
    detail: Mapped[dict[str, Any] | None]
    digest: Mapped[str] = mapped_column(String(64))
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(String(255))


class OutboxMessage(Base):
    """Work to do after a commit (publish a run, revoke at the AS, send a mail): ids only."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_pending",
            "available_at",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    topic: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]]
    dedupe_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime]
    available_at: Mapped[dt.datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[dt.datetime | None]


class ReauthLink(Base):
    """A one-click re-authorisation link, one per mail: only the hash of its token is kept.

    `kind` says why it was made (broken | reminder | operator, with `requested_by`);
    `notified_at` and `delivery` (smtp | log | undeliverable | rejected | skipped) say how its
    mail went; `used_at` is set by the repair it made, `invalidated_at` by any other repair or
    a revocation.
    """

    __tablename__ = "reauth_links"
    __table_args__ = (Index("ix_reauth_links_user_created", "user_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    delegation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("delegations.id"), index=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]
    invalidated_at: Mapped[dt.datetime | None]
    notified_at: Mapped[dt.datetime | None]
    kind: Mapped[str] = mapped_column(String(20), default="broken", server_default="broken")
    requested_by: Mapped[str | None] = mapped_column(String(200))
    delivery: Mapped[str | None] = mapped_column(String(20))


class AuthorizationRequest(Base):
    """A pending authorisation request (connect, sign-in or re-auth), keyed by its state's hash.

    The PKCE verifier is kept sealed; the state is bound to the browser by a cookie whose hash
    is stored here, and is single-use (`used_at`).
    """

    __tablename__ = "authorization_requests"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    browser_hash: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(20))
    provider_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("providers.id"))
    agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id"))
    expected_user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    reauth_link_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("reauth_links.id"))
    scopes: Mapped[list[str]] = mapped_column(default=list)
    nonce: Mapped[str | None] = mapped_column(String(128))
    verifier_blob: Mapped[bytes] = mapped_column(LargeBinary)
    redirect_uri: Mapped[str] = mapped_column(String(500))
    return_to: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]
