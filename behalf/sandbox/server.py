"""Authlib's authorisation server, wired to the sandbox store, and its Starlette adapter.

Authlib does the protocol (RFC 6749 code and refresh grants, RFC 7636 PKCE, RFC 7009 revocation,
RFC 7662 introspection, RFC 7591 registration, RFC 7523 `private_key_jwt`, RFC 9207 `iss`,
OpenID Connect id_tokens, RFC 6750 bearer checks); this module answers the questions Authlib
leaves to its host (where is this code, is this jti new, ...) and the policy choices that make the
sandbox strict enough to catch a client's mistakes:

- PKCE is mandatory and S256 only (`plain` and a missing challenge are refused);
- every refresh rotates the refresh token, and presenting a rotated one revokes the whole grant;
- revoking a refresh token revokes its grant; a code used twice revokes the grant it made.

Authlib is synchronous and reads a request's body as it pleases, so each HTTP request is read in
full first (`read_request`) and then handed over as an `HttpRequest`; the apps call into this
module from a worker thread. Authlib ships no type hints: its classes are `Any` to mypy, hence the
`type: ignore[misc]` on each subclass.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    InvalidGrantError,
    InvalidRequestError,
    JsonPayload,
    JsonRequest,
    MissingAuthorizationError,
    OAuth2Error,
    OAuth2Payload,
    OAuth2Request,
    ResourceProtector,
    UnsupportedTokenTypeError,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant, RefreshTokenGrant
from authlib.oauth2.rfc6750 import (
    BearerTokenGenerator,
    BearerTokenValidator,
    InsufficientScopeError,
    InvalidTokenError,
)
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7591 import (
    ClientRegistrationEndpoint,
    InvalidClientMetadataError,
    InvalidRedirectURIError,
)
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oauth2.rfc9207 import IssuerParameter
from authlib.oidc.core import OpenIDCode, UserInfo
from joserfc.jwk import KeySet, RSAKey
from starlette.requests import Request
from starlette.responses import Response

from behalf.sandbox.store import (
    AuthorizationCode,
    Client,
    Clock,
    ReusedRefreshToken,
    Store,
    Token,
    digest,
)
from behalf.sandbox.users import DEMO_USERS, DemoUser

SCOPES = ("openid", "profile", "email", "reports:read", "reports:write", "calendar:read")
AUTH_METHODS = ("private_key_jwt", "client_secret_basic", "client_secret_post")
ASSERTION_ALGS = ("RS256", "ES256")
ID_TOKEN_TTL_SECONDS = 3600
SIGNING_ALG = "RS256"

Outcome = tuple[int, Any, list[tuple[str, str]]]


# --- the Starlette side of the adapter ------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP request read in full, so Authlib's synchronous code can look at it at leisure.

    `url` is rebuilt on the configured issuer (not the Host header), so what Authlib checks and
    signs is what the metadata advertises.
    """

    method: str
    url: str
    headers: Mapping[str, str]
    query: tuple[tuple[str, str], ...] = ()
    form: tuple[tuple[str, str], ...] = ()
    json: Any = None

    def query_value(self, name: str) -> str | None:
        return next((value for key, value in self.query if key == name), None)


