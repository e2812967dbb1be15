from __future__ import annotations

from urllib.parse import urlencode

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from behalf.sandbox import Sandbox
from tests.unit.sandbox.helpers import (
    ISSUER,
    REDIRECT_URI,
    TOKEN_URL,
    FakeClock,
    authorize,
    bearer,
    connect,
    pkce_pair,
    post_token,
    register,
    sign_in,
)

pytestmark = pytest.mark.anyio


async def test_full_code_flow_with_private_key_jwt_and_an_id_token(
    sandbox: Sandbox, auth: httpx.AsyncClient, clock: FakeClock
) -> None:
    # Given a client registered with its public key
    client = await register(auth, "private_key_jwt")

    # When alice signs in and consents, and the client exchanges the code with Authlib's own
    # client, authenticating with private_key_jwt
    authorized = await authorize(
        auth, client, scope="openid profile email reports:read", nonce="n-0S6_WzA2Mj", state="xyz"
    )
    assert authorized.params["state"] == "xyz"
    assert authorized.params["iss"] == ISSUER  # RFC 9207
    async with client.oauth(sandbox) as oauth:
        token = await oauth.fetch_token(
            TOKEN_URL,
            grant_type="authorization_code",
            code=authorized.code,
            redirect_uri=REDIRECT_URI,
            code_verifier=authorized.verifier,
        )

    # Then it holds a bearer token, a refresh token and an id_token for alice
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 300
    assert token["refresh_token"]
    assert token["scope"] == "openid profile email reports:read"
    jwks = KeySet.import_key_set((await auth.get("/jwks")).json())
    id_token = jwt.decode(token["id_token"], jwks, algorithms=["RS256"])
    assert id_token.header["kid"] == jwks.keys[0].kid
    jwt.JWTClaimsRegistry(
        now=int(clock()),
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": client.client_id},
        sub={"essential": True, "value": "alice"},
        nonce={"essential": True, "value": "n-0S6_WzA2Mj"},
        exp={"essential": True},
    ).validate(id_token.claims)
    assert id_token.claims["email"] == "alice@example.test"
    assert id_token.claims["name"] == "Alice Anders"
    userinfo = await auth.get("/userinfo", headers=bearer(token["access_token"]))
    assert userinfo.json() == {
        "sub": "alice",
        "name": "Alice Anders",
        "preferred_username": "alice",
        "email": "alice@example.test",
        "email_verified": True,
    }


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_code_flow_with_a_client_secret(auth: httpx.AsyncClient, method: str) -> None:
    client = await register(auth, method)

    token = await connect(auth, client, scope="reports:read", user="bob")

    assert token["scope"] == "reports:read"
    assert "id_token" not in token  # no openid scope, no id_token
    introspection = await post_token(
        auth, client, f"{ISSUER}/introspect", token=token["access_token"]
    )
    assert introspection.json()["sub"] == "bob"


