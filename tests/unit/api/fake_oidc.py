"""An in-memory OpenID Connect AS behind `httpx.MockTransport`, for the connect unit tests.

It speaks enough of the real thing to be strict where it matters: discovery (RFC 8414 and
OIDC), open registration (RFC 7591) with `private_key_jwt` and client secrets, the
authorisation endpoint (driven by `authorize`, which plays the user's browser), the token
endpoint (single-use codes bound to the client, redirect URI and PKCE S256 challenge; client
authentication checked, assertions verified against the registered JWKS), refresh with
rotation, RFC 7009 revocation, JWKS and userinfo. Knobs let a test make it misbehave: forge
ID tokens, omit the refresh token, widen scopes, answer for another issuer, or go down.

The real, independent AS (oidc-provider) is exercised by the integration tests; this one keeps
the many bad-input cases fast and deterministic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from delegation.clock import Clock

ISSUER = "https://as.test"
_KEYS: list[RSAKey] = []


def _signing_key() -> RSAKey:
    """The AS's ID-token key: one per test session (RSA key generation is slow)."""
    if not _KEYS:
        _KEYS.append(RSAKey.generate_key(2048, parameters={"kid": "as-key-1"}, private=True))
    return _KEYS[0]


@dataclass
class Client:
    client_id: str
    auth_method: str
    redirect_uris: list[str]
    grant_types: list[str]
    secret: str | None = None
    jwks: dict[str, Any] | None = None
    registration_access_token: str | None = None


@dataclass
class Code:
    client_id: str
    sub: str
    redirect_uri: str
    challenge: str
    scope: list[str]
    nonce: str | None
    used: bool = False


@dataclass
class Refresh:
    client_id: str
    sub: str
    scope: list[str]
    alive: bool = True


@dataclass
class Knobs:
    """How the next answers misbehave (all off by default)."""

    omit_refresh_token: bool = False
    omit_id_token: bool = False
    scope_in_response: str | None = None  # e.g. wider than requested
    omit_scope: bool = False
    id_token_claims: dict[str, Any] = field(default_factory=dict)  # overrides
    id_token_signer: RSAKey | None = None  # sign with a key not in the JWKS
    id_token_sub: str | None = None  # say another user consented
    response_iss: str | None = None  # `iss` in the authorisation response
    omit_response_iss: bool = False
    down: bool = False  # every request fails to connect
    token_status: int | None = None  # the token endpoint answers this status


