"""Connecting an agent (and signing in): pending authorisation requests and the grant they end in.

A pending request is created when a browser is sent to the AS and consumed, once, when the AS
sends it back. What is stored about it (`authorization_requests`) is enough to check the
callback and nothing more: the state only as its SHA-256; the browser binding (a random value
in an HttpOnly, SameSite cookie) only as its SHA-256; the PKCE verifier (43-128 characters from
a CSPRNG) encrypted with AES-GCM under a key derived from the deployment's secret key *and the
state*, so the database alone never yields it. A request expires in minutes.

`Connector.finish_connect` checks, in this order, and refuses with `ConnectRefused` (a stable
`reason`, an HTTP status and a message safe to show; never a token, code or state):

    state         missing / unknown / another browser / already used / expired
    session       the signed-in user is not the one who started the request
    response      `iss` differs from the provider (RFC 9207; required when advertised);
                  an error response (access_denied and the rest)
    exchange      code + verifier + the agent's client authentication; invalid_grant for a
                  replayed code, a code of another client or a PKCE mismatch
    tokens        a refresh token is required (the agent runs unattended)
    identity      the ID token (signature via JWKS, iss, aud, exp, nonce) or userinfo's `sub`
                  must be the signed-in user
    scopes        granted ⊆ requested; the agent's required scopes all granted
then seals the tokens, creates or replaces the user's delegation for the agent (same id,
version bumped) and audits `delegation:granted`. Replacing the tokens of a broken delegation
repairs it (`delegation.reauth.on_repaired`, same transaction): a re-authorisation link it was
started from is used up, the other links retired, the parked runs re-queued. A refusal after
the exchange revokes what the AS issued (best effort), so no unwanted grant lingers there,
except when the user already has a working delegation for the agent: that one may share the
grant at the AS, so the refused tokens are only dropped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from delegation import audit, reauth
from delegation.clock import Clock
from delegation.errors import (
    AgentMisconfigured,
    BehalfError,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    VaultError,
)
from delegation.oauth import CodeExchange, Endpoints, OAuthClient, new_verifier
from delegation.providers import (
    CONNECT_CALLBACK_PATH,
    ROLE_AGENT,
    SIGNIN_CALLBACK_PATH,
    callback_url,
    is_oidc,
    open_credentials,
    signin_client,
)
from delegation.tokens import ClientCredentials, TokenSet
from delegation.vault import Vault, delegation_context
from models import Agent, AuthorizationRequest, Delegation, DelegationStatus, Provider, User

log = logging.getLogger(__name__)

PURPOSE_CONNECT = "connect"
PURPOSE_SIGNIN = "signin"
STATE_TTL_SECONDS = 600
MAX_STATE_LENGTH = 128
MAX_CODE_LENGTH = 2048
MAX_PARAM_LENGTH = 2048
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-]+")
_VERIFIER_FORMAT = b"\x01"
# Error codes an AS may send back (RFC 6749 4.1.2.1, OIDC core 3.1.2.6); others are shown as
# a generic refusal, never echoed.
KNOWN_ERRORS = frozenset({
    "access_denied", "invalid_request", "unauthorized_client", "unsupported_response_type",
    "invalid_scope", "server_error", "temporarily_unavailable", "interaction_required",
    "login_required", "account_selection_required", "consent_required", "invalid_target",
})


class ConnectRefused(BehalfError):
    """A connect or sign-in step refused; the message is safe to show to the user."""

    def __init__(self, reason: str, message: str, *, status: int = 400,
                 agent: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.agent = agent


@dataclass(frozen=True, repr=False)
class CallbackParams:
    """What the AS sent to the redirect URI (already checked for size by the caller)."""

    state: str | None = None
    code: str | None = None
    iss: str | None = None
    error: str | None = None
    error_description: str | None = None

    def __repr__(self) -> str:
        return f"CallbackParams(error={self.error!r}, iss={self.iss!r})"


@dataclass(frozen=True, repr=False)
class _Pending:
    id: uuid.UUID
    purpose: str
    provider_id: uuid.UUID
    agent_id: uuid.UUID | None
    expected_user_id: uuid.UUID | None
    scopes: tuple[str, ...]
    nonce: str | None
    verifier: str
    redirect_uri: str
    return_to: str | None
    reauth_link_id: uuid.UUID | None = None


@dataclass(frozen=True)
class SignedIn:
    user_id: uuid.UUID
    subject: str
    return_to: str | None


@dataclass(frozen=True)
class Granted:
    delegation_id: uuid.UUID
    agent_name: str
    granted_scopes: tuple[str, ...]
    version: int
    reconnected: bool


# --- small pure helpers ----------------------------------------------------------------------


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_browser_binding() -> str:
    return secrets.token_urlsafe(32)


def _verifier_key(secret_key: bytes, state: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=state.encode(),
                info=b"behalf/pkce-verifier/v1").derive(secret_key)


def seal_verifier(secret_key: bytes, state: str, request_id: uuid.UUID, verifier: str) -> bytes:
    nonce = os.urandom(12)
    return _VERIFIER_FORMAT + nonce + AESGCM(_verifier_key(secret_key, state)).encrypt(
        nonce, verifier.encode(), request_id.bytes)


def open_verifier(secret_key: bytes, state: str, request_id: uuid.UUID, blob: bytes) -> str:
    if len(blob) < 1 + 12 + 16 or blob[:1] != _VERIFIER_FORMAT:
        raise ConnectRefused("unknown_state", "This answer does not belong to any request "
                             "we made. Please start again.")
    try:
        return AESGCM(_verifier_key(secret_key, state)).decrypt(
            blob[1:13], blob[13:], request_id.bytes).decode()
    except InvalidTag:
        raise ConnectRefused("unknown_state", "This answer does not belong to any request "
                             "we made. Please start again.") from None


def valid_token_syntax(value: str, max_length: int) -> bool:
    return 0 < len(value) <= max_length and bool(_TOKEN_CHARS.fullmatch(value))


def safe_return_to(value: str | None) -> str | None:
    """A local path to go back to after sign-in, or None (no open redirects)."""
    if not value or len(value) > 500 or not value.startswith("/") or value.startswith("//"):
        return None
    if "\\" in value or any(ord(c) < 0x21 for c in value):
        return None
    return value


# --- the connector ---------------------------------------------------------------------------


class Connector:
    """Start and finish authorisation requests for one deployment (its URL and environment)."""

    def __init__(
        self, sessions: sessionmaker[Session], vault: Vault, oauth: OAuthClient, clock: Clock,
        *, secret_key: bytes, public_url: str, environment: str,
        state_ttl: int = STATE_TTL_SECONDS,
    ) -> None:
        if len(secret_key) < 32:
            raise ValueError("the secret key must be at least 32 bytes")
        self._sessions = sessions
        self._vault = vault
        self._oauth = oauth
        self._clock = clock
        self._secret = secret_key
        self._public_url = public_url
        self._environment = environment
        self._ttl = state_ttl

    @property
    def connect_redirect_uri(self) -> str:
        return callback_url(self._public_url, CONNECT_CALLBACK_PATH)

    @property
    def signin_redirect_uri(self) -> str:
        return callback_url(self._public_url, SIGNIN_CALLBACK_PATH)

    # --- sign-in ---------------------------------------------------------------------------

    def start_signin(self, *, browser: str, return_to: str | None) -> str:
        client = signin_client(self._sessions, self._vault, self._environment)
        if client is None:
            raise ConnectRefused(
                "signin_not_configured",
                "Sign-in is not set up yet: an operator has to run "
                "`behalf provider add NAME --issuer URL --signin`.", status=503)
        return self._start(
            purpose=PURPOSE_SIGNIN, endpoints=client.endpoints, client_id=client.client_id,
            provider_id=client.provider_id, agent_id=client.agent_id, expected_user_id=None,
            scopes=list(client.scopes), nonce=True, browser=browser,
            redirect_uri=self.signin_redirect_uri,
            return_to=safe_return_to(return_to),
        )

    def finish_signin(self, params: CallbackParams, *, browser: str | None) -> SignedIn:
        pending = self._consume(params.state, browser, PURPOSE_SIGNIN)
        client = signin_client(self._sessions, self._vault, self._environment)
        if client is None or client.agent_id != pending.agent_id:
            raise ConnectRefused("signin_not_configured",
                                 "Sign-in changed while you were away. Please sign in again.",
                                 status=409)
        self._check_response(params, client.endpoints)
        exchange = self._exchange(client.endpoints, client.credentials, params, pending)
        try:
            if not exchange.id_token:
                raise ConnectRefused("no_identity", "The authorization server sent no ID "
                                     "token, so we cannot tell who you are.")
            claims = self._validated_claims(client.endpoints, client.client_id,
                                            exchange.id_token, pending.nonce)
            subject = str(claims["sub"])
        except ConnectRefused:
            self._discard(client.endpoints, client.credentials, exchange.tokens)
            raise
        email = self._verified_email(client.endpoints, exchange.tokens, claims)
        if exchange.tokens.refresh_token:  # never wanted for a sign-in: do not leave it live
            self._discard(client.endpoints, client.credentials, exchange.tokens)
        now = self._clock.now()
        with self._sessions.begin() as session:
            user = session.scalars(
                select(User).where(User.issuer == client.issuer, User.subject == subject)
            ).one_or_none()
            if user is None:
                user = User(id=uuid.uuid4(), issuer=client.issuer, subject=subject,
                            created_at=now)
                session.add(user)
                session.flush()
            if email is not None and user.email != email:
                user.email = email  # where re-authorisation mails go
            audit.append(session, audit.AuditRecord(
                action="user:session:signed_in", actor_type="user", actor=subject,
                user_id=user.id, user_subject=subject, client_id=client.client_id,
            ), now)
            return SignedIn(user.id, subject, pending.return_to)

    # --- connect ---------------------------------------------------------------------------

    def start_connect(self, agent_name: str, *, user_id: uuid.UUID, browser: str,
                      scopes: list[str] | None = None,
                      reauth_link_id: uuid.UUID | None = None) -> str:
        """The authorisation URL for `user_id` to connect `agent_name` (recorded pending).

        A re-authorisation passes the scopes to ask for again and, when it came from a mail,
        the link it was started from (used up by the repair)."""
        with self._sessions() as session:
            row = session.execute(
                select(Agent, Provider).join(Provider, Agent.provider_id == Provider.id)
                .where(Agent.name == agent_name, Agent.environment == self._environment,
                       Agent.role == ROLE_AGENT)
            ).one_or_none()
            if row is None:
                raise ConnectRefused("unknown_agent", "There is no such agent.", status=404)
            agent, provider = row._tuple()
            user = session.get(User, user_id)
            if user is None:
                raise ConnectRefused("not_signed_in", "Please sign in again.", status=401)
            if agent.status != "active":
                raise ConnectRefused("agent_unavailable",
                                     f"The agent {agent.name} cannot be connected right now "
                                     "(an operator has to fix its client).", status=409,
                                     agent=agent.name)
            if provider.issuer != user.issuer:
                raise ConnectRefused(
                    "other_provider", f"The agent {agent.name} uses another authorization "
                    "server than the one you signed in with.", status=409, agent=agent.name)
            metadata = dict(provider.discovered or {})
            scopes = list(scopes if scopes is not None else agent.scopes or [])
            oidc = is_oidc(metadata)
            if oidc and "openid" not in scopes:
                scopes.insert(0, "openid")  # an ID token tells us who consented
            return self._start(
                purpose=PURPOSE_CONNECT, endpoints=Endpoints.from_metadata(metadata),
                client_id=agent.client_id, provider_id=provider.id, agent_id=agent.id,
                expected_user_id=user.id, scopes=scopes, nonce=oidc, browser=browser,
                redirect_uri=self.connect_redirect_uri, return_to=None,
                reauth_link_id=reauth_link_id,
            )

    def finish_connect(self, params: CallbackParams, *, browser: str | None,
                       user_id: uuid.UUID | None) -> Granted:
        pending = self._consume(params.state, browser, PURPOSE_CONNECT)
        if user_id is None or pending.expected_user_id != user_id:
            raise ConnectRefused("other_user", "You are not signed in as the person who "
                                 "started this connection. Sign in again and reconnect.",
                                 status=403)
        assert pending.agent_id is not None
        with self._sessions() as session:
            agent = session.get(Agent, pending.agent_id)
            provider = session.get(Provider, pending.provider_id)
            user = session.get(User, user_id)
            if agent is None or provider is None or user is None:
                raise ConnectRefused("unknown_agent", "There is no such agent.", status=404)
            agent_name, client_id = agent.name, agent.client_id
            agent_scopes = list(agent.scopes or [])
            required = list(agent.required_scopes or [])
            endpoints = Endpoints.from_metadata(provider.discovered)
            user_issuer, user_subject = user.issuer, user.subject
            try:
                credentials = open_credentials(self._vault, agent)
            except VaultError:
                log.exception("cannot open the credentials of agent %s", agent_name)
                raise ConnectRefused("agent_unavailable", "The agent cannot be connected "
                                     "right now.", status=503, agent=agent_name) from None
        try:
            self._check_response(params, endpoints)
        except ConnectRefused as exc:
            exc.agent = agent_name
            raise
        exchange = self._exchange(endpoints, credentials, params, pending, agent=agent_name)
        consenting = user_subject  # whose grant the AS just issued, as far as we know yet
        try:
            tokens = exchange.tokens
            if not tokens.refresh_token:
                raise ConnectRefused(
                    "no_refresh_token", "The authorization server issued no refresh token, "
                    f"so {agent_name} could not work while you are away. Nothing was saved.",
                    agent=agent_name)
            if exchange.id_token:
                subject = self._validated_subject(endpoints, client_id, exchange.id_token,
                                                  pending.nonce)
            else:
                subject = self._userinfo_subject(endpoints, tokens)
            consenting = subject
            if subject != user_subject or endpoints.issuer != user_issuer:
                raise ConnectRefused(
                    "other_user", "You consented at the authorization server as someone "
                    "other than the person signed in here. Nothing was saved.", status=403,
                    agent=agent_name)
            granted = self._granted_scopes(exchange, pending, agent_scopes, required,
                                           agent_name)
            return self._store(user_id, pending.agent_id, agent_name, client_id, user_subject,
                               agent_scopes, granted, tokens,
                               reauth_link_id=pending.reauth_link_id)
        except ConnectRefused as exc:
            exc.agent = exc.agent or agent_name
            self._discard(endpoints, credentials, exchange.tokens, keep_grant=self._grant_in_use(
                pending.agent_id, endpoints.issuer, consenting))
            raise
        except Exception:
            self._discard(endpoints, credentials, exchange.tokens, keep_grant=self._grant_in_use(
                pending.agent_id, endpoints.issuer, consenting))
            raise

    # --- steps -----------------------------------------------------------------------------

    def _start(
        self, *, purpose: str, endpoints: Endpoints, client_id: str, provider_id: uuid.UUID,
        agent_id: uuid.UUID | None, expected_user_id: uuid.UUID | None, scopes: list[str],
        nonce: bool, browser: str, redirect_uri: str, return_to: str | None,
        reauth_link_id: uuid.UUID | None = None,
    ) -> str:
        now = self._clock.now()
        state = secrets.token_urlsafe(32)
        verifier = new_verifier()
        nonce_value = secrets.token_urlsafe(24) if nonce else None
        request_id = uuid.uuid4()
        with self._sessions.begin() as session:
            # Housekeeping: requests are useless once expired; keep a day for investigations.
            session.execute(delete(AuthorizationRequest).where(
                AuthorizationRequest.expires_at < now - dt.timedelta(days=1)))
            session.add(AuthorizationRequest(
                id=request_id, state_hash=digest(state), browser_hash=digest(browser),
                purpose=purpose, provider_id=provider_id, agent_id=agent_id,
                expected_user_id=expected_user_id, scopes=scopes, nonce=nonce_value,
                verifier_blob=seal_verifier(self._secret, state, request_id, verifier),
                redirect_uri=redirect_uri, return_to=return_to, created_at=now,
                expires_at=now + dt.timedelta(seconds=self._ttl),
                reauth_link_id=reauth_link_id,
            ))
        return self._oauth.authorization_url(
            endpoints, client_id=client_id, redirect_uri=redirect_uri, scopes=scopes,
            state=state, verifier=verifier, nonce=nonce_value,
        )

    def _consume(self, state: str | None, browser: str | None, purpose: str) -> _Pending:
        """Check the state against this browser and mark it used; nothing changes otherwise."""
        start_again = ("Please start again." if purpose == PURPOSE_SIGNIN
                       else "Please connect the agent again.")
        if not state:
            raise ConnectRefused("missing_state", "The authorization server's answer has no "
                                 f"state, so it cannot be matched to a request. {start_again}")
        if not valid_token_syntax(state, MAX_STATE_LENGTH):
            raise ConnectRefused("unknown_state", "This answer does not belong to any request "
                                 f"we made. {start_again}")
        now = self._clock.now()
        with self._sessions.begin() as session:
            row = session.scalars(
                select(AuthorizationRequest)
                .where(AuthorizationRequest.state_hash == digest(state))
            ).one_or_none()
            if row is None or row.purpose != purpose:
                raise ConnectRefused("unknown_state", "This answer does not belong to any "
                                     f"request we made. {start_again}")
            if not browser or not hmac.compare_digest(row.browser_hash, digest(browser)):
                raise ConnectRefused("other_browser", "This answer belongs to a request "
                                     "started in another browser. Start again in this one.")
            if row.used_at is not None:
                raise ConnectRefused("replayed_state", "This answer was already used. "
                                     f"{start_again}")
            if row.expires_at <= now:
                raise ConnectRefused("expired_state", "This request expired (it is valid for "
                                     f"{self._ttl // 60} minutes). {start_again}")
            claimed = session.execute(
                update(AuthorizationRequest)
                .where(AuthorizationRequest.id == row.id, AuthorizationRequest.used_at.is_(None))
                .values(used_at=now)
                .execution_options(synchronize_session=False)
            )
            if getattr(claimed, "rowcount", 0) != 1:
                raise ConnectRefused("replayed_state", "This answer was already used. "
                                     f"{start_again}")
            return _Pending(
                id=row.id, purpose=row.purpose, provider_id=row.provider_id,
                agent_id=row.agent_id, expected_user_id=row.expected_user_id,
                scopes=tuple(row.scopes or ()), nonce=row.nonce,
                verifier=open_verifier(self._secret, state, row.id, row.verifier_blob),
                redirect_uri=row.redirect_uri, return_to=row.return_to,
                reauth_link_id=row.reauth_link_id,
            )

    @staticmethod
    def _check_response(params: CallbackParams, endpoints: Endpoints) -> None:
        if params.iss is not None and params.iss != endpoints.issuer:
            raise ConnectRefused("issuer_mismatch", "The answer came from another "
                                 "authorization server than the one we asked (RFC 9207). "
                                 "Nothing was saved.")
        if params.iss is None and endpoints.iss_parameter_supported:
            raise ConnectRefused("issuer_missing", "The authorization server's answer does "
                                 "not name its issuer, though it says it always does "
                                 "(RFC 9207). Nothing was saved.")
        if params.error is not None:
            if params.error == "access_denied":
                raise ConnectRefused("access_denied", "You declined the request at the "
                                     "authorization server. Nothing was connected.",
                                     status=403)
            code = params.error if params.error in KNOWN_ERRORS else "an error"
            if params.error == "temporarily_unavailable" or params.error == "server_error":
                raise ConnectRefused("provider_unavailable", "The authorization server is "
                                     "unavailable right now. Nothing was saved; please try "
                                     "again in a few minutes.", status=503)
            raise ConnectRefused("authorization_error", "The authorization server refused "
                                 f"the request ({code}). Nothing was saved.")
        if params.code is None:
            raise ConnectRefused("missing_code", "The authorization server's answer has no "
                                 "code. Nothing was saved.")

    def _exchange(self, endpoints: Endpoints, credentials: ClientCredentials,
                  params: CallbackParams, pending: _Pending, *,
                  agent: str | None = None) -> CodeExchange:
        assert params.code is not None
        try:
            return self._oauth.exchange_code(endpoints, credentials, code=params.code,
                                             verifier=pending.verifier,
                                             redirect_uri=pending.redirect_uri)
        except ReauthRequired:
            raise ConnectRefused(
                "code_rejected", "The authorization server did not accept this answer (the "
                "code was already used, has expired, or belongs to another request). Nothing "
                "was saved; please start again.", agent=agent) from None
        except ProviderUnavailable:
            raise ConnectRefused(
                "provider_unavailable", "The authorization server did not answer. Nothing "
                "was saved; please try again in a few minutes.", status=503,
                agent=agent) from None
        except AgentMisconfigured:
            log.warning("the AS refused the client of %s during a code exchange", agent)
            raise ConnectRefused(
                "agent_misconfigured", "The authorization server refused this agent's "
                "client; an operator has to fix it. Nothing was saved.", status=502,
                agent=agent) from None
        except (ProviderError, ValueError, TypeError):
            raise ConnectRefused(
                "provider_error", "The authorization server's answer could not be used. "
                "Nothing was saved.", status=502, agent=agent) from None

    def _verified_email(self, endpoints: Endpoints, tokens: TokenSet,
                        claims: dict[str, Any]) -> str | None:
        """The user's address, only when the AS says it is verified (ID token, else
        userinfo for the same subject); None otherwise. Never a reason to refuse sign-in."""
        found = _verified(claims)
        if found is not None or not endpoints.userinfo_endpoint:
            return found
        try:
            info = self._oauth.userinfo(endpoints, tokens.access_token)
        except BehalfError:
            return None
        if info.get("sub") != claims.get("sub"):
            return None
        return _verified(info)

    def _validated_subject(self, endpoints: Endpoints, client_id: str, id_token: str,
                           nonce: str | None) -> str:
        return str(self._validated_claims(endpoints, client_id, id_token, nonce)["sub"])

    def _validated_claims(self, endpoints: Endpoints, client_id: str, id_token: str,
                          nonce: str | None) -> dict[str, Any]:
        try:
            claims = self._oauth.validate_id_token(endpoints, id_token, client_id=client_id,
                                                   nonce=nonce)
        except ProviderUnavailable:
            raise ConnectRefused("provider_unavailable", "The authorization server did not "
                                 "answer. Nothing was saved; please try again in a few "
                                 "minutes.", status=503) from None
        except ProviderError as exc:
            log.warning("ID token refused: %s", str(exc)[:200])
            raise ConnectRefused("id_token_invalid", "The authorization server's proof of "
                                 "who you are (ID token) did not check out. Nothing was "
                                 "saved.", status=502) from None
        if nonce is not None and claims.get("nonce") != nonce:
            raise ConnectRefused("id_token_invalid", "The authorization server's proof of "
                                 "who you are (ID token) did not check out. Nothing was "
                                 "saved.", status=502)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise ConnectRefused("id_token_invalid", "The ID token names nobody. Nothing "
                                 "was saved.", status=502)
        return claims

    def _userinfo_subject(self, endpoints: Endpoints, tokens: TokenSet) -> str:
        if not endpoints.userinfo_endpoint:
            raise ConnectRefused("no_identity", "The authorization server said neither who "
                                 "consented (no ID token) nor offers a userinfo endpoint. "
                                 "Nothing was saved.", status=502)
        try:
            info: dict[str, Any] = self._oauth.userinfo(endpoints, tokens.access_token)
        except ProviderUnavailable:
            raise ConnectRefused("provider_unavailable", "The authorization server did not "
                                 "answer. Nothing was saved; please try again in a few "
                                 "minutes.", status=503) from None
        except BehalfError:
            raise ConnectRefused("no_identity", "The authorization server would not say "
                                 "who consented. Nothing was saved.", status=502) from None
        subject = info.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise ConnectRefused("no_identity", "The authorization server would not say "
                                 "who consented. Nothing was saved.", status=502)
        return subject

    @staticmethod
    def _granted_scopes(exchange: CodeExchange, pending: _Pending, agent_scopes: list[str],
                        required: list[str], agent_name: str) -> list[str]:
        requested = set(pending.scopes)
        # RFC 6749 5.1: no `scope` in the answer means exactly what was requested.
        granted = set(exchange.granted_scopes if exchange.granted_scopes is not None
                      else pending.scopes)
        wider = sorted(granted - requested)
        if wider:
            raise ConnectRefused(
                "scope_widened", "The authorization server granted more than was asked "
                f"({' '.join(wider)[:200]}). Nothing was saved.", status=502, agent=agent_name)
        recorded = [s for s in agent_scopes if s in granted]
        missing = [s for s in required if s not in granted]
        if missing:
            raise ConnectRefused(
                "required_scope_missing", f"{agent_name} needs {' '.join(missing)}, which "
                "was not granted. Nothing was saved; connect again and allow it.",
                agent=agent_name)
        if not recorded:
            raise ConnectRefused(
                "nothing_granted", f"None of {agent_name}'s permissions was granted. "
                "Nothing was saved.", agent=agent_name)
        return recorded

    def _store(self, user_id: uuid.UUID, agent_id: uuid.UUID, agent_name: str,
               client_id: str, user_subject: str, agent_scopes: list[str],
               granted: list[str], tokens: TokenSet, *,
               reauth_link_id: uuid.UUID | None = None) -> Granted:
        now = self._clock.now()
        with self._sessions.begin() as session:
            row = session.scalars(
                select(Delegation)
                .where(Delegation.user_id == user_id, Delegation.agent_id == agent_id)
                .with_for_update()
            ).one_or_none()
            reconnected = row is not None
            previous_status = row.status if row is not None else None
            if row is None:
                row = Delegation(id=uuid.uuid4(), user_id=user_id, agent_id=agent_id,
                                 version=1, created_at=now)
                session.add(row)
            else:
                if row.status == DelegationStatus.REVOKED and row.keys_destroyed_at is None:
                    # Its old tokens are still to be revoked at the AS; replacing them now
                    # would lose that revocation (or let it destroy the new tokens).
                    raise ConnectRefused(
                        "revocation_pending", f"Your earlier revocation of {agent_name} is "
                        "still being completed at the authorization server. Please try "
                        "again in a minute.", status=409, agent=agent_name)
                row.version += 1
            # A fresh data key per grant: nothing of an earlier grant opens the new tokens.
            sealed = self._vault.seal(tokens.to_bytes(),
                                      delegation_context(user_id, row.id, agent_id))
            row.token_blob, row.wrapped_key, row.key_id = (sealed.blob, sealed.wrapped_key,
                                                           sealed.key_id)
            row.requested_scopes = agent_scopes
            row.granted_scopes = granted
            row.status = DelegationStatus.ACTIVE.value
            row.status_reason = None
            row.granted_at = now
            row.broken_at = None
            row.revoked_at = None
            row.keys_destroyed_at = None
            row.refreshed_at = None
            row.access_expires_at = tokens.expires_at
            row.updated_at = now
            session.flush()
            audit.append(session, audit.AuditRecord(
                action="delegation:granted", actor_type="user", actor=user_subject,
                user_id=user_id, user_subject=user_subject, agent_name=agent_name,
                client_id=client_id, delegation_id=row.id,
                detail={"scopes_requested": agent_scopes, "scopes_granted": granted,
                        "version": row.version, "reconnected": reconnected},
            ), now)
            # --- re-authorisation (issue #7): a repair uses its link, retires the others and
            # re-queues the parked runs, all in this transaction; a dead link stores nothing.
            if previous_status is not None or reauth_link_id is not None:
                try:
                    reauth.on_repaired(
                        session, delegation_id=row.id, user_id=user_id,
                        previous_status=previous_status or "", link_id=reauth_link_id,
                        now=now, user_subject=user_subject, agent_name=agent_name,
                        client_id=client_id)
                except reauth.LinkRefused as exc:
                    raise ConnectRefused(exc.reason, str(exc), status=exc.status,
                                         agent=agent_name) from None
            # --- end re-authorisation
            return Granted(row.id, agent_name, tuple(granted), row.version, reconnected)

    def _grant_in_use(self, agent_id: uuid.UUID, issuer: str, subject: str) -> bool:
        """Does an active delegation hold tokens of `subject`'s grant to this agent?

        Many ASes keep one grant per user and client, and revoking a refresh token revokes
        the whole grant: a refused reconnect must not take a working delegation down with it.
        """
        try:
            with self._sessions() as session:
                found = session.scalars(
                    select(Delegation.id).join(User, Delegation.user_id == User.id)
                    .where(Delegation.agent_id == agent_id,
                           Delegation.status == DelegationStatus.ACTIVE.value,
                           User.issuer == issuer, User.subject == subject).limit(1)
                ).first()
        except Exception:  # cannot tell: the careful answer
            log.warning("could not check for a delegation sharing the refused grant",
                        exc_info=True)
            return True
        return found is not None

    def _discard(self, endpoints: Endpoints, credentials: ClientCredentials,
                 tokens: TokenSet, *, keep_grant: bool = False) -> None:
        """Revoke tokens we will not keep (best effort: the refusal stands either way).

        With `keep_grant` nothing is revoked, the tokens are only dropped: at ASes that keep
        one grant per user and client (oidc-provider among them), revoking either token
        revokes the whole grant, and with it the user's working delegation.
        """
        if keep_grant or not endpoints.revocation_endpoint:
            return
        token, hint = ((tokens.refresh_token, "refresh_token") if tokens.refresh_token
                       else (tokens.access_token, "access_token"))
        try:
            self._oauth.revoke(endpoints, credentials, token, hint)
        except BehalfError as exc:
            log.info("could not revoke a refused grant's token at the AS: %s",
                     type(exc).__name__)


def _verified(claims: dict[str, Any]) -> str | None:
    email = claims.get("email")
    if claims.get("email_verified") is not True or not isinstance(email, str):
        return None
    if "@" not in email or len(email) > 320 or any(c in email for c in "\r\n<>,;"):
        return None
    return email
