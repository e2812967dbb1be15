"""`create_sandbox`: build the sandbox AS and API on one store, and the handle the caller keeps."""

from __future__ import annotations

import ipaddress
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from joserfc.jwk import RSAKey
from starlette.applications import Starlette

from behalf.sandbox.api_app import build_api_app
from behalf.sandbox.auth_app import build_auth_app
from behalf.sandbox.server import SIGNING_ALG, SandboxAuthorizationServer
from behalf.sandbox.store import ApiCall, Clock, GrantInfo, Store, make_engine

BIND_HOST = "127.0.0.1"

_DEMO_REPORTS = {
    "alice": [
        ("Q3 revenue", "Revenue grew 12% quarter on quarter."),
        ("Churn watch", "Three accounts asked about cancelling."),
    ],
    "bob": [("Infra costs", "The database bill doubled after the migration.")],
}


@dataclass
class Sandbox:
    """The sandbox AS (`auth_app`, at `issuer`) and API (`api_app`, at `api_base`).

    Serve each app on its own port (two origins on purpose, as in real life), e.g. with
    `uvicorn_configs()`. The methods below are for the dev UI and tests; they are synchronous
    and safe to call from any thread.
    """

    issuer: str
    api_base: str
    auth_app: Starlette
    api_app: Starlette
    _store: Store = field(repr=False)

    def break_grants(self, sub: str, client_id: str) -> int:
        """Break every active grant of `sub` to `client_id`: all their tokens die, and the
        client's next refresh fails with `invalid_grant`. Returns how many were broken."""
        return self._store.break_grants(sub, client_id)

    def break_grant(self, grant_id: str) -> bool:
        """Break one grant (the admin page's button); False if it was not active."""
        return self._store.break_grant(grant_id)

    def grants(self) -> list[GrantInfo]:
        """Every grant, newest first."""
        return self._store.grants()

    def api_calls(self) -> list[ApiCall]:
        """Every call the API received, oldest first (token digests only)."""
        return self._store.calls()

    def uvicorn_configs(self, host: str = BIND_HOST) -> tuple[uvicorn.Config, uvicorn.Config]:
        """Configs serving `auth_app` and `api_app` (on 127.0.0.1 unless told otherwise, e.g.
        inside a container) at the ports of their URLs."""
        return (
            uvicorn.Config(
                self.auth_app,
                host=host,
                port=_port(self.issuer),
                lifespan="off",
                log_level="warning",
            ),
            uvicorn.Config(
                self.api_app,
                host=host,
                port=_port(self.api_base),
                lifespan="off",
                log_level="warning",
            ),
        )

    def close(self) -> None:
        """Release the database (the file, if any, keeps the state for the next start)."""
        self._store.close()


def create_sandbox(
    *,
    issuer: str,
    api_base: str,
    database_path: Path | None,
    clock: Clock = time.time,
    access_token_ttl: int = 300,
    http_anywhere: bool = False,
) -> Sandbox:
    """Build the sandbox AS and API.

    `issuer` and `api_base` are the URLs the two apps will be served at (origins without a path,
    on two different origins; http only on loopback). With `database_path` the state (clients,
    grants, tokens, signing key, call log) lives in that SQLite file and survives a restart;
    without, it lives in memory. `clock` gives the time for token expiry; `access_token_ttl` is
    the access tokens' lifetime in seconds.
    """
    issuer = _origin(issuer, "issuer", http_anywhere)
    api_base = _origin(api_base, "api_base", http_anywhere)
    if issuer == api_base:
        raise ValueError("issuer and api_base must be two different origins (two ports)")
    if access_token_ttl <= 0:
        raise ValueError("access_token_ttl must be a positive number of seconds")

    store = Store(make_engine(database_path), clock)
    signing_key = RSAKey.import_key(json.loads(store.secret("signing_jwk", _new_signing_jwk)))
    session_secret = store.secret("session_key", lambda: secrets.token_urlsafe(32))
    store.seed_reports(_DEMO_REPORTS)

    server = SandboxAuthorizationServer(
        issuer=issuer,
        store=store,
        clock=clock,
        signing_key=signing_key,
        access_token_ttl=access_token_ttl,
    )
    return Sandbox(
        issuer=issuer,
        api_base=api_base,
        auth_app=build_auth_app(
            server=server, store=store, session_secret=session_secret, api_base=api_base
        ),
        api_app=build_api_app(server=server, store=store, clock=clock),
        _store=store,
    )


def _new_signing_jwk() -> str:
    key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": SIGNING_ALG}, auto_kid=True)
    return json.dumps(key.as_dict(private=True))


def _origin(url: str, name: str, http_anywhere: bool = False) -> str:
    parts = urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must be an http(s) URL, got {url!r}")
    if parts.path or parts.query or parts.fragment:
        raise ValueError(f"{name} must be an origin without path, query or fragment, got {url!r}")
    if parts.scheme == "http" and not http_anywhere and not _is_loopback(parts.hostname):
        raise ValueError(
            f"{name} may use http only on loopback (127.0.0.1, localhost), got {url!r}"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)