class FakeOidcProvider:
    def __init__(self, clock: Clock, *, issuer: str = ISSUER, openid: bool = True,
                 iss_parameter: bool = True) -> None:
        self.clock = clock
        self.issuer = issuer
        self.openid = openid
        self.iss_parameter = iss_parameter
        self.signing_key = _signing_key()
        self.clients: dict[str, Client] = {}
        self.codes: dict[str, Code] = {}
        self.refresh_tokens: dict[str, Refresh] = {}
        self.access_tokens: dict[str, tuple[str, str, list[str]]] = {}
        self.revoked: list[str] = []
        self.issued: list[str] = []  # every secret it handed out (for leak checks)
        self.token_requests: list[dict[str, str]] = []
        self.knobs = Knobs()

    # --- as the user's browser -------------------------------------------------------------

    def authorize(self, url: str, sub: str, *, grant: list[str] | None = None,
                  error: str | None = None) -> str:
        """Log `sub` in and consent (to `grant`, default all requested); the redirect back."""
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{self.issuer}/authorize"
        q = dict(parse_qsl(parts.query))
        client = self.clients[q["client_id"]]
        assert q["redirect_uri"] in client.redirect_uris
        assert q["response_type"] == "code"
        assert q["code_challenge_method"] == "S256"
        params: dict[str, str] = {"state": q["state"]}
        if error is not None:
            params["error"] = error
        else:
            requested = q.get("scope", "").split()
            scope = [s for s in requested if grant is None or s in grant or s == "openid"]
            code = "code-" + secrets.token_urlsafe(24)
            self.codes[code] = Code(client.client_id, sub, q["redirect_uri"],
                                    q["code_challenge"], scope, q.get("nonce"))
            self.issued.append(code)
            params["code"] = code
        if not self.knobs.omit_response_iss and (self.iss_parameter or self.knobs.response_iss):
            params["iss"] = self.knobs.response_iss or self.issuer
        return f"{q['redirect_uri']}?{urlencode(params)}"

    # --- HTTP ------------------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.knobs.down:
            raise httpx.ConnectError("connection refused", request=request)
        url = request.url
        if f"{url.scheme}://{url.host}" != self.issuer:
            return httpx.Response(404)
        routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = {
            ("GET", "/.well-known/oauth-authorization-server"): self._metadata,
            ("GET", "/.well-known/openid-configuration"): self._metadata,
            ("POST", "/register"): self._register,
            ("POST", "/token"): self._token,
            ("POST", "/revoke"): self._revoke,
            ("GET", "/jwks"): self._jwks,
            ("GET", "/userinfo"): self._userinfo,
        }
        route = routes.get((request.method, url.path))
        if route is None and request.method == "PUT" and url.path.startswith("/register/"):
            return self._update(request)
        if route is None:
            return httpx.Response(404)
        return route(request)

    def metadata(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "registration_endpoint": f"{self.issuer}/register",
            "revocation_endpoint": f"{self.issuer}/revoke",
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic",
                                                      "client_secret_post"],
            "authorization_response_iss_parameter_supported": self.iss_parameter,
            "scopes_supported": ["reports:read", "reports:write", "calendar:read"],
            "userinfo_endpoint": f"{self.issuer}/userinfo",
        }
        if self.openid:
            doc["scopes_supported"] = ["openid", *doc["scopes_supported"]]
            doc["jwks_uri"] = f"{self.issuer}/jwks"
            doc["id_token_signing_alg_values_supported"] = ["RS256"]
        return doc

    def _metadata(self, _request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=self.metadata())

    def _register(self, request: httpx.Request) -> httpx.Response:
        doc = json.loads(request.content)
        method = doc.get("token_endpoint_auth_method", "client_secret_basic")
        client = Client(
            client_id="client-" + secrets.token_hex(8), auth_method=method,
            redirect_uris=list(doc["redirect_uris"]),
            grant_types=list(doc.get("grant_types") or ["authorization_code"]),
            jwks=doc.get("jwks"),
            registration_access_token="rat-" + secrets.token_urlsafe(16),
        )
        if method != "private_key_jwt":
            client.secret = "secret-" + secrets.token_urlsafe(24)
            self.issued.append(client.secret)
        self.issued.append(client.registration_access_token or "")
        self.clients[client.client_id] = client
        answer = {k: v for k, v in doc.items()}
        answer.update({"client_id": client.client_id,
                       "registration_access_token": client.registration_access_token,
                       "registration_client_uri": f"{self.issuer}/register/{client.client_id}"})
        if client.secret:
            answer["client_secret"] = client.secret
        return httpx.Response(201, json=answer)

    def _update(self, request: httpx.Request) -> httpx.Response:
        client_id = request.url.path.rsplit("/", 1)[1]
        client = self.clients.get(client_id)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if client is None or bearer != client.registration_access_token:
            return httpx.Response(401, json={"error": "invalid_token"})
        doc = json.loads(request.content)
        if doc.get("client_id") != client_id or "registration_access_token" in doc:
            return httpx.Response(400, json={"error": "invalid_request"})
        client.jwks = doc.get("jwks")
        client.registration_access_token = "rat-" + secrets.token_urlsafe(16)
        self.issued.append(client.registration_access_token)
        answer = dict(doc)
        answer.update({"registration_access_token": client.registration_access_token,
                       "registration_client_uri": str(request.url)})
        return httpx.Response(200, json=answer)

    def _authenticate(self, request: httpx.Request, form: dict[str, str]) -> Client | None:
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            client = self.clients.get(client_id)
            ok = client is not None and client.auth_method == "client_secret_basic" \
                and secrets.compare_digest(client.secret or "", secret)
            return client if ok else None
        if "client_assertion" in form:
            try:
                unverified = json.loads(base64.urlsafe_b64decode(
                    form["client_assertion"].split(".")[1] + "=="))
                client = self.clients.get(unverified["sub"])
                if client is None or client.auth_method != "private_key_jwt" or not client.jwks:
                    return None
                token = jwt.decode(form["client_assertion"],
                                   KeySet.import_key_set(client.jwks), algorithms=["RS256"])
                claims = token.claims
                if claims["iss"] != client.client_id or claims["aud"] not in (
                        f"{self.issuer}/token", self.issuer):
                    return None
                return client
            except Exception:
                return None
        client = self.clients.get(form.get("client_id", ""))
        if client is not None and client.auth_method == "client_secret_post" and \
                secrets.compare_digest(client.secret or "", form.get("client_secret", "")):
            return client
        return None

    def _token(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        self.token_requests.append(form)
        if self.knobs.token_status is not None:
            return httpx.Response(self.knobs.token_status, json={"error": "server_error"})
        client = self._authenticate(request, form)
        if client is None:
            return httpx.Response(401, json={"error": "invalid_client"})
        if form.get("grant_type") == "authorization_code":
            return self._code_grant(client, form)
        if form.get("grant_type") == "refresh_token":
            grant = self.refresh_tokens.get(form.get("refresh_token", ""))
            if grant is None or not grant.alive or grant.client_id != client.client_id:
                return httpx.Response(400, json={"error": "invalid_grant"})
            grant.alive = False
            return httpx.Response(200, json=self._tokens(client, grant.sub, grant.scope, None))
        return httpx.Response(400, json={"error": "unsupported_grant_type"})

    def _code_grant(self, client: Client, form: dict[str, str]) -> httpx.Response:
        code = self.codes.get(form.get("code", ""))
        verifier = form.get("code_verifier", "")
        if code is None or code.used or code.client_id != client.client_id:
            return httpx.Response(400, json={"error": "invalid_grant"})
        code.used = True
        if code.redirect_uri != form.get("redirect_uri"):
            return httpx.Response(400, json={"error": "invalid_grant"})
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != code.challenge:
            return httpx.Response(400, json={"error": "invalid_grant",
                                             "error_description": "PKCE verification failed"})
        return httpx.Response(200, json=self._tokens(client, code.sub, code.scope, code.nonce))

    def _tokens(self, client: Client, sub: str, scope: list[str],
                nonce: str | None) -> dict[str, Any]:
        knobs = self.knobs
        access = "at-" + secrets.token_urlsafe(24)
        self.access_tokens[access] = (client.client_id, sub, scope)
        doc: dict[str, Any] = {"access_token": access, "token_type": "Bearer",
                               "expires_in": 300}
        self.issued.append(access)
        api_scopes = [s for s in scope if s != "openid"]
        if not knobs.omit_scope:
            doc["scope"] = knobs.scope_in_response or " ".join(api_scopes)
        if "refresh_token" in client.grant_types and not knobs.omit_refresh_token:
            refresh = "rt-" + secrets.token_urlsafe(24)
            self.refresh_tokens[refresh] = Refresh(client.client_id, sub, scope)
            self.issued.append(refresh)
            doc["refresh_token"] = refresh
        if "openid" in scope and not knobs.omit_id_token:
            doc["id_token"] = self.id_token(client.client_id, knobs.id_token_sub or sub, nonce)
        return doc

    def id_token(self, client_id: str, sub: str, nonce: str | None) -> str:
        now = int(self.clock.now().timestamp())
        claims: dict[str, Any] = {"iss": self.issuer, "sub": sub, "aud": client_id,
                                  "iat": now, "exp": now + 600}
        if nonce is not None:
            claims["nonce"] = nonce
        claims.update(self.knobs.id_token_claims)
        key = self.knobs.id_token_signer or self.signing_key
        token = jwt.encode({"alg": "RS256", "kid": "as-key-1"}, claims, key)
        self.issued.append(token)
        return token

    def _revoke(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        if self._authenticate(request, form) is None:
            return httpx.Response(401, json={"error": "invalid_client"})
        token = form.get("token", "")
        self.revoked.append(token)
        grant = self.refresh_tokens.get(token)
        if grant is not None:
            grant.alive = False
        self.access_tokens.pop(token, None)
        return httpx.Response(200)

    def _jwks(self, _request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"keys": [self.signing_key.as_dict(private=False)]})

    def _userinfo(self, request: httpx.Request) -> httpx.Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        entry = self.access_tokens.get(token)
        if entry is None:
            return httpx.Response(401, json={"error": "invalid_token"})
        return httpx.Response(200, json={"sub": self.knobs.id_token_sub or entry[1]})
