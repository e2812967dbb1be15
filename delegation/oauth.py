"""The OAuth protocol client: discovery, registration, authorisation URL, code exchange,
refresh, revocation and ID-token validation.

Authlib does the protocol (request encoding, client authentication including
`private_key_jwt`, PKCE, JOSE); this module owns the HTTP client (injected: tests pass an
`httpx.MockTransport`), the clock, and the translation of every failure into our error tree:

    invalid_grant                                   -> ReauthRequired
    invalid_client, unauthorized_client             -> AgentMisconfigured
    5xx, 429, timeouts, temporarily_unavailable     -> ProviderUnavailable (retry_after)
    anything else the AS refuses                    -> ProviderError

No token is kept on the client object: every call takes and returns its own values, so
two delegations can never share token state (a module-global token is how one user's token
reaches another).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from authlib.common.urls import url_decode
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

from delegation.clock import Clock
from delegation.errors import (
    AgentMisconfigured,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
)
from delegation.tokens import ClientCredentials, TokenSet

RETRYABLE_OAUTH_ERRORS = {"temporarily_unavailable", "server_error", "slow_down"}
CLIENT_ERRORS = {"invalid_client", "unauthorized_client"}
MAX_RETRY_AFTER = 300.0
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]


@dataclass(frozen=True)
class Endpoints:
    """The parts of an AS's metadata that behalf uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str | None = None
    registration_endpoint: str | None = None
    introspection_endpoint: str | None = None
    jwks_uri: str | None = None
    userinfo_endpoint: str | None = None
    iss_parameter_supported: bool = False
    openid: bool = False

    @classmethod
    def from_metadata(cls, doc: dict[str, Any]) -> Endpoints:
        return cls(
            issuer=doc["issuer"],
            authorization_endpoint=doc["authorization_endpoint"],
            token_endpoint=doc["token_endpoint"],
            revocation_endpoint=doc.get("revocation_endpoint"),
            registration_endpoint=doc.get("registration_endpoint"),
            introspection_endpoint=doc.get("introspection_endpoint"),
            jwks_uri=doc.get("jwks_uri"),
            userinfo_endpoint=doc.get("userinfo_endpoint"),
            iss_parameter_supported=bool(doc.get("authorization_response_iss_parameter_supported")),
            openid="openid" in doc.get("scopes_supported", []) or "jwks_uri" in doc,
        )


@dataclass(frozen=True)
class CodeExchange:
    tokens: TokenSet
    id_token: str | None
    granted_scopes: tuple[str, ...] | None


def new_verifier() -> str:
    """A PKCE code verifier: 64 characters from a CSPRNG (RFC 7636 allows 43-128)."""
    return secrets.token_urlsafe(48)


def new_private_jwk() -> dict[str, Any]:
    """An RSA key for `private_key_jwt`, with a key id, as a private JWK dict."""
    key = RSAKey.generate_key(2048, private=True)
    doc: dict[str, Any] = dict(key.as_dict(private=True))
    doc.update({"kid": key.thumbprint(), "alg": "RS256", "use": "sig"})
    return doc


def public_jwk(private: dict[str, Any]) -> dict[str, Any]:
    key = RSAKey.import_key(private)
    doc: dict[str, Any] = dict(key.as_dict(private=False))
    doc.update({"kid": private["kid"], "alg": private.get("alg", "RS256"), "use": "sig"})
    return doc


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), bounded."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, min((when - now).total_seconds(), MAX_RETRY_AFTER))


