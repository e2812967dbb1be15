"""The test AS harness behaves like the real, independent AS our product will face.

These tests use only httpx, authlib and cryptography (no behalf code): if they pass, a failure in
a product test is the product's, not the harness's. They also pin down oidc-provider's behaviour
that the product relies on (rotation with reuse detection, RFC 9207 `iss`, resource indicators).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.support.oidc_fixtures import OidcProviderFactory
from tests.support.oidc_provider import (
    InteractionError,
    OidcProvider,
    generate_client_key,
    private_key_jwt_fields,
    sha256_hex,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


REDIRECT_URI = "http://127.0.0.1:9/callback"  # never requested: the driver stops before it
API_SCOPES = "reports:read reports:write calendar:read"


@dataclass
class Client:
    """A client registered by a test: its id and how it authenticates."""

    client_id: str
    private_jwk: dict[str, str]

    def auth(self, provider: OidcProvider) -> dict[str, str]:
        return private_key_jwt_fields(
            self.client_id, self.private_jwk, provider.endpoint("token_endpoint")
        )


@dataclass
class Tokens:
    access_token: str
    refresh_token: str
    id_token: str
    scope: str
    callback: dict[str, str]
    raw: dict[str, Any]


@pytest.fixture(autouse=True)
def clean(oidc_provider: OidcProvider) -> Iterator[None]:
    """The AS is shared by the session: no test sees another's faults, counts or API calls."""
    oidc_provider.reset()
    yield
    oidc_provider.reset_faults()


@pytest.fixture
def client(oidc_provider: OidcProvider) -> Client:
    return register(oidc_provider)


def register(provider: OidcProvider) -> Client:
    private, public = generate_client_key()
    info = provider.register_client(
        {
            "client_name": "harness agent",
            "redirect_uris": [REDIRECT_URI],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "RS256",
            "jwks": {"keys": [public]},
        }
    )
    return Client(info["client_id"], private)


def authorize(
    provider: OidcProvider,
    client: Client,
    username: str = "alice",
    *,
    scope: str = f"openid {API_SCOPES}",
    grant: set[str] | None = None,
) -> Tokens:
    """Code flow with PKCE and private_key_jwt, through authlib, as a product would."""
    with (
        OAuth2Client(
            client.client_id,
            client.private_jwk,
            token_endpoint_auth_method=PrivateKeyJWT(provider.endpoint("token_endpoint")),
            redirect_uri=REDIRECT_URI,
            scope=scope,
            code_challenge_method="S256",
            trust_env=False,
        ) as oauth,
        httpx.Client(trust_env=False) as browser,
    ):
        verifier = secrets.token_urlsafe(48)
        url, state = oauth.create_authorization_url(
            provider.endpoint("authorization_endpoint"), code_verifier=verifier, nonce="n-0S6"
        )
        callback = provider.login_and_consent(browser, url, username, scopes=grant)
        params = {k: v[0] for k, v in parse_qs(urlsplit(callback).query).items()}
        assert callback.startswith(REDIRECT_URI + "?")
        assert params["state"] == state
        token = oauth.fetch_token(
            provider.endpoint("token_endpoint"),
            authorization_response=callback,
            code_verifier=verifier,
            state=state,
        )
    return Tokens(
        token["access_token"],
        token["refresh_token"],
        token["id_token"],
        token.get("scope", ""),
        params,
        dict(token),
    )


def refresh(
    provider: OidcProvider, client: Client, refresh_token: str, **kw: Any
) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **client.auth(provider)}
    with httpx.Client(trust_env=False, **kw) as http:
        return http.post(provider.endpoint("token_endpoint"), data=data)


