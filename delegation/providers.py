"""Providers and the OAuth clients behalf holds at them: discovery, registration, key rotation.

A provider is an authorisation server found by metadata discovery (RFC 8414, then OpenID
Connect discovery) and stored with the endpoints it published. An agent is one OAuth client per
agent per environment, registered dynamically (RFC 7591) as a confidential client, by default
with `private_key_jwt` (RFC 7523: the key pair is generated here, the public JWK sent to the AS,
the private key sealed by the vault) or added by hand. The deployment's sign-in client is an
`openid`-only OIDC client stored the same way (role `signin`), so key rotation and the vault
treat both alike. Every change is audited with the operator's name; no secret reaches the
database unsealed, a log line or an error.

    add_provider / list_providers
    register_agent / add_agent / list_agents / rotate_key
    register_signin_client / signin_client
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from joserfc.errors import JoseError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from delegation import audit
from delegation.clock import Clock
from delegation.errors import (
    AgentMisconfigured,
    BehalfError,
    ProviderError,
    ReauthRequired,
)
from delegation.oauth import (
    Endpoints,
    OAuthClient,
    new_private_jwk,
    new_verifier,
    public_jwk,
)
from delegation.tokens import ClientCredentials
from delegation.vault import Sealed, Vault, agent_context
from models import Agent, Provider

CONNECT_CALLBACK_PATH = "/oauth/callback"
SIGNIN_CALLBACK_PATH = "/auth/callback"
ROLE_AGENT = "agent"
ROLE_SIGNIN = "signin"
AUTH_METHODS = ("private_key_jwt", "client_secret_basic", "client_secret_post")
SIGNIN_NAME_PREFIX = "signin:"  # agent names cannot contain ':', so never a clash
# How long a rotated-out key stays published after the new one signs: longer than workers
# cache agent credentials (`delegation.store.AgentDirectory`, 30 s), plus requests in flight.
ROTATION_GRACE_SECONDS = 45.0

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_PATTERN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,200}")
# Never sent back in an RFC 7592 update (section 2.2).
_NOT_UPDATABLE = ("registration_access_token", "registration_client_uri",
                  "client_secret_expires_at", "client_id_issued_at", "client_secret")


class InvalidInput(BehalfError):
    """An argument is malformed (a name, a scope, a URL); the message says which and why."""


class Conflict(BehalfError):
    """The change would contradict what is stored (a second client for an agent, a reused
    client_id, a provider name bound to another issuer)."""


class NotFound(BehalfError):
    """No such provider or agent."""


# --- what callers see ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderInfo:
    id: uuid.UUID
    name: str
    issuer: str
    api_base: str | None
    openid: bool
    dynamic_registration: bool
    token_endpoint: str
    created_at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), "name": self.name, "issuer": self.issuer,
                "api_base": self.api_base, "openid": self.openid,
                "dynamic_registration": self.dynamic_registration,
                "token_endpoint": self.token_endpoint,
                "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class AgentInfo:
    id: uuid.UUID
    name: str
    environment: str
    role: str
    provider: str
    client_id: str
    auth_method: str
    scopes: tuple[str, ...]
    required_scopes: tuple[str, ...]
    status: str
    key_ids: tuple[str, ...]
    created_at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), "name": self.name, "environment": self.environment,
                "role": self.role, "provider": self.provider, "client_id": self.client_id,
                "auth_method": self.auth_method, "scopes": list(self.scopes),
                "required_scopes": list(self.required_scopes), "status": self.status,
                "key_ids": list(self.key_ids), "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class Rotation:
    agent: AgentInfo
    old_kid: str
    new_kid: str


@dataclass(frozen=True)
class SigninClient:
    """The deployment's OIDC client that users sign in to the pages with."""

    agent_id: uuid.UUID
    provider_id: uuid.UUID
    client_id: str
    issuer: str
    endpoints: Endpoints
    credentials: ClientCredentials
    scopes: tuple[str, ...] = ("openid",)


# --- validation ------------------------------------------------------------------------------