def well_known_urls(issuer: str) -> list[str]:
    """RFC 8414 location first (well-known inserted before the path), then OIDC discovery."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    rfc8414 = urlunsplit(
        (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")
    )
    oidc = issuer.rstrip("/") + "/.well-known/openid-configuration"
    return [rfc8414, oidc]


class OAuthClient:
    """Stateless protocol operations over one shared `httpx.Client`."""

    def __init__(self, http: httpx.Client, clock: Clock) -> None:
        self._http = http
        self._clock = clock

    # --- discovery and registration -------------------------------------------------------

    def discover(self, issuer: str) -> dict[str, Any]:
        """Fetch and check the AS metadata (RFC 8414, falling back to OIDC discovery)."""
        last_error = "no metadata document found"
        for url in well_known_urls(issuer):
            try:
                response = self._http.get(url, headers={"Accept": "application/json"})
            except httpx.HTTPError as exc:
                raise ProviderUnavailable(f"cannot reach {url}: {type(exc).__name__}") from exc
            if response.status_code == 404:
                continue
            if response.status_code != 200:
                last_error = f"{url} answered {response.status_code}"
                continue
            try:
                doc = response.json()
            except ValueError:
                last_error = f"{url} did not answer JSON"
                continue
            check_metadata(doc, issuer)
            return dict(doc)
        raise ProviderError(f"metadata discovery failed for {issuer}: {last_error}")

    def register(
        self,
        endpoints: Endpoints,
        *,
        client_name: str,
        redirect_uris: list[str],
        scopes: list[str],
        auth_method: str,
        grant_types: list[str] | None = None,
    ) -> tuple[ClientCredentials, dict[str, Any]]:
        """RFC 7591 dynamic registration as a confidential client; returns the credentials.

        `grant_types` defaults to authorization_code + refresh_token (an agent); a sign-in
        client asks for authorization_code alone, so the AS issues it no refresh token.
        """
        if not endpoints.registration_endpoint:
            raise ProviderError("the provider publishes no registration_endpoint (RFC 7591)")
        request: dict[str, Any] = {
            "client_name": client_name,
            "redirect_uris": redirect_uris,
            "grant_types": grant_types or ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "scope": " ".join(scopes),
            "token_endpoint_auth_method": auth_method,
        }
        private_jwk = None
        if auth_method == "private_key_jwt":
            private_jwk = new_private_jwk()
            request["jwks"] = {"keys": [public_jwk(private_jwk)]}
            request["token_endpoint_auth_signing_alg"] = "RS256"  # noqa: S105
        elif auth_method not in ("client_secret_basic", "client_secret_post"):
            raise ValueError(f"unsupported client authentication method {auth_method!r}")
        response = self._send("POST", endpoints.registration_endpoint, json=request)
        if response.status_code == 400 and oauth_error_code(response) == \
                "invalid_client_metadata" and "scope" in describe_error(response):
            # `scope` is optional (RFC 7591 2); some ASes accept only their own scope values
            # there and grant resource scopes per request instead.
            del request["scope"]
            response = self._send("POST", endpoints.registration_endpoint, json=request)
        if response.status_code not in (200, 201):
            raise ProviderError(f"registration refused: {describe_error(response)}")
        doc = response.json()
        if doc.get("token_endpoint_auth_method", auth_method) != auth_method:
            raise ProviderError(
                f"the AS registered {doc.get('token_endpoint_auth_method')!r}, not {auth_method!r}"
            )
        credentials = ClientCredentials(
            client_id=str(doc["client_id"]),
            auth_method=auth_method,
            secret=doc.get("client_secret"),
            private_jwk=private_jwk,
            registration_access_token=doc.get("registration_access_token"),
        )
        public = {k: v for k, v in doc.items() if k not in ("client_secret",
                                                               "registration_access_token")}
        return credentials, public

    def update_registration(
        self, registration_client_uri: str, registration_access_token: str,
        metadata: dict[str, Any],
    ) -> dict[str, Any]:
        """RFC 7592 client update (PUT the full metadata); returns the AS's new client info.

        The answer may carry a rotated `registration_access_token`: the caller must store it.
        """
        response = self._send(
            "PUT", registration_client_uri, json=metadata,
            headers={"Authorization": f"Bearer {registration_access_token}",
                     "Accept": "application/json"},
        )
        if response.status_code >= 500 or response.status_code == 429:
            raise ProviderUnavailable(
                f"registration update answered {response.status_code}",
                retry_after=parse_retry_after(response.headers.get("Retry-After"),
                                              self._clock.now()),
            )
        if response.status_code != 200:
            raise ProviderError(f"registration update refused: {describe_error(response)}")
        try:
            doc = response.json()
        except ValueError:
            raise ProviderError("registration update answered without JSON") from None
        if not isinstance(doc, dict):
            raise ProviderError("registration update answered without a JSON object")
        return doc

    # --- authorisation code + PKCE --------------------------------------------------------

    def authorization_url(
        self,
        endpoints: Endpoints,
        *,
        client_id: str,
        redirect_uri: str,
        scopes: list[str],
        state: str,
        verifier: str,
        nonce: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> str:
        params: dict[str, str] = {
            "code_challenge": create_s256_code_challenge(verifier),
            "code_challenge_method": "S256",
        }
        if nonce:
            params["nonce"] = nonce
        params.update(extra or {})
        url: str = prepare_grant_uri(
            endpoints.authorization_endpoint,
            client_id=client_id,
            response_type="code",
            redirect_uri=redirect_uri,
            scope=" ".join(scopes),
            state=state,
            **params,
        )
        return url

    def exchange_code(
        self,
        endpoints: Endpoints,
        credentials: ClientCredentials,
        *,
        code: str,
        verifier: str,
        redirect_uri: str,
    ) -> CodeExchange:
        doc = self._token_request(
            endpoints,
            credentials,
            grant_type="authorization_code",
            code=code,
            code_verifier=verifier,
            redirect_uri=redirect_uri,
        )
        tokens = TokenSet.from_response(doc, self._clock.now())
        scope = doc.get("scope")
        return CodeExchange(
            tokens=tokens,
            id_token=doc.get("id_token"),
            granted_scopes=tuple(str(scope).split()) if scope is not None else None,
        )

    def refresh(
        self, endpoints: Endpoints, credentials: ClientCredentials, refresh_token: str,
        *, timeout: float | None = None,
    ) -> TokenSet:
        """Spend `refresh_token`; if the AS sends no new one (no rotation), keep it."""
        doc = self._token_request(
            endpoints, credentials, grant_type="refresh_token", refresh_token=refresh_token,
            timeout=timeout,
        )
        return TokenSet.from_response(doc, self._clock.now(),
                                      previous_refresh_token=refresh_token)

    def revoke(
        self, endpoints: Endpoints, credentials: ClientCredentials, token: str, hint: str
    ) -> None:
        """RFC 7009. 200 (also for an already-invalid token) is success; retryable otherwise."""
        if not endpoints.revocation_endpoint:
            raise ProviderError("the provider publishes no revocation_endpoint (RFC 7009)")
        body = prepare_token_request("", token=token, token_type_hint=hint).removeprefix(
            "grant_type=&"
        )
        response = self._client_authenticated_post(
            endpoints.revocation_endpoint, endpoints, credentials, body
        )
        if response.status_code == 200:
            return
        raise_for_token_error(response, self._clock.now())
        raise ProviderError(f"revocation answered {response.status_code}")

    # --- identity -------------------------------------------------------------------------

    def validate_id_token(
        self, endpoints: Endpoints, id_token: str, *, client_id: str, nonce: str | None
    ) -> dict[str, Any]:
        """Check signature (JWKS), iss, aud, exp, iat and nonce; return the claims."""
        if not endpoints.jwks_uri:
            raise ProviderError("the provider publishes no jwks_uri to check ID tokens with")
        response = self._send("GET", endpoints.jwks_uri)
        if response.status_code != 200:
            raise ProviderUnavailable(f"jwks_uri answered {response.status_code}")
        try:
            keys = KeySet.import_key_set(response.json())
            token = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
            claims = dict(token.claims)
            registry = jwt.JWTClaimsRegistry(
                now=int(self._clock.now().timestamp()),
                leeway=60,
                iss={"essential": True, "value": endpoints.issuer},
                aud={"essential": True, "value": client_id},
                sub={"essential": True},
                exp={"essential": True},
                iat={"essential": True},
            )
            registry.validate(claims)
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise ProviderError(f"ID token rejected: {type(exc).__name__}: {exc}") from None
        if nonce is not None and claims.get("nonce") != nonce:
            raise ProviderError("ID token rejected: nonce does not match this request")
        azp = claims.get("azp")
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and azp != client_id:
            raise ProviderError("ID token rejected: several audiences and azp is not ours")
        return dict(claims)

    def userinfo(self, endpoints: Endpoints, access_token: str) -> dict[str, Any]:
        if not endpoints.userinfo_endpoint:
            raise ProviderError("the provider publishes no userinfo_endpoint")
        response = self._send(
            "GET", endpoints.userinfo_endpoint,
            headers={"Authorization": f"Bearer {access_token}"},
        )
        if response.status_code != 200:
            raise_for_token_error(response, self._clock.now())
            raise ProviderError(f"userinfo answered {response.status_code}")
        return dict(response.json())

    # --- plumbing -------------------------------------------------------------------------

    def _token_request(
        self, endpoints: Endpoints, credentials: ClientCredentials, *,
        timeout: float | None = None, **params: str,
    ) -> dict[str, Any]:
        grant_type = params.pop("grant_type")
        body = prepare_token_request(grant_type, **params)
        response = self._client_authenticated_post(
            endpoints.token_endpoint, endpoints, credentials, body, timeout=timeout
        )
        raise_for_token_error(response, self._clock.now())
        try:
            doc = response.json()
        except ValueError:
            raise ProviderUnavailable("token endpoint answered 200 without JSON") from None
        if not isinstance(doc, dict) or "access_token" not in doc:
            raise ProviderError("token endpoint answered without an access_token")
        if str(doc.get("token_type", "bearer")).lower() != "bearer":
            raise ProviderError(f"unsupported token_type {doc.get('token_type')!r}")
        return doc

    def _client_authenticated_post(
        self, url: str, endpoints: Endpoints, credentials: ClientCredentials, body: str,
        *, timeout: float | None = None,
    ) -> httpx.Response:
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Accept": "application/json"}
        auth = client_auth(credentials, endpoints)
        url, headers, body = auth.prepare("POST", url, headers, body)
        return self._send("POST", url, headers=headers, content=body.encode(), timeout=timeout)

    def _send(self, method: str, url: str, *, timeout: float | None = None,
              **kwargs: Any) -> httpx.Response:
        try:
            if timeout is not None:
                return self._http.request(method, url, timeout=timeout, **kwargs)
            return self._http.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ProviderUnavailable(
                f"{urlsplit(url).netloc} unreachable ({type(exc).__name__})"
            ) from exc
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(f"{urlsplit(url).netloc} timed out",
                                      unanswered=True) from exc
        except httpx.TransportError as exc:
            raise ProviderUnavailable(
                f"{urlsplit(url).netloc} dropped the connection ({type(exc).__name__})",
                unanswered=True,
            ) from exc


def client_auth(credentials: ClientCredentials, endpoints: Endpoints) -> ClientAuth:
    """Authlib's client authentication for `credentials` (secret or `private_key_jwt`)."""
    if credentials.auth_method == "private_key_jwt":
        if credentials.private_jwk is None:
            raise AgentMisconfigured("private_key_jwt client has no private key")
        key = RSAKey.import_key(credentials.private_jwk)
        # aud is the token endpoint (RFC 7523 section 3); a fresh jti and exp per request
        kid = str(credentials.private_jwk.get("kid", ""))
        signer = PrivateKeyJWT(endpoints.token_endpoint, headers={"kid": kid})
        return ClientAuth(credentials.client_id, key, signer)
    if credentials.auth_method in ("client_secret_basic", "client_secret_post"):
        return ClientAuth(credentials.client_id, credentials.secret or "",
                          credentials.auth_method)
    if credentials.auth_method == "none":
        return ClientAuth(credentials.client_id, None, "none")
    raise AgentMisconfigured(f"unknown client authentication {credentials.auth_method!r}")


