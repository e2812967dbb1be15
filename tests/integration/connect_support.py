"""The connect world for integration tests: the real app, served by uvicorn on 127.0.0.1, over
real PostgreSQL, in front of the real authorisation server (oidc-provider, `oidc_provider`).

`ConnectWorld` registers a sign-in client and an agent (`reporter`, private_key_jwt) at the AS,
serves the app, and plays users with plain httpx clients (`browser()`); the AS's own login and
consent pages are driven by `OidcProvider.login_and_consent`.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.deps import ApiDeps, CookieSettings
from delegation import providers
from delegation.clock import SystemClock
from delegation.kms import LocalKeyFile
from delegation.oauth import OAuthClient
from delegation.tokens import TokenSet
from delegation.vault import Sealed, Vault, delegation_context
from models import AuditEvent, Delegation, User
from tests.support.databases import LeakScan
from tests.support.oidc_provider import OidcProvider

SECRET_KEY = "integration-secret-key-" + "x" * 32
API_SCOPES = ["reports:read", "reports:write", "calendar:read"]


class LiveServer:
    """uvicorn in a thread, on a socket bound before the app is built (so the app knows its
    own URL and nothing races for the port)."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def serve(self, app: Any) -> None:
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the app did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self.socket.close()


@dataclass
class ConnectWorld:
    provider: OidcProvider
    sessions: sessionmaker[Session]
    vault: Vault
    oauth: OAuthClient
    server: LiveServer
    leak_scan: LeakScan
    stops: list[uuid.UUID] = field(default_factory=list)
    browsers: list[httpx.Client] = field(default_factory=list)
    clock: SystemClock = field(default_factory=SystemClock)

    @property
    def url(self) -> str:
        return self.server.url

    def browser(self) -> httpx.Client:
        client = httpx.Client(trust_env=False, follow_redirects=False, timeout=15)
        self.browsers.append(client)
        return client

    def register_agent(self, name: str = "reporter", *, scopes: str = " ".join(API_SCOPES),
                       required: str = "", auth: str = "private_key_jwt"
                       ) -> providers.AgentInfo:
        return providers.register_agent(
            self.sessions, self.vault, self.oauth, self.clock, name=name,
            provider_name="acme", environment="test", scopes=providers.parse_scopes(scopes),
            required_scopes=providers.parse_scopes(required, allow_empty=True),
            auth_method=auth, public_url=self.url, operator="tester")

    # --- the user ---------------------------------------------------------------------------

    def sign_in(self, browser: httpx.Client, username: str) -> None:
        login = browser.get(f"{self.url}/auth/login")
        assert login.status_code == 303, login.text
        back = self.provider.login_and_consent(browser, login.headers["location"], username)
        done = browser.get(back)
        assert done.status_code == 303, done.text

    def start_connect(self, browser: httpx.Client, agent: str = "reporter") -> str:
        response = browser.get(f"{self.url}/connect/{agent}")
        assert response.status_code == 303, response.text
        location: str = response.headers["location"]
        assert location.startswith(self.provider.issuer), location
        return location

    def consent(self, browser: httpx.Client, username: str, *, agent: str = "reporter",
                scopes: set[str] | None = None, deny: bool = False) -> str:
        """Start connecting and consent at the AS: the callback URL, not requested yet."""
        url = self.start_connect(browser, agent)
        # The AS only shows consent again when asked (prompt=consent): a grant the test
        # already gave in this AS session would otherwise be reused silently.
        return self.provider.login_and_consent(browser, url + "&prompt=consent", username,
                                               scopes=scopes, deny=deny)

    def connect(self, browser: httpx.Client, username: str, **kw: Any) -> httpx.Response:
        return browser.get(self.consent(browser, username, **kw))

    # --- what is stored ---------------------------------------------------------------------

    def delegations(self) -> list[Delegation]:
        with self.sessions() as s:
            return list(s.scalars(select(Delegation).order_by(Delegation.created_at)))

    def tokens(self, row: Delegation) -> TokenSet:
        assert row.token_blob and row.wrapped_key and row.key_id
        raw = self.vault.open(Sealed(row.token_blob, row.wrapped_key, row.key_id),
                              delegation_context(row.user_id, row.id, row.agent_id))
        tokens = TokenSet.from_bytes(raw)
        self.leak_scan.register(tokens.access_token, tokens.refresh_token or "")
        return tokens

    def snapshot(self) -> tuple[Any, ...]:
        with self.sessions() as s:
            return (
                sorted((str(d.id), d.version, d.status, d.token_blob)
                       for d in s.scalars(select(Delegation))),
                len(s.scalars(select(User.id)).all()),
                len(s.scalars(select(AuditEvent.id)).all()),
            )


def with_params(url: str, **changes: str | None) -> str:
    """`url` with query parameters replaced (None removes one)."""
    parts = urlsplit(url)
    params = {k: v[0] for k, v in parse_qs(parts.query).items()}
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    return urlunsplit(parts._replace(query=urlencode(params)))


def params(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def build_world(provider: OidcProvider, sessions: sessionmaker[Session], tmp_path: Path,
                leak_scan: LeakScan) -> Iterator[ConnectWorld]:
    provider.reset()
    vault = Vault(LocalKeyFile(tmp_path / "master.key", warn=False))
    http = httpx.Client(trust_env=False, timeout=httpx.Timeout(10.0, connect=5.0))
    oauth = OAuthClient(http, SystemClock())
    server = LiveServer()
    world = ConnectWorld(provider=provider, sessions=sessions, vault=vault, oauth=oauth,
                         server=server, leak_scan=leak_scan)
    deps = ApiDeps(sessions=sessions, vault=vault, clock=world.clock, oauth=oauth,
                   public_url=server.url, secret_key=SECRET_KEY, environment="test",
                   cookies=CookieSettings.for_url(server.url), publish_stop=world.stops.append)
    providers.add_provider(sessions, oauth, world.clock, name="acme", issuer=provider.issuer,
                           api_base=provider.api_base, operator="tester")
    providers.register_signin_client(sessions, vault, oauth, world.clock, provider_name="acme",
                                     environment="test", public_url=server.url,
                                     operator="tester")
    world.register_agent()
    server.serve(create_app(deps))
    try:
        yield world
    finally:
        for browser in world.browsers:
            browser.close()
        server.stop()
        http.close()
        provider.reset_faults()


@pytest.fixture
def world(oidc_provider: OidcProvider, pg_sessions: sessionmaker[Session], tmp_path: Path,
          leak_scan: LeakScan) -> Iterator[ConnectWorld]:
    yield from build_world(oidc_provider, pg_sessions, tmp_path, leak_scan)