def check_name(name: str, what: str = "name") -> str:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise InvalidInput(f"{what} {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def parse_scopes(raw: str | Iterable[str], *, allow_empty: bool = False) -> list[str]:
    """Space-separated scopes (RFC 6749 3.3), in order, without duplicates."""
    items = raw.split() if isinstance(raw, str) else [s for part in raw for s in part.split()]
    scopes: list[str] = []
    for scope in items:
        if not SCOPE_PATTERN.fullmatch(scope):
            raise InvalidInput(f"scope {scope[:50]!r} is not a valid RFC 6749 scope token")
        if scope not in scopes:
            scopes.append(scope)
    if not scopes and not allow_empty:
        raise InvalidInput("at least one scope is needed")
    return scopes


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, what: str) -> str:
    """An https URL (http only on a loopback host, for development), no query or fragment."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidInput(f"{what} {url!r} is not an http(s) URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise InvalidInput(f"{what} {url!r} must use https (http only on localhost)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidInput(f"{what} {url!r} must not carry a query, fragment or credentials")
    return url


def callback_url(public_url: str, path: str) -> str:
    return public_url.rstrip("/") + path


def is_oidc(metadata: dict[str, Any]) -> bool:
    """Does the provider speak OpenID Connect (ID tokens, `nonce`)?"""
    return "openid" in (metadata.get("scopes_supported") or []) or bool(
        metadata.get("id_token_signing_alg_values_supported"))


@contextmanager
def _unique(what: str) -> Iterator[None]:
    """A unique constraint hit by a concurrent change becomes a clear `Conflict`."""
    try:
        yield
    except IntegrityError:
        raise Conflict(f"{what} changed meanwhile; run the command again") from None


# --- providers -------------------------------------------------------------------------------


def _provider_info(row: Provider) -> ProviderInfo:
    doc = row.discovered or {}
    return ProviderInfo(
        id=row.id, name=row.name, issuer=row.issuer, api_base=row.api_base,
        openid=is_oidc(doc), dynamic_registration=bool(doc.get("registration_endpoint")),
        token_endpoint=str(doc.get("token_endpoint", "")), created_at=row.created_at,
    )


def add_provider(
    sessions: sessionmaker[Session], oauth: OAuthClient, clock: Clock, *,
    name: str, issuer: str, api_base: str | None, operator: str,
) -> ProviderInfo:
    """Discover `issuer`'s metadata and store the provider (again: refresh its metadata).

    Refused: metadata for another issuer, no token endpoint, or PKCE without S256 when the
    AS lists its methods (`delegation.oauth.check_metadata`); a name already bound to another
    issuer.
    """
    check_name(name, "provider name")
    check_url(issuer, "issuer")
    if api_base is not None:
        check_url(api_base.rstrip("/"), "API base URL")
    with sessions() as session:
        bound = session.scalars(select(Provider.issuer).where(Provider.name == name)).first()
    if bound is not None and bound != issuer:
        raise Conflict(f"provider {name!r} is already bound to {bound}; pick another name")
    metadata = oauth.discover(issuer)
    now = clock.now()
    with _unique("the providers"), sessions.begin() as session:
        row = session.scalars(
            select(Provider).where(Provider.name == name).with_for_update()
        ).one_or_none()
        if row is not None and row.issuer != issuer:
            raise Conflict(f"provider {name!r} is already bound to {row.issuer}; "
                           "pick another name")
        action = "provider:metadata:refreshed"
        if row is None:
            row = Provider(id=uuid.uuid4(), name=name, issuer=issuer, created_at=now)
            session.add(row)
            action = "provider:added"
        row.discovered = metadata
        if api_base is not None:
            row.api_base = api_base.rstrip("/")
        session.flush()
        audit.append(session, audit.AuditRecord(
            action=action, actor_type="operator", actor=operator,
            detail={"provider": name, "issuer": issuer, "api_base": row.api_base,
                    "token_endpoint": metadata.get("token_endpoint"),
                    "registration_endpoint": metadata.get("registration_endpoint")},
        ), now)
        return _provider_info(row)


def list_providers(sessions: sessionmaker[Session]) -> list[ProviderInfo]:
    with sessions() as session:
        rows = session.scalars(select(Provider).order_by(Provider.name)).all()
        return [_provider_info(row) for row in rows]


def _provider(session: Session, name: str) -> Provider:
    row = session.scalars(select(Provider).where(Provider.name == name)).one_or_none()
    if row is None:
        raise NotFound(f"no provider {name!r} (add it with `behalf provider add`)")
    return row


# --- agents ----------------------------------------------------------------------------------


def _agent_info(agent: Agent, provider_name: str) -> AgentInfo:
    keys = (agent.public_jwks or {}).get("keys") or []
    return AgentInfo(
        id=agent.id, name=agent.name, environment=agent.environment, role=agent.role,
        provider=provider_name, client_id=agent.client_id, auth_method=agent.auth_method,
        scopes=tuple(agent.scopes or ()), required_scopes=tuple(agent.required_scopes or ()),
        status=agent.status, key_ids=tuple(str(k.get("kid", "")) for k in keys),
        created_at=agent.created_at,
    )


def _public_jwks(credentials: ClientCredentials) -> dict[str, Any] | None:
    if credentials.private_jwk is None:
        return None
    keys = [public_jwk(credentials.private_jwk)]
    keys += [public_jwk(k) for k in credentials.retired_jwks]
    return {"keys": keys}


def _seal_credentials(vault: Vault, agent: Agent, credentials: ClientCredentials) -> None:
    sealed = vault.seal(credentials.to_bytes(), agent_context(agent.id))
    agent.credential_blob = sealed.blob
    agent.credential_wrapped_key = sealed.wrapped_key
    agent.credential_key_id = sealed.key_id
    agent.public_jwks = _public_jwks(credentials)


def open_credentials(vault: Vault, agent: Agent) -> ClientCredentials:
    """The agent's client credentials, opened (in memory only)."""
    if agent.credential_blob and agent.credential_wrapped_key and agent.credential_key_id:
        raw = vault.open(Sealed(agent.credential_blob, agent.credential_wrapped_key,
                                agent.credential_key_id), agent_context(agent.id))
        return ClientCredentials.from_bytes(raw)
    return ClientCredentials(client_id=agent.client_id, auth_method="none")