def describe_error(response: httpx.Response) -> str:
    """`error: description` from an OAuth error body, or the status; never echoes secrets."""
    try:
        doc = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(doc, dict) and "error" in doc:
        error = str(doc["error"])[:100]
        description = str(doc.get("error_description") or "")[:200]
        return f"{error}: {description}" if description else error
    return f"HTTP {response.status_code}"


def oauth_error_code(response: httpx.Response) -> str | None:
    try:
        doc = response.json()
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return None


def raise_for_token_error(response: httpx.Response, now: dt.datetime) -> None:
    """Classify a non-200 answer from a token-ish endpoint into our error tree."""
    if response.status_code == 200:
        return
    code = oauth_error_code(response)
    retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
    if response.status_code >= 500 or response.status_code == 429 or (
        code in RETRYABLE_OAUTH_ERRORS
    ):
        raise ProviderUnavailable(
            f"authorization server unavailable: {describe_error(response)}",
            retry_after=retry_after,
        )
    if code == "invalid_grant":
        raise ReauthRequired(f"the grant is no longer valid: {describe_error(response)}")
    if code in CLIENT_ERRORS or response.status_code == 401:
        raise AgentMisconfigured(f"the AS refused the agent's client: {describe_error(response)}")
    raise ProviderError(f"the AS refused the request: {describe_error(response)}")


def check_metadata(doc: Any, issuer: str) -> None:
    """Refuse metadata that is not for `issuer`, lacks a token endpoint, or lacks S256."""
    if not isinstance(doc, dict):
        raise ProviderError("metadata is not a JSON object")
    if doc.get("issuer") != issuer:
        raise ProviderError(
            f"metadata issuer {doc.get('issuer')!r} does not match {issuer!r} (RFC 8414 3.3)"
        )
    for required in ("authorization_endpoint", "token_endpoint"):
        if not doc.get(required):
            raise ProviderError(f"the provider publishes no {required}")
    methods = doc.get("code_challenge_methods_supported")
    if methods is not None and "S256" not in methods:
        raise ProviderError("the provider does not support PKCE S256 "
                            "(code_challenge_methods_supported lacks it)")


def parse_form(body: str) -> dict[str, str]:
    return dict(url_decode(body))
