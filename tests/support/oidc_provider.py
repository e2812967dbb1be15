"""A real, independent OAuth 2 / OIDC authorisation server and test API for integration tests.

`tests/as_server/server.mjs` runs panva's `oidc-provider` (which we did not write, so our client
is checked against someone else's reading of the RFCs) plus a small resource server, in one Node
process on two 127.0.0.1 origins. This module installs it when needed (`npm ci`), starts it on
free ports, wraps its test-only `/_test/` endpoints, and drives its login and consent pages with
plain httpx (`login_and_consent`) so most tests need no browser.

Errors: `OidcProviderUnavailable` (Node, npm or the install is missing: the fixtures turn it into
`tests.support.services.unavailable`), `OidcProviderError` (the server itself misbehaved), and
`InteractionError` (the AS showed an error or an unexpected page while logging in/consenting).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self
from urllib.parse import urljoin, urlsplit

import httpx
from authlib.oauth2.rfc7523 import private_key_jwt_sign
from cryptography.hazmat.primitives.asymmetric import rsa

AS_SERVER_DIR = Path(__file__).resolve().parents[1] / "as_server"
DEFAULT_API_SCOPES = ("reports:read", "reports:write", "calendar:read")
PASSWORD = "pass"  # the only password the test AS accepts, for any username

AsEndpoint = Literal[
    "token",
    "revocation",
    "introspection",
    "registration",
    "userinfo",
    "authorization",
    "jwks",
    "discovery",
]
FaultMode = Literal["status", "hang", "drop", "lose_response"]
ClientAuth = httpx.Auth | Mapping[str, str]
"""How a client authenticates to the token/revocation/introspection endpoints: an `httpx.Auth`
(e.g. `httpx.BasicAuth(client_id, secret)` for client_secret_basic) or extra form fields
(`client_id` + `client_secret`, or the `private_key_jwt_fields` of a client assertion)."""


class OidcProviderUnavailable(RuntimeError):
    """Node, npm or the npm install is missing: a skip locally, a failure in CI."""


class OidcProviderError(RuntimeError):
    """The test AS failed to start or answered an admin call badly."""


class InteractionError(RuntimeError):
    """Logging in or consenting did not end in a redirect to the client."""


@dataclass(frozen=True)
class OidcProviderSettings:
    """What a test may vary between AS instances (each instance is its own process)."""

    access_token_ttl: int = 300
    refresh_token_ttl: int = 14 * 24 * 3600
    api_scopes: tuple[str, ...] = DEFAULT_API_SCOPES

    def environment(self) -> dict[str, str]:
        return {
            "AS_ACCESS_TOKEN_TTL": str(self.access_token_ttl),
            "AS_REFRESH_TOKEN_TTL": str(self.refresh_token_ttl),
            "AS_API_SCOPES": " ".join(self.api_scopes),
        }


# --------------------------------------------------------------------------------------------
# Installation


def _run(command: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # the callers check returncode and explain failures
        command, cwd=AS_SERVER_DIR, capture_output=True, text=True, timeout=timeout
    )


def node_executable() -> str:
    """The `node` binary, if it is new enough for oidc-provider 9 (Node >= 20.19)."""
    node = shutil.which("node")
    if node is None:
        raise OidcProviderUnavailable("node is not installed (needed for the test AS)")
    version = _run([node, "--version"], timeout=30).stdout.strip().lstrip("v")
    major, minor, *_ = (int(part) for part in version.split("."))
    if (major, minor) < (20, 19):
        raise OidcProviderUnavailable(f"node {version} is too old for the test AS (need 20.19+)")
    return node


def ensure_installed(*, timeout: float = 300.0) -> None:
    """Run `npm ci` in tests/as_server when node_modules is missing or older than the lock file.

    CI starts from a fresh clone, so the fixture installs by itself; a file lock keeps parallel
    pytest workers from installing over one another.
    """
    lock_file = AS_SERVER_DIR / "package-lock.json"
    marker = AS_SERVER_DIR / "node_modules" / ".package-lock.json"

    def installed() -> bool:
        return marker.exists() and marker.stat().st_mtime >= lock_file.stat().st_mtime

    if installed():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise OidcProviderUnavailable("npm is not installed (needed to install the test AS)")
    lock_path = Path(tempfile.gettempdir()) / f"behalf-as-server-{os.getuid()}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            return
        try:
            result = _run([npm, "ci", "--no-audit", "--no-fund"], timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise OidcProviderUnavailable(f"npm ci timed out after {timeout:.0f}s") from exc
        if result.returncode != 0:
            tail = (result.stderr or result.stdout)[-2000:]
            raise OidcProviderUnavailable(f"npm ci failed in {AS_SERVER_DIR}:\n{tail}")
        marker.touch()


# --------------------------------------------------------------------------------------------
# HTML forms (our own login/consent pages; see server.mjs)


@dataclass
class _Control:
    tag: str
    attrs: dict[str, str | None]

    def get(self, name: str) -> str | None:
        return self.attrs.get(name)

    def has(self, name: str) -> bool:
        return name in self.attrs


@dataclass
class _Form:
    action: str
    id: str | None
    controls: list[_Control] = field(default_factory=list)


class _PageParser(HTMLParser):
    """Collects forms with their inputs/buttons, and the text of elements that have an id."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []
        self.texts: dict[str, str] = {}
        self._open_ids: list[tuple[str, str]] = []  # (tag, id) of elements being read

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.forms.append(_Form(action=attributes.get("action") or "", id=attributes.get("id")))
        elif tag in ("input", "button") and self.forms:
            self.forms[-1].controls.append(_Control(tag, attributes))
        element_id = attributes.get("id")
        if element_id and tag not in ("input", "form"):
            self._open_ids.append((tag, element_id))
            self.texts[element_id] = ""

    def handle_endtag(self, tag: str) -> None:
        if self._open_ids and self._open_ids[-1][0] == tag:
            self._open_ids.pop()

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open_ids:
            self.texts[element_id] += data

    def form(self, form_id: str) -> _Form | None:
        return next((form for form in self.forms if form.id == form_id), None)