def verify_rs256(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """Check an ID token's signature against the AS's JWKS (cryptography only) and decode it."""

    def b64d(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    header_b64, payload_b64, signature_b64 = token.split(".")
    header = json.loads(b64d(header_b64))
    assert header["alg"] == "RS256"
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    public = rsa.RSAPublicNumbers(
        int.from_bytes(b64d(jwk["e"]), "big"), int.from_bytes(b64d(jwk["n"]), "big")
    ).public_key()
    public.verify(
        b64d(signature_b64),
        f"{header_b64}.{payload_b64}".encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    claims: dict[str, Any] = json.loads(b64d(payload_b64))
    return claims


def api_get(provider: OidcProvider, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(trust_env=False) as http:
        return http.get(provider.api_base + path, headers=headers)


# --------------------------------------------------------------------------------------------
# Metadata and registration


def test_discovery_advertises_what_the_product_needs(oidc_provider: OidcProvider) -> None:
    meta = oidc_provider.metadata
    assert meta["issuer"] == oidc_provider.issuer
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["authorization_response_iss_parameter_supported"] is True
    for endpoint in ("registration_endpoint", "revocation_endpoint", "introspection_endpoint"):
        assert meta[endpoint].startswith(oidc_provider.issuer + "/")
    assert {"private_key_jwt", "client_secret_basic", "client_secret_post"} <= set(
        meta["token_endpoint_auth_methods_supported"]
    )
    assert {"authorization_code", "refresh_token"} <= set(meta["grant_types_supported"])
    assert set(API_SCOPES.split()) | {"openid"} <= set(meta["scopes_supported"])
    # RFC 8414 metadata is the same document.
    with httpx.Client(trust_env=False) as http:
        rfc8414 = http.get(oidc_provider.issuer + "/.well-known/oauth-authorization-server")
    assert rfc8414.status_code == 200
    assert rfc8414.json() == meta
    assert urlsplit(oidc_provider.api_base).netloc != urlsplit(oidc_provider.issuer).netloc


def test_registration_with_client_secret_basic(oidc_provider: OidcProvider) -> None:
    info = oidc_provider.register_client(
        {
            "redirect_uris": [REDIRECT_URI],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "client_secret_basic",
        }
    )
    assert info["token_endpoint_auth_method"] == "client_secret_basic"
    good = httpx.BasicAuth(info["client_id"], info["client_secret"])
    assert oidc_provider.introspect("no-such-token", good) == {"active": False}
    response = oidc_provider.revoke_token("x", httpx.BasicAuth(info["client_id"], "wrong"))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_registration_with_client_secret_post(oidc_provider: OidcProvider) -> None:
    info = oidc_provider.register_client(
        {"redirect_uris": [REDIRECT_URI], "token_endpoint_auth_method": "client_secret_post"}
    )
    fields = {"client_id": info["client_id"], "client_secret": info["client_secret"]}
    assert oidc_provider.introspect("no-such-token", fields) == {"active": False}


# --------------------------------------------------------------------------------------------
# Authorisation code flow


def test_code_flow_with_pkce_and_private_key_jwt(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "alice")

    # RFC 9207: the authorisation response names its issuer.
    assert tokens.callback["iss"] == oidc_provider.issuer
    assert tokens.raw["token_type"] == "Bearer"
    assert tokens.raw["expires_in"] == 300
    # The access token is for the API, so `scope` lists only API scopes (no openid).
    assert set(tokens.scope.split()) == set(API_SCOPES.split())
    with httpx.Client(trust_env=False) as http:
        jwks = http.get(oidc_provider.endpoint("jwks_uri")).json()
    claims = verify_rs256(tokens.id_token, jwks)
    assert claims["iss"] == oidc_provider.issuer
    assert claims["aud"] == client.client_id
    assert claims["sub"] == "alice"
    assert claims["nonce"] == "n-0S6"

    info = oidc_provider.introspect(tokens.access_token, client.auth(oidc_provider))
    assert info["active"] is True
    assert info["sub"] == "alice"
    assert info["client_id"] == client.client_id
    assert info["aud"] == oidc_provider.api_base


def test_pkce_is_required_even_for_confidential_clients(
    oidc_provider: OidcProvider, client: Client
) -> None:
    with httpx.Client(trust_env=False) as browser:
        url = (
            f"{oidc_provider.endpoint('authorization_endpoint')}?response_type=code"
            f"&client_id={client.client_id}&redirect_uri={REDIRECT_URI}&scope=openid"
        )
        callback = oidc_provider.login_and_consent(browser, url, "alice")
    query = parse_qs(urlsplit(callback).query)
    assert query["error"] == ["invalid_request"]
    assert "PKCE" in query["error_description"][0]


def test_subset_consent_grants_only_ticked_scopes(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "bob", grant={"openid", "reports:read"})

    assert tokens.scope == "reports:read"
    assert api_get(oidc_provider, "/v2/reports", tokens.access_token).status_code == 200
    forbidden = api_get(oidc_provider, "/v2/calendar", tokens.access_token)
    assert forbidden.status_code == 403
    assert 'error="insufficient_scope"' in forbidden.headers["www-authenticate"]
    # Refreshing keeps the subset.
    refreshed = refresh(oidc_provider, client, tokens.refresh_token).json()
    assert refreshed["scope"] == "reports:read"


def test_deny_returns_access_denied_with_iss(oidc_provider: OidcProvider, client: Client) -> None:
    url = (
        f"{oidc_provider.endpoint('authorization_endpoint')}?response_type=code"
        f"&client_id={client.client_id}&redirect_uri={REDIRECT_URI}&scope=openid+reports:read"
        "&state=s1&code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        "&code_challenge_method=S256"
    )
    with httpx.Client(trust_env=False) as browser:
        callback = oidc_provider.login_and_consent(browser, url, "carol", deny=True)
    query = {k: v[0] for k, v in parse_qs(urlsplit(callback).query).items()}
    assert query["error"] == "access_denied"
    assert query["state"] == "s1"
    assert query["iss"] == oidc_provider.issuer


def test_sign_in_only_flow_gets_a_userinfo_token(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "dave", scope="openid profile email")
    with httpx.Client(trust_env=False) as http:
        userinfo = http.get(
            oidc_provider.endpoint("userinfo_endpoint"),
            headers={"Authorization": f"Bearer {tokens.access_token}"},
        )
    assert userinfo.status_code == 200
    assert userinfo.json()["sub"] == "dave"
    assert userinfo.json()["email"] == "dave@example.test"
    # ...which the API refuses: it is not for the API.
    assert api_get(oidc_provider, "/v2/me", tokens.access_token).status_code == 401


def test_reconsent_in_the_same_browser_after_revocation(
    oidc_provider: OidcProvider, client: Client
) -> None:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    url = (
        f"{oidc_provider.endpoint('authorization_endpoint')}?response_type=code"
        f"&client_id={client.client_id}&redirect_uri={REDIRECT_URI}&scope=openid+reports:read"
        f"&code_challenge={challenge.rstrip(b'=').decode()}&code_challenge_method=S256"
    )
    with httpx.Client(trust_env=False) as browser:
        oidc_provider.login_and_consent(browser, url, "ruth", scopes=set())
        oidc_provider.revoke_grants("ruth", client.client_id)

        # The AS session survives, so no login page; the revoked grant means a fresh consent.
        callback = oidc_provider.login_and_consent(browser, url, "ruth")
        with pytest.raises(InteractionError, match="signed in at the AS as 'ruth'"):
            oidc_provider.login_and_consent(browser, url, "someone-else")

    code = parse_qs(urlsplit(callback).query)["code"][0]
    with httpx.Client(trust_env=False) as http:
        token = http.post(
            oidc_provider.endpoint("token_endpoint"),
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
                **client.auth(oidc_provider),
            },
        ).json()
    assert token["scope"] == "reports:read"
    assert api_get(oidc_provider, "/v2/reports", token["access_token"]).status_code == 200


# --------------------------------------------------------------------------------------------
# Refresh, rotation, revocation


def test_refresh_rotates_and_reuse_revokes_the_grant(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "erin")

    # Given a refresh, the refresh token is rotated.
    first = refresh(oidc_provider, client, tokens.refresh_token)
    assert first.status_code == 200
    rotated = first.json()
    assert rotated["refresh_token"] != tokens.refresh_token
    assert set(rotated["scope"].split()) == set(API_SCOPES.split())
    assert "id_token" in rotated
    assert oidc_provider.token_info(tokens.refresh_token)["consumed"] is True

    # When the old refresh token is presented again,
    reused = refresh(oidc_provider, client, tokens.refresh_token)

    # Then it is refused and the whole grant dies, new tokens included.
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    after = refresh(oidc_provider, client, rotated["refresh_token"])
    assert after.json()["error"] == "invalid_grant"
    assert api_get(oidc_provider, "/v2/me", rotated["access_token"]).status_code == 401
    assert oidc_provider.grants(sub="erin", client_id=client.client_id) == []


def test_concurrent_refreshes_with_one_token_count_as_reuse(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "eve")

    with ThreadPoolExecutor(2) as pool:
        responses = list(
            pool.map(lambda _: refresh(oidc_provider, client, tokens.refresh_token), range(2))
        )

    # One wins, one is reuse; reuse revokes the grant, so the winner's tokens die too.
    assert sorted(r.status_code for r in responses) == [200, 400]
    winner = next(r.json() for r in responses if r.status_code == 200)
    assert (
        refresh(oidc_provider, client, winner["refresh_token"]).json()["error"] == "invalid_grant"
    )


def test_rfc7009_revocation_makes_introspection_inactive(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "frank")
    auth = client.auth(oidc_provider)
    assert oidc_provider.introspect(tokens.refresh_token, auth)["active"] is True

    response = oidc_provider.revoke_token(
        tokens.refresh_token, client.auth(oidc_provider), token_type_hint="refresh_token"
    )

    assert response.status_code == 200
    assert oidc_provider.introspect(tokens.refresh_token, client.auth(oidc_provider)) == {
        "active": False
    }
    # Revoking a refresh token revokes its grant, so the access token dies too.
    assert oidc_provider.introspect(tokens.access_token, client.auth(oidc_provider)) == {
        "active": False
    }
    assert oidc_provider.stats()["revocation"]["by_client_id"] == {client.client_id: 1}


def test_revoke_grants_at_the_as_breaks_the_next_refresh(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "grace")
    assert api_get(oidc_provider, "/v2/me", tokens.access_token).status_code == 200

    assert oidc_provider.revoke_grants("grace", client.client_id) == 1

    response = refresh(oidc_provider, client, tokens.refresh_token)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert api_get(oidc_provider, "/v2/me", tokens.access_token).status_code == 401
    stats = oidc_provider.stats()["token"]
    assert stats["by_client_id"][client.client_id] == {"authorization_code": 1, "refresh_token": 1}


# --------------------------------------------------------------------------------------------
# The API


def test_api_checks_tokens_and_records_every_call(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "heidi")

    me = api_get(oidc_provider, "/v2/me", tokens.access_token)
    with httpx.Client(trust_env=False) as http:
        created = http.post(
            oidc_provider.api_base + "/v2/reports",
            json={"title": "Q3"},
            headers={"Authorization": f"Bearer {tokens.access_token}"},
        )
    bad = api_get(oidc_provider, "/v2/reports", "not-a-token")
    missing = api_get(oidc_provider, "/v2/reports", None)

    assert me.json() == {"sub": "heidi", "client_id": client.client_id, "scope": tokens.scope}
    assert created.status_code == 201
    assert created.json()["owner"] == "heidi"
    assert (
        api_get(oidc_provider, "/v2/reports", tokens.access_token).json()["reports"][0]["title"]
        == "Q3"
    )
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"].startswith(
        'Bearer realm="test-api", error="invalid_token"'
    )
    assert missing.status_code == 401
    assert "error=" not in missing.headers["www-authenticate"]

    calls = oidc_provider.api_calls()
    assert [(c["method"], c["path"], c["status"]) for c in calls] == [
        ("GET", "/v2/me", 200),
        ("POST", "/v2/reports", 201),
        ("GET", "/v2/reports", 401),
        ("GET", "/v2/reports", 401),
        ("GET", "/v2/reports", 200),
    ]
    assert calls[0]["token_sha256"] == sha256_hex(tokens.access_token)
    assert (calls[0]["sub"], calls[0]["client_id"]) == ("heidi", client.client_id)
    assert calls[2]["token_sha256"] == sha256_hex("not-a-token")
    assert calls[2]["sub"] is None
    assert calls[3]["token_sha256"] is None
    assert tokens.access_token not in json.dumps(calls)


def test_short_lived_access_tokens_expire_at_the_api(
    oidc_provider_factory: OidcProviderFactory,
) -> None:
    provider = oidc_provider_factory(access_token_ttl=1)
    tokens = authorize(provider, register(provider), "ivan")
    assert tokens.raw["expires_in"] == 1
    assert api_get(provider, "/v2/me", tokens.access_token).status_code == 200

    time.sleep(1.2)

    expired = api_get(provider, "/v2/me", tokens.access_token)
    assert expired.status_code == 401
    assert "token expired" in expired.headers["www-authenticate"]


# --------------------------------------------------------------------------------------------
# Faults


def test_fault_status_with_retry_after_then_recovery(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "judy")
    oidc_provider.set_fault("token", status=503, retry_after=1, error="temporarily_unavailable")

    failed = refresh(oidc_provider, client, tokens.refresh_token)
    recovered = refresh(oidc_provider, client, tokens.refresh_token)

    assert failed.status_code == 503
    assert failed.headers["retry-after"] == "1"
    assert failed.json() == {"error": "temporarily_unavailable"}
    # The faulted request never reached oidc-provider: the token was not rotated.
    assert recovered.status_code == 200
    requests = oidc_provider.stats()["requests"]
    assert [(r["grant_type"], r["status"], r["fault"]) for r in requests][-2:] == [
        ("refresh_token", 503, "status"),
        ("refresh_token", 200, None),
    ]


def test_fault_hang_times_the_client_out(oidc_provider: OidcProvider, client: Client) -> None:
    tokens = authorize(oidc_provider, client, "ken")
    oidc_provider.set_fault("token", mode="hang", seconds=1.5, grant_type="refresh_token")

    with pytest.raises(httpx.ReadTimeout):
        refresh(oidc_provider, client, tokens.refresh_token, timeout=0.3)

    assert oidc_provider.token_info(tokens.refresh_token)["consumed"] is False


def test_fault_drop_closes_the_connection(oidc_provider: OidcProvider, client: Client) -> None:
    tokens = authorize(oidc_provider, client, "liz")
    oidc_provider.set_fault("token", mode="drop")

    with pytest.raises(httpx.RemoteProtocolError):
        refresh(oidc_provider, client, tokens.refresh_token)

    assert oidc_provider.token_info(tokens.refresh_token)["consumed"] is False


def test_fault_lose_response_rotates_without_answering(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "mallory")
    oidc_provider.set_fault("token", mode="lose_response")

    with pytest.raises(httpx.RemoteProtocolError):
        refresh(oidc_provider, client, tokens.refresh_token)

    # The AS rotated the token; a retry with the old one is reuse, which kills the grant.
    assert oidc_provider.token_info(tokens.refresh_token)["consumed"] is True
    retry = refresh(oidc_provider, client, tokens.refresh_token)
    assert retry.json()["error"] == "invalid_grant"
    assert oidc_provider.stats()["requests"][-2]["processed_status"] == 200


def test_revocation_faults(oidc_provider: OidcProvider, client: Client) -> None:
    tokens = authorize(oidc_provider, client, "nina")
    oidc_provider.set_fault("revocation", status=500)
    oidc_provider.set_fault("revocation", mode="lose_response")

    first = oidc_provider.revoke_token(tokens.refresh_token, client.auth(oidc_provider))
    with pytest.raises(httpx.RemoteProtocolError):
        oidc_provider.revoke_token(tokens.refresh_token, client.auth(oidc_provider))

    assert first.status_code == 500
    assert oidc_provider.token_info(tokens.refresh_token)["active"] is False
    assert oidc_provider.stats()["revocation"]["total"] == 2


def test_api_faults(oidc_provider: OidcProvider, client: Client) -> None:
    tokens = authorize(oidc_provider, client, "oscar")
    oidc_provider.set_api_fault(status=429, retry_after=2, count=2, path="/v2/reports")

    throttled = [api_get(oidc_provider, "/v2/reports", tokens.access_token) for _ in range(2)]
    unaffected = api_get(oidc_provider, "/v2/me", tokens.access_token)
    recovered = api_get(oidc_provider, "/v2/reports", tokens.access_token)

    assert [(r.status_code, r.headers.get("retry-after")) for r in throttled] == [(429, "2")] * 2
    assert unaffected.status_code == 200
    assert recovered.status_code == 200
    calls = oidc_provider.api_calls()
    assert [(c["status"], c["fault"], c["sub"]) for c in calls] == [
        (429, "status", "oscar"),
        (429, "status", "oscar"),
        (200, None, "oscar"),
        (200, None, "oscar"),
    ]


def test_api_records_calls_the_client_abandoned(
    oidc_provider: OidcProvider, client: Client
) -> None:
    tokens = authorize(oidc_provider, client, "peggy")
    with httpx.Client(trust_env=False, timeout=0.2) as http, pytest.raises(httpx.ReadTimeout):
        http.get(
            oidc_provider.api_base + "/v2/slow?ms=600",
            headers={"Authorization": f"Bearer {tokens.access_token}"},
        )
    time.sleep(0.6)
    (call,) = oidc_provider.api_calls()
    assert call["path"] == "/v2/slow"
    assert call["aborted"] is True
