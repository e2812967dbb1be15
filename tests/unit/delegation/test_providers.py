"""Providers and agents: discovery, RFC 7591 registration, hand-added clients, key rotation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from delegation import providers
from delegation.clock import FrozenClock
from delegation.errors import ProviderError
from delegation.kms import LocalKeyFile
from delegation.oauth import OAuthClient
from delegation.vault import Vault
from models import Agent, AuditEvent, Provider
from tests.unit.api.fake_oidc import FakeOidcProvider

PUBLIC_URL = "https://behalf.example"


class Env:
    def __init__(self, tmp_path: Path, sessions: sessionmaker[Session]) -> None:
        self.clock = FrozenClock()
        self.fake = FakeOidcProvider(self.clock)
        self.requests: list[httpx.Request] = []
        self.sessions = sessions
        self.vault = Vault(LocalKeyFile(tmp_path / "key", warn=False))
        self.oauth = OAuthClient(httpx.Client(transport=httpx.MockTransport(self._handle)),
                                 self.clock)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.fake.handle(request)

    def add(self, **kw: Any) -> providers.ProviderInfo:
        args: dict[str, Any] = {"name": "acme", "issuer": self.fake.issuer,
                                "api_base": "https://api.test", "operator": "ops"}
        args.update(kw)
        return providers.add_provider(self.sessions, self.oauth, self.clock, **args)

    def register(self, name: str = "reporter", auth: str = "private_key_jwt",
                 **kw: Any) -> providers.AgentInfo:
        args: dict[str, Any] = {"name": name, "provider_name": "acme", "environment": "prod",
                                "scopes": ["reports:read"], "required_scopes": [],
                                "auth_method": auth, "public_url": PUBLIC_URL,
                                "operator": "ops"}
        args.update(kw)
        return providers.register_agent(self.sessions, self.vault, self.oauth, self.clock,
                                        **args)

    def dump(self) -> str:
        with self.sessions() as s:
            return " ".join(repr(tuple(row)) for table in ("agents", "providers", "audit_events")
                            for row in s.execute(text(f"SELECT * FROM {table}")))


@pytest.fixture
def env(tmp_path: Path, sqlite_sessions: sessionmaker[Session]) -> Env:
    return Env(tmp_path, sqlite_sessions)


# --- discovery -----------------------------------------------------------------------------------


def test_discovery_tries_rfc8414_first_and_stores_the_endpoints(env: Env) -> None:
    info = env.add()
    assert [r.url.path for r in env.requests] == ["/.well-known/oauth-authorization-server"]
    assert info.openid and info.dynamic_registration
    assert info.token_endpoint == f"{env.fake.issuer}/token"
    with env.sessions() as s:
        row = s.scalars(select(Provider)).one()
        assert row.discovered["authorization_endpoint"] == f"{env.fake.issuer}/authorize"
        assert s.scalars(select(AuditEvent.actor)).all() == ["ops"]


def test_discovery_falls_back_to_openid_configuration(env: Env) -> None:
    original = env.fake.handle

    def only_oidc(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/oauth-authorization-server":
            return httpx.Response(404)
        return original(request)

    env.fake.handle = only_oidc  # type: ignore[method-assign]
    env.add()
    assert [r.url.path for r in env.requests] == ["/.well-known/oauth-authorization-server",
                                                   "/.well-known/openid-configuration"]


@pytest.mark.parametrize(("change", "words"), [
    ({"token_endpoint": None}, "no token_endpoint"),
    ({"code_challenge_methods_supported": ["plain"]}, "S256"),
    ({"issuer": "https://other.test"}, "does not match"),
])
def test_unusable_metadata_is_refused_with_a_reason(env: Env, change: dict[str, Any],
                                                     words: str) -> None:
    metadata = env.fake.metadata()
    metadata.update(change)
    env.fake.metadata = lambda: {k: v for k, v in metadata.items()  # type: ignore[method-assign]
                                 if v is not None}
    with pytest.raises(ProviderError, match=words):
        env.add()
    with env.sessions() as s:
        assert s.scalars(select(Provider)).all() == []


def test_pkce_methods_not_published_is_accepted(env: Env) -> None:
    metadata = env.fake.metadata()
    del metadata["code_challenge_methods_supported"]
    env.fake.metadata = lambda: metadata  # type: ignore[method-assign]
    assert env.add().name == "acme"


@pytest.mark.parametrize(("kw", "words"), [
    ({"issuer": "http://as.example.com"}, "must use https"),
    ({"issuer": "ftp://as.test"}, "not an http"),
    ({"issuer": "https://as.test?x=1"}, "query"),
    ({"name": "bad name"}, "provider name"),
    ({"api_base": "javascript:alert(1)"}, "not an http"),
])
def test_bad_arguments_are_refused_before_any_request(env: Env, kw: dict[str, Any],
                                                      words: str) -> None:
    with pytest.raises(providers.InvalidInput, match=words):
        env.add(**kw)
    assert env.requests == []


def test_adding_again_refreshes_but_a_name_keeps_its_issuer(env: Env) -> None:
    first = env.add()
    again = env.add(api_base=None)
    assert again.id == first.id and again.api_base == "https://api.test"
    with pytest.raises(providers.Conflict, match="already bound"):
        providers.add_provider(env.sessions, env.oauth, env.clock, name="acme",
                               issuer="http://127.0.0.1:9", api_base=None, operator="ops")


# --- registration ----------------------------------------------------------------------------


def test_private_key_jwt_registration_sends_only_the_public_key(env: Env) -> None:
    env.add()
    info = env.register()

    registration = next(r for r in env.requests if r.url.path == "/register")
    body = registration.read().decode()
    assert '"token_endpoint_auth_method":"private_key_jwt"' in body.replace(" ", "")
    assert '"d"' not in body
    sent = env.fake.clients[info.client_id]
    assert sent.grant_types == ["authorization_code", "refresh_token"]
    assert sent.redirect_uris == [f"{PUBLIC_URL}/oauth/callback"]
    assert info.auth_method == "private_key_jwt" and len(info.key_ids) == 1
    with env.sessions() as s:
        agent = s.scalars(select(Agent)).one()
        credentials = providers.open_credentials(env.vault, agent)
    assert credentials.private_jwk is not None
    assert credentials.private_jwk["d"] not in env.dump()
    assert credentials.registration_access_token not in env.dump()
    assert agent.registration is not None
    assert "registration_access_token" not in agent.registration


def test_client_secret_registration_keeps_the_secret_sealed(env: Env) -> None:
    env.add()
    info = env.register(auth="client_secret_post")
    secret = env.fake.clients[info.client_id].secret
    assert secret and secret not in env.dump()


def test_every_registration_is_a_new_client(env: Env) -> None:
    env.add()
    a = env.register("a")
    b = env.register("b")
    same_name_other_env = env.register("a", environment="staging")
    assert len({a.client_id, b.client_id, same_name_other_env.client_id}) == 3


def test_one_client_per_agent_per_environment(env: Env) -> None:
    env.add()
    first = env.register()
    before = len(env.fake.clients)
    with pytest.raises(providers.Conflict, match="one client per agent per environment"):
        env.register()
    assert len(env.fake.clients) == before  # refused before registering anything at the AS
    assert first.client_id in env.fake.clients


def test_required_scopes_must_be_among_the_scopes(env: Env) -> None:
    env.add()
    with pytest.raises(providers.InvalidInput, match="required scopes"):
        env.register(required_scopes=["calendar:read"])


@pytest.mark.parametrize("raw", ['a "b"', "a\\b", "x" * 201])
def test_scopes_must_be_rfc6749_tokens(raw: str) -> None:
    with pytest.raises(providers.InvalidInput):
        providers.parse_scopes(raw)


def test_scopes_keep_order_and_drop_duplicates() -> None:
    assert providers.parse_scopes(" b a  b ") == ["b", "a"]


# --- agents added by hand ------------------------------------------------------------------------


def _add(env: Env, **kw: Any) -> providers.AgentInfo:
    args: dict[str, Any] = {"name": "manual", "provider_name": "acme", "environment": "prod",
                            "client_id": "hand-made", "auth_method": "client_secret_basic",
                            "scopes": ["reports:read"], "required_scopes": [],
                            "secret": "s3cr3t-value", "private_jwk": None, "operator": "ops"}
    args.update(kw)
    return providers.add_agent(env.sessions, env.vault, env.clock, **args)


def test_a_hand_registered_client_is_recorded_sealed(env: Env) -> None:
    env.add()
    info = _add(env)
    assert info.client_id == "hand-made"
    assert "s3cr3t-value" not in env.dump()
    with env.sessions() as s:
        assert s.scalars(select(AuditEvent.action)).all()[-1] == "agent:client:added"


def test_a_client_id_is_never_reused(env: Env) -> None:
    env.add()
    _add(env)
    with pytest.raises(providers.Conflict, match="already used"):
        _add(env, name="other")


def test_private_key_jwt_by_hand_needs_a_usable_rsa_jwk(env: Env) -> None:
    env.add()
    with pytest.raises(providers.InvalidInput, match="RSA private JWK"):
        _add(env, auth_method="private_key_jwt", private_jwk={"kty": "oct", "k": "x"})
    with pytest.raises(providers.InvalidInput):
        _add(env, auth_method="private_key_jwt", private_jwk={"kty": "RSA", "d": "x"})


# --- key rotation ----------------------------------------------------------------------------


def test_rotation_publishes_both_keys_then_only_the_new_one(env: Env) -> None:
    env.add()
    info = env.register()
    published: list[list[str]] = []
    original = env.fake._update

    def spy(request: httpx.Request) -> httpx.Response:
        response = original(request)
        jwks = env.fake.clients[info.client_id].jwks or {}
        published.append([k["kid"] for k in jwks["keys"]])
        return response

    env.fake._update = spy  # type: ignore[method-assign]
    with env.sessions() as s:
        old = providers.open_credentials(env.vault, s.scalars(select(Agent)).one())

    seen_while_waiting: list[tuple[float, list[list[str]], str]] = []

    def sleep(seconds: float) -> None:
        with env.sessions() as s:
            mid = providers.open_credentials(env.vault, s.scalars(select(Agent)).one())
        assert mid.private_jwk is not None
        seen_while_waiting.append((seconds, list(published), mid.private_jwk["kid"]))

    rotation = providers.rotate_key(env.sessions, env.vault, env.oauth, env.clock,
                                    name="reporter", environment="prod",
                                    public_url=PUBLIC_URL, operator="ops", sleep=sleep)

    # While workers switch, the AS has both keys and ours already signs with the new one;
    assert seen_while_waiting == [(providers.ROTATION_GRACE_SECONDS,
                                   [[rotation.old_kid, rotation.new_kid]], rotation.new_kid)]
    # then the old key is withdrawn.
    assert published == [[rotation.old_kid, rotation.new_kid], [rotation.new_kid]]
    # The new key was proven at the token endpoint before the switch:
    probe = env.fake.token_requests[-1]
    assert probe["code"].startswith("behalf-key-probe-")
    with env.sessions() as s:
        agent = s.scalars(select(Agent)).one()
        now = providers.open_credentials(env.vault, agent)
        assert s.scalars(select(AuditEvent.action)).all()[-1] == "agent:key:rotated"
    assert now.private_jwk and now.private_jwk["kid"] == rotation.new_kid
    assert now.retired_jwks == []
    assert now.registration_access_token == \
        env.fake.clients[info.client_id].registration_access_token
    assert now.registration_access_token != old.registration_access_token
    assert [k["kid"] for k in (agent.public_jwks or {})["keys"]] == [rotation.new_kid]


def test_rotation_stops_safely_when_the_as_does_not_take_the_new_key(env: Env) -> None:
    env.add()
    info = env.register()
    original = env.fake._update

    def ignore_keys(request: httpx.Request) -> httpx.Response:
        keep = env.fake.clients[info.client_id].jwks
        response = original(request)
        env.fake.clients[info.client_id].jwks = keep  # "accepted", but not applied
        return response

    env.fake._update = ignore_keys  # type: ignore[method-assign]
    with env.sessions() as s:
        before = providers.open_credentials(env.vault, s.scalars(select(Agent)).one())

    with pytest.raises(ProviderError, match="does not accept the new key"):
        providers.rotate_key(env.sessions, env.vault, env.oauth, env.clock, name="reporter",
                             environment="prod", public_url=PUBLIC_URL, operator="ops",
                             grace_seconds=0)

    with env.sessions() as s:
        after = providers.open_credentials(env.vault, s.scalars(select(Agent)).one())
    assert after.private_jwk == before.private_jwk  # the old key still signs
    assert after.registration_access_token == \
        env.fake.clients[info.client_id].registration_access_token  # the rotated one kept


def test_an_interrupted_rotation_is_finished_not_restarted(env: Env) -> None:
    env.add()
    info = env.register()

    def crash(_seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        providers.rotate_key(env.sessions, env.vault, env.oauth, env.clock, name="reporter",
                             environment="prod", public_url=PUBLIC_URL, operator="ops",
                             sleep=crash)
    with env.sessions() as s:
        mid = providers.open_credentials(env.vault, s.scalars(select(Agent)).one())
    assert mid.private_jwk and len(mid.retired_jwks) == 1

    rotation = providers.rotate_key(env.sessions, env.vault, env.oauth, env.clock,
                                    name="reporter", environment="prod",
                                    public_url=PUBLIC_URL, operator="ops", grace_seconds=0)

    assert rotation.new_kid == mid.private_jwk["kid"]  # the same rotation, finished
    assert rotation.old_kid == mid.retired_jwks[0]["kid"]
    jwks = env.fake.clients[info.client_id].jwks or {}
    assert [k["kid"] for k in jwks["keys"]] == [rotation.new_kid]


def test_only_private_key_jwt_clients_rotate(env: Env) -> None:
    env.add()
    env.register(auth="client_secret_basic")
    with pytest.raises(providers.InvalidInput, match="only private_key_jwt"):
        providers.rotate_key(env.sessions, env.vault, env.oauth, env.clock, name="reporter",
                             environment="prod", public_url=PUBLIC_URL, operator="ops",
                             grace_seconds=0)


# --- sign-in client ---------------------------------------------------------------------------


def test_the_signin_client_is_openid_only_and_one_per_environment(env: Env) -> None:
    env.add()
    first = providers.register_signin_client(env.sessions, env.vault, env.oauth, env.clock,
                                             provider_name="acme", environment="prod",
                                             public_url=PUBLIC_URL, operator="ops")
    again = providers.register_signin_client(env.sessions, env.vault, env.oauth, env.clock,
                                             provider_name="acme", environment="prod",
                                             public_url=PUBLIC_URL, operator="ops")
    assert again.client_id == first.client_id
    client = env.fake.clients[first.client_id]
    assert client.grant_types == ["authorization_code"]
    assert client.redirect_uris == [f"{PUBLIC_URL}/auth/callback"]
    assert providers.list_agents(env.sessions) == []  # not an agent users connect
    found = providers.signin_client(env.sessions, env.vault, "prod")
    assert found is not None and found.credentials.secret == client.secret