async def test_wrong_client_secret_is_refused(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    authorized = await authorize(auth, client)
    impostor = type(client)(client.client_id, client.auth_method, secret="guessed")

    response = await post_token(
        auth,
        impostor,
        TOKEN_URL,
        grant_type="authorization_code",
        code=authorized.code,
        redirect_uri=REDIRECT_URI,
        code_verifier=authorized.verifier,
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("pkce", "why"),
    [
        ({"code_challenge": "x" * 43, "code_challenge_method": "plain"}, "plain"),
        ({"code_challenge": "x" * 43}, "no method means plain"),
        ({}, "missing"),
    ],
)
async def test_pkce_is_s256_only_and_mandatory(
    auth: httpx.AsyncClient, pkce: dict[str, str], why: str
) -> None:
    client = await register(auth, "client_secret_basic")

    authorized = await authorize(auth, client, pkce=pkce, state="s1")

    assert authorized.params["error"] == "invalid_request", why
    assert authorized.params["state"] == "s1"
    assert authorized.params["iss"] == ISSUER
    assert "code" not in authorized.params


async def test_a_wrong_or_missing_code_verifier_is_refused(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    authorized = await authorize(auth, client)
    other_verifier, _ = pkce_pair()

    wrong = await post_token(
        auth,
        client,
        TOKEN_URL,
        grant_type="authorization_code",
        code=authorized.code,
        redirect_uri=REDIRECT_URI,
        code_verifier=other_verifier,
    )
    missing = await post_token(
        auth,
        client,
        TOKEN_URL,
        grant_type="authorization_code",
        code=authorized.code,
        redirect_uri=REDIRECT_URI,
    )

    assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant")
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_request")


async def test_consent_grants_only_the_ticked_scopes(
    auth: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    client = await register(auth, "private_key_jwt")

    # When alice unticks reports:write and calendar:read
    token = await connect(
        auth,
        client,
        scope="openid reports:read reports:write calendar:read",
        untick=("reports:write", "calendar:read"),
    )

    # Then the token carries what she left ticked, and the API holds it to that
    assert token["scope"] == "openid reports:read"
    assert (await api.get("/v2/reports", headers=bearer(token["access_token"]))).status_code == 200
    assert (await api.get("/v2/calendar", headers=bearer(token["access_token"]))).status_code == 403


async def test_consent_page_lists_requested_scopes_ticked(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    _, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": "openid reports:read",
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    login = await auth.get("/authorize?" + query)
    await sign_in(auth, login.headers["location"], "alice")

    page = (await auth.get("/authorize?" + query)).text

    assert 'name="scope" value="openid" checked' in page
    assert 'name="scope" value="reports:read" checked' in page
    assert 'id="allow"' in page and 'id="deny"' in page
    assert "Reporting agent" in page


async def test_deny_sends_access_denied_back(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")

    authorized = await authorize(auth, client, decision="deny", state="abc")

    assert authorized.params["error"] == "access_denied"
    assert authorized.params["state"] == "abc"
    assert authorized.params["iss"] == ISSUER
    assert "code" not in authorized.params


async def test_unticking_everything_is_a_deny(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")

    authorized = await authorize(auth, client, scope="reports:read", untick=("reports:read",))

    assert authorized.params["error"] == "access_denied"


async def test_a_code_works_once_and_its_reuse_revokes_the_grant(
    auth: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    client = await register(auth, "client_secret_basic")
    authorized = await authorize(auth, client)
    exchange = {
        "grant_type": "authorization_code",
        "code": authorized.code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": authorized.verifier,
    }
    first = await post_token(auth, client, TOKEN_URL, **exchange)
    assert first.status_code == 200

    second = await post_token(auth, client, TOKEN_URL, **exchange)

    assert second.json()["error"] == "invalid_grant"
    me = await api.get("/v2/me", headers=bearer(first.json()["access_token"]))
    assert me.status_code == 401


async def test_a_code_is_bound_to_its_client(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    thief = await register(auth, "client_secret_basic")
    authorized = await authorize(auth, client)

    response = await post_token(
        auth,
        thief,
        TOKEN_URL,
        grant_type="authorization_code",
        code=authorized.code,
        redirect_uri=REDIRECT_URI,
        code_verifier=authorized.verifier,
    )

    assert response.json()["error"] == "invalid_grant"


async def test_an_expired_code_is_refused(auth: httpx.AsyncClient, clock: FakeClock) -> None:
    client = await register(auth, "client_secret_basic")
    authorized = await authorize(auth, client)
    clock.advance(601)

    response = await post_token(
        auth,
        client,
        TOKEN_URL,
        grant_type="authorization_code",
        code=authorized.code,
        redirect_uri=REDIRECT_URI,
        code_verifier=authorized.verifier,
    )

    assert response.json()["error"] == "invalid_grant"


async def test_a_replayed_client_assertion_is_refused(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "private_key_jwt")
    headers, form = client.authenticate(
        TOKEN_URL, {"grant_type": "refresh_token", "refresh_token": "x"}
    )
    await auth.post("/token", data=form, headers=headers)

    replay = await auth.post("/token", data=form, headers=headers)

    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_client"


async def test_an_unregistered_redirect_uri_gets_an_error_page_not_a_redirect(
    auth: httpx.AsyncClient,
) -> None:
    client = await register(auth, "client_secret_basic")
    _, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": "http://127.0.0.1:6666/evil",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )

    response = await auth.get("/authorize?" + query)

    assert response.status_code == 400
    assert "location" not in response.headers
    assert "invalid_request" in response.text


async def test_wrong_password_stays_on_the_login_page(auth: httpx.AsyncClient) -> None:
    response = await sign_in(auth, "/login?next=/authorize", "alice", password="nope")

    assert response.status_code == 401
    assert "Wrong username or password" in response.text
    assert "alice" in response.text and "bob" in response.text  # the demo users are shown


async def test_login_never_redirects_off_site(auth: httpx.AsyncClient) -> None:
    response = await sign_in(auth, "/login?next=//evil.example/x", "alice")

    assert response.status_code == 303
    assert response.headers["location"] == "/_sandbox/admin"


async def test_prompt_none_cannot_skip_consent(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    _, challenge = pkce_pair()
    query = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }

    anonymous = await auth.get("/authorize?" + urlencode({**query, "prompt": "none"}))
    await sign_in(auth, "/login", "alice")
    signed_in = await auth.get("/authorize?" + urlencode({**query, "prompt": "none"}))

    assert "error=login_required" in anonymous.headers["location"]
    assert "error=consent_required" in signed_in.headers["location"]
    assert f"iss={ISSUER}".replace(":", "%3A").replace("/", "%2F") in signed_in.headers["location"]


async def test_consent_post_without_the_form_token_is_refused(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    await sign_in(auth, "/login", "alice")
    _, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": "reports:read",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )

    response = await auth.post(
        "/authorize?" + query, data={"decision": "allow", "scope": "reports:read"}
    )

    assert response.status_code == 400
    assert "location" not in response.headers


async def test_prompt_login_asks_a_signed_in_user_to_sign_in_again(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    await sign_in(auth, "/login", "alice")
    _, challenge = pkce_pair()
    query = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }

    response = await auth.get("/authorize?" + urlencode({**query, "prompt": "login"}))

    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith("/login?next=")
    assert "prompt" not in location  # back from the login page, no second prompt


async def test_userinfo_needs_the_openid_scope(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    token = await connect(auth, client, scope="reports:read")

    response = await auth.get("/userinfo", headers=bearer(token["access_token"]))

    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