def _check_scopes(scopes: list[str], required: list[str]) -> None:
    missing = [s for s in required if s not in scopes]
    if missing:
        raise InvalidInput(f"required scopes {' '.join(missing)} are not among the agent's "
                           "scopes")


def _refuse_existing(session: Session, name: str, environment: str) -> None:
    existing = session.scalars(
        select(Agent).where(Agent.name == name, Agent.environment == environment)
    ).one_or_none()
    if existing is not None:
        raise Conflict(f"agent {name!r} already has a client in environment {environment!r} "
                       f"(client_id {existing.client_id}); one client per agent per "
                       "environment")


def _insert_agent(
    session: Session, vault: Vault, *, name: str, environment: str, role: str,
    provider: Provider, credentials: ClientCredentials, scopes: list[str],
    required: list[str], registration: dict[str, Any] | None, now: dt.datetime,
) -> Agent:
    agent = Agent(
        id=uuid.uuid4(), name=name, environment=environment, role=role,
        provider_id=provider.id, client_id=credentials.client_id,
        auth_method=credentials.auth_method, scopes=scopes, required_scopes=required,
        registration=registration, status="active", created_at=now, updated_at=now,
    )
    taken = session.scalars(select(Agent.name).where(
        Agent.provider_id == provider.id, Agent.client_id == credentials.client_id)).first()
    if taken is not None:
        raise Conflict(f"client_id {credentials.client_id} is already used by agent {taken!r} "
                       f"of provider {provider.name!r}; a client_id is never shared")
    _seal_credentials(vault, agent, credentials)
    session.add(agent)
    session.flush()
    return agent


def register_agent(
    sessions: sessionmaker[Session], vault: Vault, oauth: OAuthClient, clock: Clock, *,
    name: str, provider_name: str, environment: str, scopes: list[str],
    required_scopes: list[str], auth_method: str, public_url: str, operator: str,
) -> AgentInfo:
    """RFC 7591 registration of a new confidential client for `name` in `environment`.

    Each call registers a new client at the AS, so no two agents ever share a client_id.
    """
    check_name(name, "agent name")
    if auth_method not in AUTH_METHODS:
        raise InvalidInput(f"--auth must be one of {', '.join(AUTH_METHODS)}")
    _check_scopes(scopes, required_scopes)
    with sessions() as session:
        provider = _provider(session, provider_name)
        _refuse_existing(session, name, environment)
        endpoints = Endpoints.from_metadata(provider.discovered)
        # The connect flow asks for `openid` too on an OIDC provider (the ID token names who
        # consented), so the client must be allowed to.
        registered_scopes = (["openid"] if is_oidc(provider.discovered) else []) + [
            s for s in scopes if s != "openid"]
    credentials, registration = oauth.register(
        endpoints, client_name=f"{name} ({environment})",
        redirect_uris=[callback_url(public_url, CONNECT_CALLBACK_PATH)],
        scopes=registered_scopes, auth_method=auth_method,
    )
    now = clock.now()
    with _unique("the agents"), sessions.begin() as session:
        provider = _provider(session, provider_name)
        _refuse_existing(session, name, environment)
        agent = _insert_agent(session, vault, name=name, environment=environment,
                              role=ROLE_AGENT, provider=provider, credentials=credentials,
                              scopes=scopes, required=required_scopes,
                              registration=registration, now=now)
        audit.append(session, audit.AuditRecord(
            action="agent:client:registered", actor_type="operator", actor=operator,
            agent_name=name, client_id=credentials.client_id,
            detail={"environment": environment, "provider": provider.name,
                    "auth_method": auth_method, "scopes": scopes,
                    "required_scopes": required_scopes},
        ), now)
        return _agent_info(agent, provider.name)