def _parse(html: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return parser


def _consent_fields(form: _Form, scopes: set[str] | None, deny: bool) -> dict[str, Any]:
    """What a browser would submit: the ticked scope boxes and the button pressed."""
    boxes = [c for c in form.controls if c.get("type") == "checkbox" and c.get("name") == "scope"]
    offered = {c.get("value") or "" for c in boxes}
    if scopes is not None and not scopes <= offered:
        raise InteractionError(f"consent page does not offer {sorted(scopes - offered)}")
    ticked = [
        box.get("value") or ""
        for box in boxes
        # openid is disabled (always granted), so a browser never submits it.
        if not box.has("disabled")
        and (box.has("checked") if scopes is None else box.get("value") in scopes)
    ]
    return {"decision": "deny" if deny else "allow", "scope": ticked}


# --------------------------------------------------------------------------------------------
# The server


def generate_client_key() -> tuple[dict[str, str], dict[str, str]]:
    """A fresh RSA key for a private_key_jwt client: (private JWK, public JWK), alg RS256.

    RSA because authlib's `PrivateKeyJWT` accepts a private JWK given as a plain dict only for
    RSA (EC needs a joserfc key object).
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.private_numbers()

    def b64(value: int) -> str:
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    public = {
        "kty": "RSA",
        "n": b64(numbers.public_numbers.n),
        "e": b64(numbers.public_numbers.e),
        "kid": uuid.uuid4().hex,
        "alg": "RS256",
        "use": "sig",
    }
    private = {
        **public,
        "d": b64(numbers.d),
        "p": b64(numbers.p),
        "q": b64(numbers.q),
        "dp": b64(numbers.dmp1),
        "dq": b64(numbers.dmq1),
        "qi": b64(numbers.iqmp),
    }
    return private, public


def private_key_jwt_fields(
    client_id: str, private_jwk: Mapping[str, str], audience: str
) -> dict[str, str]:
    """Form fields authenticating `client_id` with a fresh RFC 7523 client assertion."""
    alg = private_jwk.get("alg", "RS256")
    headers = {"kid": private_jwk["kid"]} if "kid" in private_jwk else None
    assertion = private_key_jwt_sign(
        dict(private_jwk), client_id=client_id, token_endpoint=audience, alg=alg, header=headers
    )
    return {
        "client_id": client_id,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion if isinstance(assertion, str) else assertion.decode(),
    }


def sha256_hex(token: str) -> str:
    """How the test API identifies a bearer token in its call log (never the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()


class OidcProvider:
    """A running test AS (`issuer`) and test API (`api_base`), with test-only controls.

    Start with `OidcProvider.start(settings)` (or the pytest fixtures); always `stop()`. The Node
    process also exits by itself when its stdin closes, i.e. when this Python process dies.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        log: IO[bytes],
        workdir: Path,
        issuer: str,
        api_base: str,
        settings: OidcProviderSettings,
    ) -> None:
        self._process = process
        self._log = log
        self._workdir = workdir
        self.issuer = issuer
        self.api_base = api_base
        self.settings = settings
        self._admin = httpx.Client(timeout=10.0, trust_env=False)
        self.metadata: dict[str, Any] = {}

    # ----- lifetime

    @classmethod
    def start(
        cls, settings: OidcProviderSettings | None = None, *, startup_timeout: float = 30.0
    ) -> OidcProvider:
        """Install if needed, start node on free ports, and wait until discovery answers."""
        settings = settings or OidcProviderSettings()
        node = node_executable()
        ensure_installed()
        workdir = Path(tempfile.mkdtemp(prefix="behalf-as-"))
        ready_file = workdir / "ready.json"
        env = {
            **os.environ,
            **settings.environment(),
            "AS_PORT": "0",
            "API_PORT": "0",
            "AS_READY_FILE": str(ready_file),
        }
        log = (workdir / "server.log").open("wb")
        process = subprocess.Popen(
            [node, "server.mjs"],
            cwd=AS_SERVER_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + startup_timeout
        try:
            while not ready_file.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise OidcProviderError(
                        "test AS did not start:\n" + _tail(workdir / "server.log")
                    )
                time.sleep(0.05)
            ready = json.loads(ready_file.read_text())
            provider = cls(process, log, workdir, ready["issuer"], ready["api_base"], settings)
        except BaseException:
            _terminate(process)
            log.close()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        try:
            provider.metadata = provider._wait_for_discovery(deadline)
        except BaseException:
            provider.stop()
            raise
        return provider

    def _wait_for_discovery(self, deadline: float) -> dict[str, Any]:
        url = f"{self.issuer}/.well-known/openid-configuration"
        while True:
            try:
                response = self._admin.get(url)
                if response.status_code == 200:
                    document: dict[str, Any] = response.json()
                    return document
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise OidcProviderError("test AS discovery never answered:\n" + self.log_text())
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the node process and remove its work directory (idempotent)."""
        _terminate(self._process)
        self._admin.close()
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        """The node process's output so far (oidc-provider warnings, errors it logged)."""
        return _tail(self._workdir / "server.log", limit=None)

    # ----- endpoints

    def endpoint(self, name: str) -> str:
        """A URL from the discovery document, e.g. `endpoint("token_endpoint")`."""
        value = self.metadata[name]
        assert isinstance(value, str)
        return value

    def register_client(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """RFC 7591 open registration; returns the client information response."""
        response = self._admin.post(self.endpoint("registration_endpoint"), json=dict(metadata))
        if response.status_code != 201:
            raise OidcProviderError(f"registration failed: {response.status_code} {response.text}")
        info: dict[str, Any] = response.json()
        return info

    def introspect(
        self, token: str, client_auth: ClientAuth, *, token_type_hint: str | None = None
    ) -> dict[str, Any]:
        """RFC 7662 introspection, authenticated as a registered client."""
        response = self._client_post("introspection_endpoint", token, client_auth, token_type_hint)
        if response.status_code != 200:
            raise OidcProviderError(f"introspection failed: {response.status_code} {response.text}")
        result: dict[str, Any] = response.json()
        return result

    def revoke_token(
        self, token: str, client_auth: ClientAuth, *, token_type_hint: str | None = None
    ) -> httpx.Response:
        """RFC 7009 revocation, authenticated as a registered client (200 even if unknown)."""
        return self._client_post("revocation_endpoint", token, client_auth, token_type_hint)

    def _client_post(
        self, endpoint: str, token: str, client_auth: ClientAuth, token_type_hint: str | None
    ) -> httpx.Response:
        data = {"token": token}
        if token_type_hint:
            data["token_type_hint"] = token_type_hint
        url = self.endpoint(endpoint)
        if isinstance(client_auth, httpx.Auth):
            return self._admin.post(url, data=data, auth=client_auth)
        return self._admin.post(url, data={**data, **client_auth})

    # ----- test-only controls on the AS origin

    def revoke_grants(self, sub: str, client_id: str | None = None) -> int:
        """Destroy the user's grants (and all their tokens) for a client, as if revoked at the AS.

        The next refresh gets `invalid_grant`; the API answers 401 to the access tokens.
        Returns how many grants were destroyed.
        """
        body: dict[str, str] = {"sub": sub}
        if client_id is not None:
            body["client_id"] = client_id
        count: int = self._as("POST", "/_test/revoke-grants", body)["revoked_grants"]
        return count

    def grants(
        self, *, sub: str | None = None, client_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Live grants (sub, client_id, granted OIDC and API scopes, rejected scopes)."""
        params = {k: v for k, v in (("sub", sub), ("client_id", client_id)) if v is not None}
        found: list[dict[str, Any]] = self._as("GET", "/_test/grants", params=params)["grants"]
        return found

    def token_info(self, token: str) -> dict[str, Any]:
        """What the AS store knows of a token, without client authentication.

        Keys: kind (AccessToken/RefreshToken/AuthorizationCode/None), active, expired, consumed,
        grant_exists, sub, client_id, scope, aud, exp, grant_id.
        """
        return self._as("POST", "/_test/token-info", {"token": token})

    def stats(self) -> dict[str, Any]:
        """Counts of token/revocation/introspection requests since the last reset.

        `{"token": {"total", "by_grant_type", "by_client_id": {cid: {grant_type: n}}},
        "revocation": {"total", "by_client_id": {cid: n}}, "introspection": {...},
        "requests": [{time, endpoint, grant_type, client_id, status, fault}]}`; faulted requests
        count too (a `lose_response` one also has `processed_status`, what the client missed).
        client_id is the one the request claimed, verified or not.
        """
        return self._as("GET", "/_test/stats")

    def issued(self) -> list[dict[str, str]]:
        """Every secret this AS issued or was shown since it started, revoked ones included:
        `{"kind", "value"}` where kind is a stored model (AccessToken, RefreshToken,
        AuthorizationCode, RegistrationAccessToken, ClientSecret, ...), `response:<field>` (a
        token or registration answer, e.g. the id_token) or `request:<field>` (code_verifier,
        client_assertion, a client secret a client presented)."""
        found: list[dict[str, str]] = self._as("GET", "/_test/issued")["issued"]
        return found

    def reset_stats(self) -> None:
        self._as("POST", "/_test/reset-stats", {})

    def set_fault(
        self,
        endpoint: AsEndpoint,
        *,
        mode: FaultMode = "status",
        count: int = 1,
        status: int = 503,
        retry_after: int | str | None = None,
        error: str | None = None,
        error_description: str | None = None,
        seconds: float = 30.0,
        then: Literal["drop", "process"] = "drop",
        grant_type: str | None = None,
    ) -> None:
        """Make the next `count` matching AS requests fail.

        Modes: `status` answers `status` (with `Retry-After` when given, and an OAuth error
        body `{"error": error}` when `error` is given, else plain text); `hang` waits `seconds`
        then drops the connection (or, with `then="process"`, answers normally); `drop` closes
        the connection at once; `lose_response` processes the request (a refresh token IS
        rotated, a revocation IS done) and then closes the connection without answering.
        `grant_type` limits a token-endpoint fault to that grant.
        """
        spec: dict[str, Any] = {
            "endpoint": endpoint,
            "mode": mode,
            "count": count,
            "status": status,
            "seconds": seconds,
            "then": then,
        }
        optional = {
            "retry_after": retry_after,
            "error": error,
            "error_description": error_description,
            "grant_type": grant_type,
        }
        spec.update({k: v for k, v in optional.items() if v is not None})
        self._as("POST", "/_test/faults", spec)

    def reset_faults(self) -> None:
        """Clear pending faults on both origins."""
        self._as("POST", "/_test/reset-faults", {})
        self._api("POST", "/_test/reset-faults", {})

    # ----- test-only controls on the API origin

    def set_api_fault(
        self,
        *,
        mode: FaultMode = "status",
        count: int = 1,
        status: int = 503,
        retry_after: int | str | None = None,
        error: str | None = None,
        seconds: float = 30.0,
        then: Literal["drop", "process"] = "drop",
        path: str | None = None,
    ) -> None:
        """Make the next `count` API requests (whose path starts with `path`) fail; as set_fault."""
        spec: dict[str, Any] = {
            "mode": mode,
            "count": count,
            "status": status,
            "seconds": seconds,
            "then": then,
        }
        optional = {"retry_after": retry_after, "error": error, "path": path}
        spec.update({k: v for k, v in optional.items() if v is not None})
        self._api("POST", "/_test/faults", spec)

    def api_calls(self) -> list[dict[str, Any]]:
        """Every request the API received since the last reset, oldest first.

        Each: seq, time (epoch seconds at arrival), method, path, query, status (None when the
        connection was dropped), sub, client_id, scope (when the token resolved), token_sha256
        (of any bearer token sent, see `sha256_hex`), fault, aborted (client went away first),
        duration_ms.
        """
        calls: list[dict[str, Any]] = self._api("GET", "/_test/api-calls")["calls"]
        return calls

    def reset_api_calls(self) -> None:
        self._api("POST", "/_test/reset-api-calls", {})

    def reset(self) -> None:
        """Forget faults, statistics and API calls (grants and tokens stay)."""
        self.reset_faults()
        self.reset_stats()
        self.reset_api_calls()

    def _as(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        return self._call(self.issuer, method, path, body, params)

    def _api(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self._call(self.api_base, method, path, body, None)

    def _call(
        self,
        base: str,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        params: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        response = self._admin.request(
            method, base + path, json=dict(body) if body is not None else None, params=params
        )
        if response.status_code != 200:
            raise OidcProviderError(f"{method} {path}: {response.status_code} {response.text}")
        result: dict[str, Any] = response.json()
        return result

    # ----- the user at the AS

    def login_and_consent(
        self,
        http: httpx.Client,
        authorize_url: str,
        username: str,
        *,
        scopes: set[str] | None = None,
        deny: bool = False,
        password: str = PASSWORD,
    ) -> str:
        """Play the user in a browser: log in, tick `scopes` (default: all), Allow or Deny.

        Follows the AS's redirects and forms with `http`, whose cookie jar is the browser: a
        session there skips the login page (so a client signed in as someone else is refused),
        and consent already given in that session to the same client for the same scopes skips
        the consent page (send `prompt=consent` to see it again). Returns the redirect URL
        aimed at the client's redirect_uri (`code` or `error`, `state`, `iss`) without
        requesting it.
        """
        signed_in = http.get(f"{self.issuer}/_test/whoami").json()["sub"]
        if signed_in not in (None, username):
            # The AS would silently reuse that session: no login page, someone else's code.
            raise InteractionError(
                f"this client is signed in at the AS as {signed_in!r}, not {username!r}: "
                "use a fresh httpx.Client per user"
            )
        method, url, data = "GET", authorize_url, None
        logins = 0
        for _ in range(20):
            response = http.request(method, url, data=data, follow_redirects=False)
            if response.is_redirect:
                target = urljoin(str(response.url), response.headers["location"])
                if not _same_origin(target, self.issuer):
                    return target
                method, url, data = "GET", target, None
                continue
            page = _parse(response.text)
            login = page.form("login-form")
            consent = page.form("consent-form")
            if login is not None:
                logins += 1
                if logins > 1:
                    raise InteractionError(
                        f"login refused for {username!r}: {page.texts.get('error')}"
                    )
                method, url = "POST", urljoin(str(response.url), login.action)
                data = {"login": username, "password": password}
            elif consent is not None:
                account = page.texts.get("account", "").strip()
                if account != username:
                    raise InteractionError(
                        f"AS session belongs to {account!r}, not {username!r}: use a fresh client"
                    )
                method, url = "POST", urljoin(str(response.url), consent.action)
                data = _consent_fields(consent, scopes, deny)
            else:
                error = page.texts.get("error", "").strip()
                description = page.texts.get("error_description", "").strip()
                raise InteractionError(
                    f"unexpected AS page ({response.status_code} {response.url}): "
                    f"{error or response.text[:500]} {description}".strip()
                )
        raise InteractionError("too many redirects while logging in")


def _same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def _tail(path: Path, limit: int | None = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text if limit is None else text[-limit:]


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None and not process.stdin.closed:
        process.stdin.close()  # the server exits on stdin EOF; SIGTERM is the backup
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
