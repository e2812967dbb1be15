"""Fixtures for the sandbox AS/API tests: an in-memory sandbox on a clock the test moves."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from behalf.sandbox import Sandbox, create_sandbox
from tests.unit.sandbox.helpers import API_BASE, ISSUER, FakeClock


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    # Start at the wall clock: client assertions are signed (and checked) on it.
    return FakeClock(float(int(time.time())))


@pytest.fixture
def sandbox(clock: FakeClock) -> Iterator[Sandbox]:
    sandbox = create_sandbox(issuer=ISSUER, api_base=API_BASE, database_path=None, clock=clock)
    yield sandbox
    sandbox.close()


@pytest.fixture
async def auth(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-ish client of the AS (keeps cookies, does not follow redirects)."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.auth_app), base_url=ISSUER
    ) as client:
        yield client


@pytest.fixture
async def api(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.api_app), base_url=API_BASE
    ) as client:
        yield client