def add_agent(
    sessions: sessionmaker[Session], vault: Vault, clock: Clock, *,
    name: str, provider_name: str, environment: str, client_id: str, auth_method: str,
    scopes: list[str], required_scopes: list[str], secret: str | None,
    private_jwk: dict[str, Any] | None, operator: str,
) -> AgentInfo:
    """Record a client registered by hand at the AS (its secret or private key sealed)."""
    check_name(name, "agent name")
    if not client_id or len(client_id) > 255 or not client_id.isprintable():
        raise InvalidInput("--client-id must be 1-255 printable characters")
    if auth_method not in AUTH_METHODS:
        raise InvalidInput(f"--auth must be one of {', '.join(AUTH_METHODS)}")
    _check_scopes(scopes, required_scopes)
    if auth_method == "private_key_jwt":
        if private_jwk is None:
            raise InvalidInput("private_key_jwt needs the client's private key (a JWK)")
        private_jwk = _check_private_jwk(private_jwk)
        secret = None
    elif not secret:
        raise InvalidInput(f"{auth_method} needs the client secret")
    credentials = ClientCredentials(client_id=client_id, auth_method=auth_method,
                                    secret=secret, private_jwk=private_jwk)
    now = clock.now()
    with _unique("the agents"), sessions.begin() as session:
        provider = _provider(session, provider_name)
        _refuse_existing(session, name, environment)
        agent = _insert_agent(session, vault, name=name, environment=environment,
                              role=ROLE_AGENT, provider=provider, credentials=credentials,
                              scopes=scopes, required=required_scopes, registration=None,
                              now=now)
        audit.append(session, audit.AuditRecord(
            action="agent:client:added", actor_type="operator", actor=operator,
            agent_name=name, client_id=client_id,
            detail={"environment": environment, "provider": provider.name,
                    "auth_method": auth_method, "scopes": scopes,
                    "required_scopes": required_scopes},
        ), now)
        return _agent_info(agent, provider.name)


