"""Drive the sandbox AS like a client and a browser would: register, sign in, consent, exchange."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT, private_key_jwt_sign
from joserfc.jwk import RSAKey

from behalf.sandbox import Sandbox

ISSUER = "http://127.0.0.1:9001"
API_BASE = "http://127.0.0.1:9002"
REDIRECT_URI = "http://127.0.0.1:8000/oauth/callback"
TOKEN_URL = f"{ISSUER}/token"
REVOKE_URL = f"{ISSUER}/revoke"
INTROSPECT_URL = f"{ISSUER}/introspect"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class RegisteredClient:
    client_id: str
    auth_method: str
    secret: str | None = None
    key: RSAKey | None = None

    def oauth(self, sandbox: Sandbox) -> AsyncOAuth2Client:
        """Authlib's own client, authenticating the way this client registered."""
        credential: Any = self.key if self.auth_method == "private_key_jwt" else self.secret
        client = AsyncOAuth2Client(
            self.client_id,
            credential,
            token_endpoint_auth_method=self.auth_method,
            revocation_endpoint_auth_method=self.auth_method,
            transport=httpx.ASGITransport(app=sandbox.auth_app),
        )
        if self.auth_method == "private_key_jwt":
            client.register_client_auth_method(PrivateKeyJWT(TOKEN_URL))
        return client

    def authenticate(
        self, endpoint: str, data: dict[str, str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Headers and form fields that authenticate this client to `endpoint` (raw requests)."""
        if self.auth_method == "private_key_jwt":
            assert self.key is not None
            assertion = private_key_jwt_sign(self.key, self.client_id, endpoint)
            return {}, {
                **data,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            }
        assert self.secret is not None
        if self.auth_method == "client_secret_post":
            return {}, {**data, "client_id": self.client_id, "client_secret": self.secret}
        basic = base64.b64encode(f"{self.client_id}:{self.secret}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}, data


async def register(
    auth: httpx.AsyncClient, auth_method: str = "private_key_jwt", **metadata: Any
) -> RegisteredClient:
    body: dict[str, Any] = {
        "client_name": "Reporting agent",
        "redirect_uris": [REDIRECT_URI],
        "grant_types": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_method": auth_method,
        **metadata,
    }
    key = None
    if auth_method == "private_key_jwt":
        key = RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, auto_kid=True)
        body.setdefault("jwks", {"keys": [key.as_dict(private=False)]})
    response = await auth.post("/register", json=body)
    assert response.status_code == 201, response.text
    registered = response.json()
    return RegisteredClient(
        client_id=registered["client_id"],
        auth_method=auth_method,
        secret=registered.get("client_secret"),
        key=key,
    )


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    return verifier, challenge.decode()


@dataclass(frozen=True)
class Authorized:
    """Where the AS sent the browser back, and the PKCE verifier that goes with it."""

    params: dict[str, str]
    verifier: str
    location: str

    @property
    def code(self) -> str:
        return self.params["code"]


def _form_value(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, f"no {name} in page"
    return html.unescape(match.group(1))


async def sign_in(
    auth: httpx.AsyncClient, login_url: str, user: str, password: str = "demo"
) -> httpx.Response:
    page = await auth.get(login_url)
    assert page.status_code == 200
    return await auth.post(
        "/login",
        data={
            "username": user,
            "password": password,
            "next": _form_value(page.text, "next"),
            "csrf": _form_value(page.text, "csrf"),
        },
    )


async def authorize(
    auth: httpx.AsyncClient,
    client: RegisteredClient,
    *,
    scope: str = "openid profile reports:read",
    user: str = "alice",
    untick: tuple[str, ...] = (),
    decision: str = "allow",
    state: str = "state-123",
    nonce: str | None = None,
    pkce: dict[str, str] | None = None,
) -> Authorized:
    """Run the browser part of the code flow: authorize → login → consent → back to the client.

    `pkce` replaces the default S256 parameters (to send `plain`, or none at all with {}).
    """
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": scope,
        "state": state,
        **(
            {"code_challenge": challenge, "code_challenge_method": "S256"} if pkce is None else pkce
        ),
        **({"nonce": nonce} if nonce else {}),
    }
    response = await auth.get("/authorize?" + urlencode(params))
    if response.status_code == 303 and response.headers["location"].startswith("/login"):
        response = await sign_in(auth, response.headers["location"], user)
        assert response.status_code == 303, response.text
        response = await auth.get(response.headers["location"])
    if response.status_code == 200:  # the consent page
        page = response.text
        ticked = [
            s for s in re.findall(r'name="scope" value="([^"]+)" checked', page) if s not in untick
        ]
        action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page).group(1))  # type: ignore[union-attr]
        response = await auth.post(
            action, data={"csrf": _form_value(page, "csrf"), "scope": ticked, "decision": decision}
        )
    assert response.status_code in (302, 303), response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI), location
    return Authorized(dict(parse_qsl(urlsplit(location).query)), verifier, location)


async def post_token(
    auth: httpx.AsyncClient, client: RegisteredClient, endpoint: str, **data: str
) -> httpx.Response:
    headers, form = client.authenticate(endpoint, data)
    return await auth.post(endpoint, data=form, headers=headers)


async def connect(
    auth: httpx.AsyncClient,
    client: RegisteredClient,
    scope: str = "openid profile reports:read",
    **kwargs: Any,
) -> dict[str, Any]:
    """The whole code flow; returns the token response."""
    authorized = await authorize(auth, client, scope=scope, **kwargs)
    response = await post_token(
        auth,
        client,
        TOKEN_URL,
        grant_type="authorization_code",
        code=authorized.code,
        redirect_uri=REDIRECT_URI,
        code_verifier=authorized.verifier,
    )
    assert response.status_code == 200, response.text
    token: dict[str, Any] = response.json()
    return token


async def refresh(
    auth: httpx.AsyncClient, client: RegisteredClient, refresh_token: str
) -> httpx.Response:
    return await post_token(
        auth, client, TOKEN_URL, grant_type="refresh_token", refresh_token=refresh_token
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
