"""The app over SQLite, a local key file and the in-memory AS (`fake_oidc`): no network."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio.from_thread
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.deps import ApiDeps, CookieSettings
from delegation import providers
from delegation.clock import FrozenClock
from delegation.kms import LocalKeyFile
from delegation.oauth import OAuthClient
from delegation.vault import Vault
from tests.unit.api.fake_oidc import FakeOidcProvider

PUBLIC_URL = "http://testserver"
SECRET_KEY = "k" * 48


class SyncASGITransport(httpx.BaseTransport):
    """Drive an ASGI app from a sync `httpx.Client` (app exceptions propagate, as they should:
    a 500 must fail the test). Starlette's TestClient does this too, but deprecates httpx."""

    def __init__(self, app: FastAPI) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self._stack = ExitStack()
        self._portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            request.stream = httpx.ByteStream(request.read())
            response = await self._inner.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers,
                                  content=body, request=request)

        return self._portal.call(call)

    def close(self) -> None:
        self._stack.close()



@dataclass
class World:
    fake: FakeOidcProvider
    sessions: sessionmaker[Session]
    vault: Vault
    clock: FrozenClock
    oauth: OAuthClient
    app: FastAPI
    stops: list[uuid.UUID] = field(default_factory=list)
    responses: list[httpx.Response] = field(default_factory=list)
    browsers: list[httpx.Client] = field(default_factory=list)

    def browser(self) -> httpx.Client:
        client = httpx.Client(transport=SyncASGITransport(self.app), base_url=PUBLIC_URL,
                              follow_redirects=False, event_hooks={"response": [self._keep]})
        self.browsers.append(client)
        return client

    def _keep(self, response: httpx.Response) -> None:
        response.read()
        self.responses.append(response)

    def register_agent(self, name: str = "reporter", *, scopes: str = "reports:read calendar:read",
                       required: str = "", auth: str = "private_key_jwt"
                       ) -> providers.AgentInfo:
        return providers.register_agent(
            self.sessions, self.vault, self.oauth, self.clock, name=name, provider_name="acme",
            environment="test", scopes=providers.parse_scopes(scopes),
            required_scopes=providers.parse_scopes(required, allow_empty=True),
            auth_method=auth, public_url=PUBLIC_URL, operator="tester")

    def sign_in(self, browser: httpx.Client, sub: str) -> None:
        login = browser.get("/auth/login")
        assert login.status_code == 303, login.text
        back = self.fake.authorize(login.headers["location"], sub)
        done = browser.get(back)
        assert done.status_code == 303, done.text

    def start_connect(self, browser: httpx.Client, agent: str = "reporter") -> str:
        response = browser.get(f"/connect/{agent}")
        assert response.status_code == 303, response.text
        location = response.headers["location"]
        assert location.startswith(self.fake.issuer), location
        return location

    def connect(self, browser: httpx.Client, sub: str, *, agent: str = "reporter",
                grant: list[str] | None = None) -> httpx.Response:
        back = self.fake.authorize(self.start_connect(browser, agent), sub, grant=grant)
        return browser.get(back)

    def secrets_seen(self) -> list[str]:
        """Every secret the AS issued that shows up in any of our responses."""
        found = []
        for response in self.responses:
            text = response.text + " ".join(f"{k}: {v}" for k, v in response.headers.items())
            found += [s for s in self.fake.issued if s and s in text]
        return found


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def build_world(tmp_path: Any, sessions: sessionmaker[Session], *, openid: bool = True,
                iss_parameter: bool = True, signin: bool = True) -> World:
    clock = FrozenClock()
    fake = FakeOidcProvider(clock, openid=openid, iss_parameter=iss_parameter)
    vault = Vault(LocalKeyFile(tmp_path / "master.key", warn=False))
    oauth = OAuthClient(httpx.Client(transport=fake.transport()), clock)
    stops: list[uuid.UUID] = []
    deps = ApiDeps(sessions=sessions, vault=vault, clock=clock, oauth=oauth,
                   public_url=PUBLIC_URL, secret_key=SECRET_KEY, environment="test",
                   cookies=CookieSettings(), publish_stop=stops.append)
    world = World(fake=fake, sessions=sessions, vault=vault, clock=clock, oauth=oauth,
                  app=create_app(deps), stops=stops)
    providers.add_provider(sessions, oauth, clock, name="acme", issuer=fake.issuer,
                           api_base="https://api.test", operator="tester")
    if signin:
        providers.register_signin_client(sessions, vault, oauth, clock, provider_name="acme",
                                         environment="test", public_url=PUBLIC_URL,
                                         operator="tester")
    return world


@pytest.fixture
def world(tmp_path: Any, sqlite_sessions: sessionmaker[Session]) -> Iterator[World]:
    w = build_world(tmp_path, sqlite_sessions)
    w.register_agent()
    yield w
    for browser in w.browsers:
        browser.close()