def _check_private_jwk(jwk: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or "d" not in jwk:
        raise InvalidInput("the private key must be an RSA private JWK (with 'd')")
    try:
        public_jwk({**jwk, "kid": jwk.get("kid", "")})
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise InvalidInput(f"the private key is not a usable RSA JWK ({type(exc).__name__})"
                           ) from None
    if not jwk.get("kid"):
        raise InvalidInput("the private JWK needs a 'kid' (the AS picks the key by it)")
    return dict(jwk)


def list_agents(sessions: sessionmaker[Session], *, environment: str | None = None,
                role: str | None = ROLE_AGENT) -> list[AgentInfo]:
    with sessions() as session:
        query = select(Agent, Provider.name).join(Provider, Agent.provider_id == Provider.id)
        if environment is not None:
            query = query.where(Agent.environment == environment)
        if role is not None:
            query = query.where(Agent.role == role)
        rows = session.execute(query.order_by(Agent.environment, Agent.name)).all()
        return [_agent_info(agent, provider_name) for agent, provider_name in rows]


def rotate_key(
    sessions: sessionmaker[Session], vault: Vault, oauth: OAuthClient, clock: Clock, *,
    name: str, environment: str, public_url: str, operator: str,
    grace_seconds: float = ROTATION_GRACE_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> Rotation:
    """Replace a `private_key_jwt` agent's key without a moment where the AS refuses it.

    1. publish old + new public keys at the AS (RFC 7592 update); store the rotated
       registration access token at once;
    2. prove the AS accepts the new key: a token request with a made-up code, signed with it,
       must fail on the code (`invalid_grant`), not on the client (`invalid_client`);
    3. sign with the new key (stored sealed; the old one kept as retired, still published);
    4. wait `grace_seconds`, so that every worker, which caches agent credentials for up to
       `AgentDirectory`'s TTL, signs with the new key, then publish the new key alone.
    A crash anywhere leaves a stored key the AS accepts. Run again after a crash in step 4,
    the command finishes that rotation (withdraws the retired key) instead of starting
    another; a new key that was never stored is dropped by the next update.
    """
    with sessions() as session:
        row = session.execute(
            select(Agent, Provider).join(Provider, Agent.provider_id == Provider.id)
            .where(Agent.name == name, Agent.environment == environment)
        ).one_or_none()
        if row is None:
            raise NotFound(f"no agent {name!r} in environment {environment!r}")
        agent, provider = row._tuple()
        agent_id, client_id = agent.id, agent.client_id
        credentials = open_credentials(vault, agent)
        registration = dict(agent.registration or {})
        endpoints = Endpoints.from_metadata(provider.discovered)
    if credentials.auth_method != "private_key_jwt" or credentials.private_jwk is None:
        raise InvalidInput(f"agent {name!r} authenticates with {credentials.auth_method}; "
                           "only private_key_jwt keys rotate")
    uri = registration.get("registration_client_uri")
    token = credentials.registration_access_token
    if not uri or not token:
        raise ProviderError(
            f"the AS gave agent {name!r} no registration_client_uri and registration access "
            "token (RFC 7592), so its key cannot be updated from here; register the new "
            "public key by hand and record the client again with `behalf agent add`"
        )
    if credentials.retired_jwks:  # an earlier rotation stopped before withdrawing its old key
        old, new = credentials.retired_jwks[0], credentials.private_jwk
    else:
        old, new = credentials.private_jwk, new_private_jwk()
        # 1. both keys published
        registration = oauth.update_registration(
            uri, token, _update_body(registration, client_id,
                                     [public_jwk(old), public_jwk(new)]))
        token = str(registration.get("registration_access_token") or token)
        _store_rotation(sessions, vault, clock, agent_id,
                        replace(credentials, registration_access_token=token),
                        registration)
        # 2. the AS has the new key
        _probe_key(oauth, endpoints, client_id, new,
                   callback_url(public_url, CONNECT_CALLBACK_PATH))
        # 3. sign with the new key; the old one stays published
        _store_rotation(sessions, vault, clock, agent_id,
                        replace(credentials, private_jwk=new, registration_access_token=token,
                                retired_jwks=[old]), registration)
    # 4. once no worker can still be signing with it, the old key withdrawn
    sleep(grace_seconds)
    registration = oauth.update_registration(
        uri, token, _update_body(registration, client_id, [public_jwk(new)]))
    token = str(registration.get("registration_access_token") or token)
    final = replace(credentials, private_jwk=new, registration_access_token=token,
                    retired_jwks=[])
    info = _store_rotation(sessions, vault, clock, agent_id, final, registration, audit_to=(
        operator, str(old.get("kid", "")), str(new.get("kid", ""))))
    return Rotation(agent=info, old_kid=str(old.get("kid", "")), new_kid=str(new["kid"]))


def _update_body(registration: dict[str, Any], client_id: str,
                 keys: list[dict[str, Any]]) -> dict[str, Any]:
    body = {k: v for k, v in registration.items() if k not in _NOT_UPDATABLE and v is not None}
    body["client_id"] = client_id
    body["jwks"] = {"keys": keys}
    body.pop("jwks_uri", None)
    return body


def _probe_key(oauth: OAuthClient, endpoints: Endpoints, client_id: str,
               key: dict[str, Any], redirect_uri: str) -> None:
    probe = ClientCredentials(client_id=client_id, auth_method="private_key_jwt",
                              private_jwk=key)
    try:
        oauth.exchange_code(endpoints, probe, code="behalf-key-probe-" + secrets.token_hex(16),
                            verifier=new_verifier(), redirect_uri=redirect_uri)
    except ReauthRequired:
        return  # the client authenticated; only the made-up code was refused
    except AgentMisconfigured as exc:
        raise ProviderError(
            "the AS does not accept the new key yet; both keys stay published and the old "
            f"one still signs; run the command again later ({exc})"
        ) from None
    except ProviderError:
        # Some ASes answer invalid_request for an unknown code: the client was authenticated
        # before the grant was looked at, which is what the probe asks.
        return


def _store_rotation(
    sessions: sessionmaker[Session], vault: Vault, clock: Clock, agent_id: uuid.UUID,
    credentials: ClientCredentials, registration: dict[str, Any],
    audit_to: tuple[str, str, str] | None = None,
) -> AgentInfo:
    now = clock.now()
    public = {k: v for k, v in registration.items()
              if k not in ("client_secret", "registration_access_token")}
    with sessions.begin() as session:
        agent = session.get(Agent, agent_id, with_for_update=True)
        if agent is None:
            raise NotFound(f"agent {agent_id} disappeared during the rotation")
        provider = session.get(Provider, agent.provider_id)
        _seal_credentials(vault, agent, credentials)
        agent.registration = public
        agent.updated_at = now
        if audit_to is not None:
            operator, old_kid, new_kid = audit_to
            audit.append(session, audit.AuditRecord(
                action="agent:key:rotated", actor_type="operator", actor=operator,
                agent_name=agent.name, client_id=agent.client_id,
                detail={"environment": agent.environment, "old_kid": old_kid,
                        "new_kid": new_kid},
            ), now)
        return _agent_info(agent, provider.name if provider else "")


# --- the sign-in client ----------------------------------------------------------------------


def register_signin_client(
    sessions: sessionmaker[Session], vault: Vault, oauth: OAuthClient, clock: Clock, *,
    provider_name: str, environment: str, public_url: str, operator: str,
) -> AgentInfo:
    """Register the `openid`-only client users sign in to the pages with (one per
    environment); a second call for the same provider returns the existing client."""
    with sessions() as session:
        provider = _provider(session, provider_name)
        if not is_oidc(provider.discovered):
            raise InvalidInput(f"provider {provider_name!r} does not speak OpenID Connect; "
                               "users cannot sign in with it")
        existing = session.execute(
            select(Agent, Provider.name).join(Provider, Agent.provider_id == Provider.id)
            .where(Agent.role == ROLE_SIGNIN, Agent.environment == environment)
        ).one_or_none()
        if existing is not None:
            agent, name = existing._tuple()
            if agent.provider_id != provider.id:
                raise Conflict(f"users already sign in with provider {name!r} in "
                               f"environment {environment!r}")
            return _agent_info(agent, name)
        endpoints = Endpoints.from_metadata(provider.discovered)
        # `email` too where offered: the re-authorisation mail needs the user's address
        signin_scopes = ["openid"] + (
            ["email"] if "email" in provider.discovered.get("scopes_supported", []) else [])
    credentials, registration = oauth.register(
        endpoints, client_name=f"behalf sign-in ({environment})",
        redirect_uris=[callback_url(public_url, SIGNIN_CALLBACK_PATH)], scopes=signin_scopes,
        auth_method="client_secret_basic", grant_types=["authorization_code"],
    )
    now = clock.now()
    with _unique("the sign-in client"), sessions.begin() as session:
        provider = _provider(session, provider_name)
        agent = _insert_agent(session, vault, name=SIGNIN_NAME_PREFIX + provider.name,
                              environment=environment, role=ROLE_SIGNIN, provider=provider,
                              credentials=credentials, scopes=signin_scopes, required=["openid"],
                              registration=registration, now=now)
        audit.append(session, audit.AuditRecord(
            action="provider:signin:registered", actor_type="operator", actor=operator,
            agent_name=agent.name, client_id=credentials.client_id,
            detail={"environment": environment, "provider": provider.name},
        ), now)
        return _agent_info(agent, provider.name)


def signin_client(sessions: sessionmaker[Session], vault: Vault,
                  environment: str) -> SigninClient | None:
    """The sign-in client of `environment`, with its credentials opened; None if not set up."""
    with sessions() as session:
        row = session.execute(
            select(Agent, Provider).join(Provider, Agent.provider_id == Provider.id)
            .where(Agent.role == ROLE_SIGNIN, Agent.environment == environment,
                   Agent.status == "active")
        ).first()
        if row is None:
            return None
        agent, provider = row._tuple()
        return SigninClient(
            agent_id=agent.id, provider_id=provider.id, client_id=agent.client_id,
            issuer=provider.issuer,
            endpoints=Endpoints.from_metadata(provider.discovered),
            credentials=open_credentials(vault, agent),
            scopes=tuple(agent.scopes or ["openid"]),
        )
