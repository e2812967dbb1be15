"""The sandbox's state: tables (own metadata, separate from the product's) and the only code that
touches them.

Tokens, codes and client secrets are stored as SHA-256 digests, never as issued: the digest of a
high-entropy random string is enough to look it up and useless to whoever reads the file. Every
public method is one transaction under one lock, so the checks that must be atomic (refresh
token rotation, single-use codes, JWT ids) are. Records handed out are frozen snapshots, shaped
the way Authlib's model mixins expect (`get_scope`, `check_client`, ...).

A grant is one consent turned into a token family: it is born when its code is exchanged and
dies (`revoked` or `broken`) as a whole, taking every token issued under it along.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, Float, ForeignKey, Integer, String, Text, create_engine, select
from sqlalchemy import update as sql_update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from behalf.sandbox.users import DEMO_USERS, DemoUser

Clock = Callable[[], float]
TokenKind = Literal["access", "refresh"]
GrantStatus = Literal["active", "revoked", "broken"]

CODE_TTL_SECONDS = 600  # RFC 6749 §4.1.2: ten minutes at most


def digest(secret: str) -> str:
    """SHA-256 hex digest: how tokens, codes and client secrets are stored and logged."""
    return hashlib.sha256(secret.encode()).hexdigest()


# --- tables -------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    """Declarative base with the sandbox's own `MetaData`, never mixed with the product's."""


class SecretRow(Base):
    __tablename__ = "sandbox_secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ClientRow(Base):
    __tablename__ = "sandbox_clients"
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    issued_at: Mapped[int] = mapped_column(Integer)
    metadata_json: Mapped[str] = mapped_column(Text)


class GrantRow(Base):
    __tablename__ = "sandbox_grants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sub: Mapped[str] = mapped_column(String(64), index=True)
    client_id: Mapped[str] = mapped_column(String(64), index=True)
    scope: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    changed_at: Mapped[float | None] = mapped_column(Float)
    last_refreshed_at: Mapped[float | None] = mapped_column(Float)


class CodeRow(Base):
    __tablename__ = "sandbox_codes"
    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), index=True)
    sub: Mapped[str] = mapped_column(String(64))
    redirect_uri: Mapped[str] = mapped_column(Text)
    scope: Mapped[str] = mapped_column(Text)
    nonce: Mapped[str | None] = mapped_column(Text)
    code_challenge: Mapped[str] = mapped_column(String(128))
    code_challenge_method: Mapped[str] = mapped_column(String(16))
    auth_time: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float)
    grant_id: Mapped[str | None] = mapped_column(String(32))


class TokenRow(Base):
    __tablename__ = "sandbox_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(8))
    grant_id: Mapped[str] = mapped_column(ForeignKey("sandbox_grants.id"), index=True)
    client_id: Mapped[str] = mapped_column(String(64))
    sub: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(Text)
    issued_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)
    rotated_at: Mapped[float | None] = mapped_column(Float)


class JtiRow(Base):
    __tablename__ = "sandbox_used_jtis"
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float)


class ApiCallRow(Base):
    __tablename__ = "sandbox_api_calls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    sub: Mapped[str | None] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(String(64))
    token_sha256: Mapped[str | None] = mapped_column(String(64))
    duration_ms: Mapped[int] = mapped_column(Integer)


class ReportRow(Base):
    __tablename__ = "sandbox_reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sub: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str | None] = mapped_column(String(64))


# --- records (frozen snapshots; the method names are the ones Authlib calls) --------------------


@dataclass(frozen=True)
class Client:
    client_id: str
    secret_hash: str | None
    issued_at: int
    metadata: Mapping[str, Any]

    @property
    def client_name(self) -> str:
        return str(self.metadata.get("client_name") or self.client_id)

    @property
    def auth_method(self) -> str:
        return str(self.metadata.get("token_endpoint_auth_method", "client_secret_basic"))

    @property
    def scopes(self) -> list[str]:
        return str(self.metadata.get("scope", "")).split()

    @property
    def redirect_uris(self) -> list[str]:
        return [str(uri) for uri in self.metadata.get("redirect_uris", [])]

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        uris = self.redirect_uris
        return uris[0] if len(uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """The requested scope if the client may ask for all of it, else None (`invalid_scope`)."""
        if not scope:
            return " ".join(self.scopes)
        requested = scope.split()
        if not set(requested) <= set(self.scopes):
            return None
        return " ".join(dict.fromkeys(requested))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        if self.secret_hash is None:
            return False
        return hmac.compare_digest(self.secret_hash, digest(client_secret))

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        # One method for every endpoint that authenticates clients (token, revocation,
        # introspection), as the registration's `token_endpoint_auth_method` says.
        return method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type in self.metadata.get("response_types", ["code"])

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.metadata.get("grant_types", ["authorization_code"])


@dataclass(frozen=True)
class AuthorizationCode:
    code_hash: str
    client_id: str
    sub: str
    redirect_uri: str
    scope: str
    nonce: str | None
    code_challenge: str
    code_challenge_method: str
    auth_time: int

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


@dataclass(frozen=True)
class Token:
    id: int
    kind: TokenKind
    grant_id: str
    client_id: str
    sub: str
    scope: str
    issued_at: float
    expires_at: float | None
    expired: bool  # as of when this snapshot was read
    revoked: bool  # revoked, rotated away, or its grant is dead

    @property
    def user(self) -> DemoUser | None:
        return DEMO_USERS.get(self.sub)

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return 0 if self.expires_at is None else int(self.expires_at - self.issued_at)

    def is_expired(self) -> bool:
        return self.expired

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> DemoUser | None:
        return self.user


@dataclass(frozen=True)
class GrantInfo:
    """One consent and the token family born from it, as the admin page and `grants()` show it."""

    id: str
    sub: str
    client_id: str
    client_name: str
    scope: str
    status: GrantStatus
    status_reason: str | None
    created_at: float
    changed_at: float | None
    last_refreshed_at: float | None


@dataclass(frozen=True)
class ApiCall:
    """One request the sandbox API received. `token_sha256` is the digest, never the token."""

    at: float
    method: str
    path: str
    status: int
    sub: str | None
    client_id: str | None
    token_sha256: str | None
    duration_ms: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Report:
    id: int
    sub: str
    title: str
    body: str
    created_at: float
    created_by: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the store -----------------------------------------------------------------------------------


def make_engine(database_path: Path | None) -> Engine:
    """A SQLite file, or one in-memory database shared by every thread of this process."""
    if database_path is None:
        return create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    database_path.parent.mkdir(parents=True, exist_ok=True)
    return create_engine(f"sqlite:///{database_path}", connect_args={"check_same_thread": False})


class Store:
    def __init__(self, engine: Engine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._lock = threading.RLock()
        Base.metadata.create_all(engine)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._lock, self._sessions.begin() as session:
            yield session

    # secrets (signing key, session key) -------------------------------------------------------

    def secret(self, name: str, create: Callable[[], str]) -> str:
        """The persisted secret `name`, created by `create()` the first time it is asked for."""
        with self._tx() as session:
            row = session.get(SecretRow, name)
            if row is None:
                row = SecretRow(name=name, value=create())
                session.add(row)
            return row.value

    # clients -----------------------------------------------------------------------------------

    def add_client(
        self, client_id: str, client_secret: str | None, metadata: Mapping[str, Any], issued_at: int
    ) -> Client:
        row = ClientRow(
            client_id=client_id,
            secret_hash=None if client_secret is None else digest(client_secret),
            issued_at=issued_at,
            metadata_json=json.dumps(dict(metadata)),
        )
        with self._tx() as session:
            session.add(row)
        return _client(row)

    def client(self, client_id: str) -> Client | None:
        with self._tx() as session:
            row = session.get(ClientRow, client_id)
            return None if row is None else _client(row)

    def clients(self) -> list[Client]:
        with self._tx() as session:
            return [_client(row) for row in session.scalars(select(ClientRow))]

    # authorisation codes -------------------------------------------------------------------------

    def add_code(
        self,
        code: str,
        *,
        client_id: str,
        sub: str,
        redirect_uri: str,
        scope: str,
        nonce: str | None,
        code_challenge: str,
        code_challenge_method: str,
        auth_time: int,
    ) -> None:
        row = CodeRow(
            code_hash=digest(code),
            client_id=client_id,
            sub=sub,
            redirect_uri=redirect_uri,
            scope=scope,
            nonce=nonce,
            code_challenge=code_challenge,
            code_challenge_method=code_challenge_method,
            auth_time=auth_time,
            expires_at=self._clock() + CODE_TTL_SECONDS,
        )
        with self._tx() as session:
            session.add(row)

    def code(self, code: str, client_id: str) -> AuthorizationCode | None:
        """The unused, unexpired `code` issued to `client_id`.

        A code presented a second time is an attack or a bug (RFC 6749 §4.1.2): the grant it
        produced is revoked, so every token issued from it dies.
        """
        now = self._clock()
        with self._tx() as session:
            row = session.get(CodeRow, digest(code))
            if row is None or row.client_id != client_id:
                return None
            if row.used_at is not None:
                if row.grant_id is not None:
                    _set_grant_status(session, row.grant_id, "revoked", "code reused", now)
                return None
            if row.expires_at <= now:
                return None
            return AuthorizationCode(
                code_hash=row.code_hash,
                client_id=row.client_id,
                sub=row.sub,
                redirect_uri=row.redirect_uri,
                scope=row.scope,
                nonce=row.nonce,
                code_challenge=row.code_challenge,
                code_challenge_method=row.code_challenge_method,
                auth_time=row.auth_time,
            )

    def nonce_used(self, client_id: str, nonce: str) -> bool:
        with self._tx() as session:
            found = session.scalars(
                select(CodeRow.code_hash).where(
                    CodeRow.client_id == client_id, CodeRow.nonce == nonce
                )
            ).first()
            return found is not None

    # grants and tokens ---------------------------------------------------------------------------

    def issue_tokens(
        self,
        *,
        client_id: str,
        sub: str,
        scope: str,
        access_token: str,
        refresh_token: str | None,
        expires_in: int,
        code: AuthorizationCode | None = None,
        rotated: Token | None = None,
    ) -> None:
        """Store a token response: from a `code` (a new grant) or rotating `rotated` (same grant).

        Rotation is a compare-and-set: if `rotated` was already rotated away, this is a reuse,
        the whole grant is revoked and `ReusedRefreshToken` is raised.
        """
        now = self._clock()
        if rotated is not None and not self._rotate(rotated, now):
            raise ReusedRefreshToken
        with self._tx() as session:
            if rotated is not None:
                grant_id = rotated.grant_id
                grant = session.get(GrantRow, grant_id)
                if grant is not None:
                    grant.last_refreshed_at = now
            elif code is not None:
                grant_id = uuid.uuid4().hex
                session.add(
                    GrantRow(
                        id=grant_id,
                        sub=sub,
                        client_id=client_id,
                        scope=scope,
                        status="active",
                        created_at=now,
                    )
                )
                session.execute(
                    sql_update(CodeRow)
                    .where(CodeRow.code_hash == code.code_hash)
                    .values(used_at=now, grant_id=grant_id)
                )
            else:
                raise ValueError("tokens come from a code or from a refresh token")
            session.add(
                TokenRow(
                    token_hash=digest(access_token),
                    kind="access",
                    grant_id=grant_id,
                    client_id=client_id,
                    sub=sub,
                    scope=scope,
                    issued_at=now,
                    expires_at=now + expires_in,
                )
            )
            if refresh_token is not None:
                session.add(
                    TokenRow(
                        token_hash=digest(refresh_token),
                        kind="refresh",
                        grant_id=grant_id,
                        client_id=client_id,
                        sub=sub,
                        scope=scope,
                        issued_at=now,
                        expires_at=None,
                    )
                )

    def _rotate(self, token: Token, now: float) -> bool:
        """Mark `token` rotated unless it already was; if it was, revoke its grant (committed)."""
        with self._tx() as session:
            swapped = session.execute(
                sql_update(TokenRow)
                .where(TokenRow.id == token.id, TokenRow.rotated_at.is_(None))
                .values(rotated_at=now)
            )
            if getattr(swapped, "rowcount", 0) == 1:
                return True
            _set_grant_status(session, token.grant_id, "revoked", "refresh token reused", now)
            return False

    def token(self, token: str) -> Token | None:
        """The token whose value is `token`, live or not (callers ask `is_revoked`/`is_expired`)."""
        with self._tx() as session:
            row = session.scalars(
                select(TokenRow).where(TokenRow.token_hash == digest(token))
            ).first()
            return None if row is None else self._token(session, row)

    def refresh_token(self, token: str) -> Token | None:
        """The live refresh token `token`; a rotated-away one revokes its grant (reuse detected)."""
        now = self._clock()
        with self._tx() as session:
            row = session.scalars(
                select(TokenRow).where(
                    TokenRow.token_hash == digest(token), TokenRow.kind == "refresh"
                )
            ).first()
            if row is None:
                return None
            if row.rotated_at is not None:
                _set_grant_status(session, row.grant_id, "revoked", "refresh token reused", now)
                return None
            record = self._token(session, row)
            return None if record.revoked or record.expired else record

    def revoke(self, token: Token) -> None:
        """RFC 7009: an access token dies alone; a refresh token takes its whole grant along."""
        now = self._clock()
        with self._tx() as session:
            if token.kind == "refresh":
                _set_grant_status(session, token.grant_id, "revoked", "refresh token revoked", now)
            else:
                session.execute(
                    sql_update(TokenRow)
                    .where(TokenRow.id == token.id, TokenRow.revoked_at.is_(None))
                    .values(revoked_at=now)
                )

    def break_grants(self, sub: str, client_id: str) -> int:
        """Mark every active grant of `sub` to `client_id` broken; returns how many."""
        now = self._clock()
        with self._tx() as session:
            ids = session.scalars(
                select(GrantRow.id).where(
                    GrantRow.sub == sub,
                    GrantRow.client_id == client_id,
                    GrantRow.status == "active",
                )
            ).all()
            for grant_id in ids:
                _set_grant_status(session, grant_id, "broken", "broken from the sandbox", now)
            return len(ids)

    def break_grant(self, grant_id: str) -> bool:
        now = self._clock()
        with self._tx() as session:
            grant = session.get(GrantRow, grant_id)
            if grant is None or grant.status != "active":
                return False
            _set_grant_status(session, grant_id, "broken", "broken from the sandbox", now)
            return True

    def grants(self) -> list[GrantInfo]:
        with self._tx() as session:
            names = {
                row.client_id: _client(row).client_name
                for row in session.scalars(select(ClientRow))
            }
            rows = session.scalars(select(GrantRow).order_by(GrantRow.created_at.desc()))
            return [
                GrantInfo(
                    id=row.id,
                    sub=row.sub,
                    client_id=row.client_id,
                    client_name=names.get(row.client_id, row.client_id),
                    scope=row.scope,
                    status=_grant_status(row.status),
                    status_reason=row.status_reason,
                    created_at=row.created_at,
                    changed_at=row.changed_at,
                    last_refreshed_at=row.last_refreshed_at,
                )
                for row in rows
            ]

    def use_jti(self, client_id: str, jti: str, expires_at: float) -> bool:
        """Remember a client assertion's `jti`; False if it was seen before (a replay)."""
        now = self._clock()
        with self._tx() as session:
            if session.get(JtiRow, (client_id, jti)) is not None:
                return False
            session.add(JtiRow(client_id=client_id, jti=jti, expires_at=max(expires_at, now)))
            return True

    def _token(self, session: Session, row: TokenRow) -> Token:
        grant = session.get(GrantRow, row.grant_id)
        dead_grant = grant is None or grant.status != "active"
        return Token(
            id=row.id,
            kind="refresh" if row.kind == "refresh" else "access",
            grant_id=row.grant_id,
            client_id=row.client_id,
            sub=row.sub,
            scope=row.scope,
            issued_at=row.issued_at,
            expires_at=row.expires_at,
            expired=row.expires_at is not None and row.expires_at <= self._clock(),
            revoked=dead_grant or row.revoked_at is not None or row.rotated_at is not None,
        )

    # the API's own data ---------------------------------------------------------------------------

    def record_call(self, call: ApiCall) -> None:
        with self._tx() as session:
            session.add(ApiCallRow(**asdict(call)))

    def calls(self) -> list[ApiCall]:
        with self._tx() as session:
            rows = session.scalars(select(ApiCallRow).order_by(ApiCallRow.id))
            return [
                ApiCall(
                    at=row.at,
                    method=row.method,
                    path=row.path,
                    status=row.status,
                    sub=row.sub,
                    client_id=row.client_id,
                    token_sha256=row.token_sha256,
                    duration_ms=row.duration_ms,
                )
                for row in rows
            ]

    def seed_reports(self, reports: Mapping[str, list[tuple[str, str]]]) -> None:
        """Give each demo user something to read, once (on the first start of a database)."""
        now = self._clock()
        with self._tx() as session:
            if session.scalars(select(ReportRow.id)).first() is not None:
                return
            for sub, items in reports.items():
                for title, body in items:
                    session.add(
                        ReportRow(sub=sub, title=title, body=body, created_at=now, created_by=None)
                    )

    def reports(self, sub: str) -> list[Report]:
        with self._tx() as session:
            rows = session.scalars(
                select(ReportRow).where(ReportRow.sub == sub).order_by(ReportRow.id)
            )
            return [_report(row) for row in rows]

    def add_report(self, sub: str, title: str, body: str, created_by: str | None) -> Report:
        row = ReportRow(
            sub=sub, title=title, body=body, created_at=self._clock(), created_by=created_by
        )
        with self._tx() as session:
            session.add(row)
            session.flush()
            return _report(row)


class ReusedRefreshToken(Exception):
    """A refresh token was presented after it had been rotated away; its grant is now revoked."""


def _set_grant_status(
    session: Session, grant_id: str, status: GrantStatus, reason: str, now: float
) -> None:
    session.execute(
        sql_update(GrantRow)
        .where(GrantRow.id == grant_id, GrantRow.status == "active")
        .values(status=status, status_reason=reason, changed_at=now)
    )


def _grant_status(value: str) -> GrantStatus:
    if value == "revoked":
        return "revoked"
    if value == "broken":
        return "broken"
    return "active"


def _client(row: ClientRow) -> Client:
    return Client(
        client_id=row.client_id,
        secret_hash=row.secret_hash,
        issued_at=row.issued_at,
        metadata=json.loads(row.metadata_json),
    )


def _report(row: ReportRow) -> Report:
    return Report(
        id=row.id,
        sub=row.sub,
        title=row.title,
        body=row.body,
        created_at=row.created_at,
        created_by=row.created_by,
    )