async def read_request(
    request: Request, base_url: str, *, body: Literal["form", "json", "none"]
) -> HttpRequest:
    query = tuple(parse_qsl(request.url.query, keep_blank_values=True))
    url = base_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    form: tuple[tuple[str, str], ...] = ()
    payload: Any = None
    if body != "none":
        raw = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if body == "form" and content_type == "application/x-www-form-urlencoded":
            form = tuple(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        elif body == "json":
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = None
    return HttpRequest(
        method=request.method,
        url=url,
        headers=request.headers,
        query=query,
        form=form,
        json=payload,
    )


class AuthlibResponse(Response):
    """A Starlette response with the `location` attribute Authlib's RFC 9207 hook rewrites."""

    @property
    def location(self) -> str | None:
        return self.headers.get("location")

    @location.setter
    def location(self, value: str) -> None:
        self.headers["location"] = value


def to_response(status: int, body: Any, headers: Sequence[tuple[str, str]]) -> AuthlibResponse:
    content = json.dumps(body) if isinstance(body, dict) else str(body or "")
    return AuthlibResponse(content, status_code=status, headers=dict(headers))


class _Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in items:
            self._datalist[key].append(value)
        self._data = {key: values[0] for key, values in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class SandboxOAuth2Request(OAuth2Request):  # type: ignore[misc]
    """What Authlib's grants and endpoints read, plus what the consent page decided."""

    def __init__(self, http: HttpRequest) -> None:
        super().__init__(method=http.method, uri=http.url, headers=http.headers)
        self.payload = _Payload(http.query + http.form)
        self._args = dict(http.query)
        self._form = dict(http.form)
        self.granted_scope: str | None = None  # the ticked subset, set by the consent page
        self.auth_time: int | None = None  # when the user signed in, set by the consent page

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _JsonPayload(JsonPayload):  # type: ignore[misc]
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, Any]:
        return self._data


class SandboxJsonRequest(JsonRequest):  # type: ignore[misc]
    def __init__(self, http: HttpRequest) -> None:
        super().__init__(http.method, http.url, http.headers)
        self.payload = _JsonPayload(http.json if isinstance(http.json, dict) else {})


# --- grants and extensions ------------------------------------------------------------------------


class _CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = list(AUTH_METHODS)

    def save_authorization_code(self, code: str, request: SandboxOAuth2Request) -> None:
        server: SandboxAuthorizationServer = self.server
        user: DemoUser = request.user
        data = request.payload.data
        server.store.add_code(
            code,
            client_id=request.client.client_id,
            sub=user.sub,
            # Empty when the request named none: then the token request need not name one either.
            redirect_uri=data.get("redirect_uri", ""),
            scope=request.granted_scope or request.scope,
            nonce=data.get("nonce"),
            code_challenge=data["code_challenge"],
            code_challenge_method=data["code_challenge_method"],
            auth_time=request.auth_time or int(server.clock()),
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        server: SandboxAuthorizationServer = self.server
        return server.store.code(code, client.client_id)

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        """Nothing to do: storing the tokens marked the code used (a reuse revokes the grant)."""

    def authenticate_user(self, authorization_code: AuthorizationCode) -> DemoUser | None:
        return DEMO_USERS.get(authorization_code.sub)


class _RefreshGrant(RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = list(AUTH_METHODS)
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotate on every use

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        server: SandboxAuthorizationServer = self.server
        return server.store.refresh_token(refresh_token)

    def authenticate_user(self, refresh_token: Token) -> DemoUser | None:
        return refresh_token.user

    def revoke_old_credential(self, refresh_token: Token) -> None:
        """Nothing to do: storing the new tokens rotated the old one away (compare-and-set)."""


class _S256Only(CodeChallenge):  # type: ignore[misc]
    """PKCE required, S256 only: a missing challenge and `plain` are refused at /authorize."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: _CodeGrant, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send 'code_challenge' (S256).")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("Only 'code_challenge_method=S256' is supported.")
        super().validate_code_challenge(grant, redirect_uri)


class _OpenIDCode(OpenIDCode):  # type: ignore[misc]
    def __init__(self, server: SandboxAuthorizationServer) -> None:
        super().__init__(require_nonce=False)
        self._server = server

    def resolve_client_private_key(self, client: Client) -> RSAKey:
        return self._server.signing_key

    def get_client_algorithm(self, client: Client) -> str:
        return SIGNING_ALG

    def get_encode_header(self, client: Client) -> dict[str, str]:
        return {"alg": SIGNING_ALG, "kid": self._server.signing_key.kid or ""}

    def get_client_claims(self, client: Client) -> dict[str, Any]:
        now = int(self._server.clock())
        return {
            "iss": self._server.issuer,
            "aud": [client.client_id],
            "iat": now,
            "exp": now + ID_TOKEN_TTL_SECONDS,
        }

    def exists_nonce(self, nonce: str, request: SandboxOAuth2Request) -> bool:
        return self._server.store.nonce_used(request.payload.client_id, nonce)

    def generate_user_info(self, user: DemoUser, scope: str) -> UserInfo:
        return user_info(user, scope)


class _Issuer(IssuerParameter):  # type: ignore[misc]
    def __init__(self, issuer: str) -> None:
        self._issuer = issuer

    def get_issuer(self) -> str:
        return self._issuer


class _PrivateKeyJWT(JWTBearerClientAssertion):  # type: ignore[misc]
    """RFC 7523 client authentication with the keys the client registered (`jwks`).

    The assertion's `exp`/`iat` are checked against the wall clock, not the sandbox clock:
    clients sign them with the wall clock, and tests that move the sandbox clock still refresh.
    """

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, store: Store, audiences: list[str]) -> None:
        super().__init__(validate_jti=True)
        self._store = store
        self._audiences = audiences

    def get_audiences(self) -> list[str]:
        return self._audiences

    def validate_jti(self, claims: Mapping[str, Any], jti: str) -> bool:
        return self._store.use_jti(str(claims["sub"]), str(jti), float(claims.get("exp", 0)))

    def resolve_client_public_key(self, client: Client) -> KeySet:
        return KeySet.import_key_set(client.metadata.get("jwks", {"keys": []}))


class _Revocation(RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = list(AUTH_METHODS)

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return self._store.token(token_string)

    def revoke_token(self, token: Token, request: SandboxOAuth2Request) -> None:
        self._store.revoke(token)


class _Introspection(IntrospectionEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = list(AUTH_METHODS)

    def __init__(self, store: Store, issuer: str) -> None:
        super().__init__()
        self._store = store
        self._issuer = issuer

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return self._store.token(token_string)

    def check_permission(self, token: Token, client: Client, request: SandboxOAuth2Request) -> bool:
        return token.client_id == client.client_id  # a client may introspect its own tokens

    def introspect_token(self, token: Token) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "active": True,
            "client_id": token.client_id,
            "token_type": "Bearer" if token.kind == "access" else "refresh_token",
            "scope": token.scope,
            "sub": token.sub,
            "username": token.sub,
            "iss": self._issuer,
            "iat": int(token.issued_at),
        }
        if token.expires_at is not None:
            claims["exp"] = int(token.expires_at)
        return claims


class _Registration(ClientRegistrationEndpoint):  # type: ignore[misc]
    """Open RFC 7591 registration: anyone may register a confidential client.

    Defaults when omitted: grant types code + refresh, response type code, every scope.
    `private_key_jwt` clients must send their public keys inline (`jwks`); they get no secret.
    """

    def __init__(self, server: SandboxAuthorizationServer) -> None:
        super().__init__(server)
        self._sandbox = server

    def authenticate_token(self, request: SandboxJsonRequest) -> bool:
        return True  # open registration

    def get_server_metadata(self) -> dict[str, Any]:
        return self._sandbox.metadata()

    def extract_client_metadata(self, request: SandboxJsonRequest) -> dict[str, Any]:
        metadata: dict[str, Any] = super().extract_client_metadata(request)
        redirect_uris = metadata.get("redirect_uris")
        if not isinstance(redirect_uris, list) or not redirect_uris:
            raise InvalidRedirectURIError("'redirect_uris' is required (code flow only).")
        if metadata["token_endpoint_auth_method"] == "private_key_jwt":  # noqa: S105
            if "jwks_uri" in metadata:
                raise InvalidClientMetadataError("Send 'jwks' inline; 'jwks_uri' is not supported.")
            if not metadata.get("jwks", {}).get("keys"):
                raise InvalidClientMetadataError(
                    "'private_key_jwt' needs the public keys in 'jwks'."
                )
        metadata.setdefault("grant_types", ["authorization_code", "refresh_token"])
        metadata.setdefault("response_types", ["code"])
        metadata.setdefault("scope", " ".join(SCOPES))
        return metadata

    def generate_client_info(self, request: SandboxJsonRequest) -> dict[str, Any]:
        info: dict[str, Any] = super().generate_client_info(request)
        info["client_id_issued_at"] = int(self._sandbox.clock())
        method = request.payload.data.get("token_endpoint_auth_method", "client_secret_basic")
        if method == "private_key_jwt":
            del info["client_secret"], info["client_secret_expires_at"]
        return info

    def save_client(
        self,
        client_info: Mapping[str, Any],
        client_metadata: Mapping[str, Any],
        request: SandboxJsonRequest,
    ) -> Client:
        return self._sandbox.store.add_client(
            client_info["client_id"],
            client_info.get("client_secret"),
            client_metadata,
            issued_at=client_info["client_id_issued_at"],
        )


class _BearerValidator(BearerTokenValidator):  # type: ignore[misc]
    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store

    def authenticate_token(self, token_string: str) -> Token | None:
        token = self._store.token(token_string)
        return token if token is not None and token.kind == "access" else None


@dataclass(frozen=True)
class BearerCheck:
    """What a resource server learnt from an `Authorization: Bearer` header."""

    token: Token | None  # the token presented, when it exists (also when it is refused)
    token_sha256: str | None  # digest of what was presented, for the call log
    error: Outcome | None = field(default=None)


# --- the server ---------------------------------------------------------------------------------


def user_info(user: DemoUser, scope: str) -> UserInfo:
    claims = UserInfo(
        sub=user.sub,
        name=user.name,
        preferred_username=user.sub,
        email=user.email,
        email_verified=True,
    )
    return claims.filter(scope)


def _token_generator(prefix: str) -> Callable[..., str]:
    def generate(**_: Any) -> str:
        return prefix + secrets.token_urlsafe(32)

    return generate


class SandboxAuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        issuer: str,
        store: Store,
        clock: Clock,
        signing_key: RSAKey,
        access_token_ttl: int,
    ) -> None:
        super().__init__(scopes_supported=list(SCOPES))
        self.issuer = issuer
        self.store = store
        self.clock = clock
        self.signing_key = signing_key
        # One token request at a time: a code or a refresh token raced by two requests must
        # not yield two token families (the store's compare-and-set is the second line).
        self._token_lock = threading.Lock()
        self.register_token_generator(
            "default",
            BearerTokenGenerator(
                _token_generator("sbx_at_"), _token_generator("sbx_rt_"), access_token_ttl
            ),
        )
        audiences = [
            issuer,
            self.endpoint("token"),
            self.endpoint("revocation"),
            self.endpoint("introspection"),
        ]
        self.register_client_auth_method("private_key_jwt", _PrivateKeyJWT(store, audiences))
        self.register_grant(_CodeGrant, [_S256Only(required=True), _OpenIDCode(self)])
        self.register_grant(_RefreshGrant)
        self.register_endpoint(_Revocation(store))
        self.register_endpoint(_Introspection(store, issuer))
        self.register_endpoint(_Registration(self))
        self.issuer_parameter = _Issuer(issuer)
        self.register_extension(self.issuer_parameter)
        self._protector = ResourceProtector()
        self._protector.register_token_validator(_BearerValidator(store))

    # what Authlib asks of its host

    def query_client(self, client_id: str) -> Client | None:
        return self.store.client(client_id)

    def save_token(self, token: Mapping[str, Any], request: SandboxOAuth2Request) -> None:
        user: DemoUser = request.user
        code = request.authorization_code
        rotated = request.refresh_token
        try:
            self.store.issue_tokens(
                client_id=request.client.client_id,
                sub=user.sub,
                scope=str(token.get("scope", "")),
                access_token=token["access_token"],
                refresh_token=token.get("refresh_token"),
                expires_in=int(token["expires_in"]),
                code=code if isinstance(code, AuthorizationCode) else None,
                rotated=rotated if isinstance(rotated, Token) else None,
            )
        except ReusedRefreshToken as exc:
            raise InvalidGrantError("Refresh token reused: the grant is revoked.") from exc

    def create_oauth2_request(self, request: HttpRequest | OAuth2Request) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        return SandboxOAuth2Request(request)

    def create_json_request(self, request: HttpRequest) -> SandboxJsonRequest:
        return SandboxJsonRequest(request)

    def handle_response(
        self, status_code: int, payload: Any, headers: Sequence[tuple[str, str]]
    ) -> AuthlibResponse:
        return to_response(status_code, payload, headers)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """No listeners: the sandbox has nothing to notify."""

    def create_token_response(self, request: Any = None) -> AuthlibResponse:
        with self._token_lock:
            response: AuthlibResponse = super().create_token_response(request)
            return response

    # what the apps ask of the server

    def endpoint(self, name: str) -> str:
        paths = {
            "authorization": "/authorize",
            "token": "/token",
            "revocation": "/revoke",
            "introspection": "/introspect",
            "registration": "/register",
            "userinfo": "/userinfo",
            "jwks": "/jwks",
        }
        return self.issuer + paths[name]

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 / OpenID Connect Discovery metadata (one document serves both)."""
        methods = list(AUTH_METHODS)
        algs = list(ASSERTION_ALGS)
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.endpoint("authorization"),
            "token_endpoint": self.endpoint("token"),
            "revocation_endpoint": self.endpoint("revocation"),
            "introspection_endpoint": self.endpoint("introspection"),
            "registration_endpoint": self.endpoint("registration"),
            "userinfo_endpoint": self.endpoint("userinfo"),
            "jwks_uri": self.endpoint("jwks"),
            "scopes_supported": list(SCOPES),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": methods,
            "token_endpoint_auth_signing_alg_values_supported": algs,
            "revocation_endpoint_auth_methods_supported": methods,
            "revocation_endpoint_auth_signing_alg_values_supported": algs,
            "introspection_endpoint_auth_methods_supported": methods,
            "introspection_endpoint_auth_signing_alg_values_supported": algs,
            "authorization_response_iss_parameter_supported": True,
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [SIGNING_ALG],
            "prompt_values_supported": ["none", "login", "consent"],
            "claims_supported": [
                "sub",
                "iss",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "nonce",
                "at_hash",
                "name",
                "preferred_username",
                "email",
                "email_verified",
            ],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.signing_key.as_dict(private=False)]}

    def authorization_error(self, error: OAuth2Error) -> AuthlibResponse:
        """Authlib's rendering of an authorisation-endpoint error, with `iss` when it redirects."""
        response = self.handle_response(*error(None))
        if response.location:
            self.issuer_parameter.add_issuer_parameter(self, response)
        return response

    def check_bearer(self, headers: Mapping[str, str], scopes: Sequence[str]) -> BearerCheck:
        """RFC 6750 checks of a request to a protected resource, by Authlib's bearer validator."""
        request = _HeadersOnly(headers)
        try:
            validator, token_string = self._protector.parse_request_authorization(request)
        except (MissingAuthorizationError, UnsupportedTokenTypeError):
            # No (bearer) credentials: a bare challenge, no error code (RFC 6750 §3.1).
            body = {"error": "invalid_request", "error_description": "Bearer token required."}
            return BearerCheck(None, None, (401, body, [("WWW-Authenticate", "Bearer")]))
        token: Token | None = validator.authenticate_token(token_string)
        presented = digest(token_string)
        try:
            validator.validate_token(token, list(scopes), request)
        except InvalidTokenError as error:
            return BearerCheck(token, presented, error())
        except InsufficientScopeError as error:
            status, body, error_headers = error()
            needed = " ".join(scopes)
            challenge = f'Bearer error="insufficient_scope", scope="{needed}"'
            return BearerCheck(
                token, presented, (status, body, [*error_headers, ("WWW-Authenticate", challenge)])
            )
        return BearerCheck(token, presented)


@dataclass(frozen=True)
class _HeadersOnly:
    headers: Mapping[str, str]


def query_without(http: HttpRequest, *names: str) -> str:
    return urlencode([(key, value) for key, value in http.query if key not in names])
