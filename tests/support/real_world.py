"""A World wired to the real test AS (oidc-provider), PostgreSQL and Redis.

Agents are registered and users connected with behalf's own protocol client, through the AS's
real login and consent pages (driven by httpx), so these tests exercise the actual protocol.
"""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import redis

from delegation.clock import SystemClock
from delegation.oauth import Endpoints, OAuthClient, new_verifier
from delegation.tokens import ClientCredentials
from delegation.vault import Vault
from tests.support.oidc_provider import OidcProvider
from tests.support.world import World

REDIRECT_URI = "http://127.0.0.1:9/oauth/callback"  # never requested


def make_world(sessions: Any, vault: Vault, redis_url: str, provider: OidcProvider) -> World:
    world = World(sessions=sessions, vault=vault, clock=SystemClock(),
                  redis=redis.Redis.from_url(redis_url), transport=httpx.HTTPTransport())
    return world


def register_agent(world: World, provider: OidcProvider, *, scopes: list[str] | None = None,
                   auth_method: str = "private_key_jwt") -> tuple[ClientCredentials, Endpoints]:
    scopes = scopes or ["reports:read", "calendar:read"]
    with httpx.Client(timeout=10) as http:
        oauth = OAuthClient(http, world.clock)
        metadata = oauth.discover(provider.issuer)
        endpoints = Endpoints.from_metadata(metadata)
        credentials, _ = oauth.register(endpoints, client_name="reporter",
                                        redirect_uris=[REDIRECT_URI],
                                        scopes=["openid", *scopes], auth_method=auth_method)
    world.setup_agent(metadata, provider.api_base, credentials=credentials, scopes=scopes)
    return credentials, endpoints


def connect_user(world: World, provider: OidcProvider, credentials: ClientCredentials,
                 endpoints: Endpoints, subject: str, *, scopes: set[str] | None = None
                 ) -> tuple[Any, Any, Any]:
    """Log in and consent as `subject`; returns (user_id, delegation_id, CodeExchange)."""
    http = httpx.Client(timeout=10)
    oauth = OAuthClient(http, world.clock)
    verifier, state = new_verifier(), secrets.token_urlsafe(16)
    url = oauth.authorization_url(endpoints, client_id=credentials.client_id,
                                  redirect_uri=REDIRECT_URI,
                                  scopes=["openid", "reports:read", "calendar:read"],
                                  state=state, verifier=verifier, nonce="n-" + state)
    with httpx.Client(timeout=10) as browser:
        callback = provider.login_and_consent(browser, url, subject, scopes=scopes)
    params = dict(httpx.URL(callback).params)
    assert params["state"] == state and params["iss"] == endpoints.issuer
    with http:
        exchange = oauth.exchange_code(endpoints, credentials, code=params["code"],
                                       verifier=verifier, redirect_uri=REDIRECT_URI)
    granted = list(exchange.granted_scopes or ())
    user_id, delegation_id = world.add_delegation(subject, exchange.tokens, scopes=granted)
    return user_id, delegation_id, exchange
