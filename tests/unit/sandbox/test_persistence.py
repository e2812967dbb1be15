from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from behalf.sandbox import create_sandbox
from tests.unit.sandbox.helpers import (
    API_BASE,
    ISSUER,
    FakeClock,
    bearer,
    connect,
    refresh,
    register,
)

pytestmark = pytest.mark.anyio


async def test_state_survives_a_restart_on_the_same_file(tmp_path: Path, clock: FakeClock) -> None:
    database = tmp_path / "sandbox.sqlite3"

    # Given a sandbox on a file, with a client, a grant and an API call
    first = create_sandbox(issuer=ISSUER, api_base=API_BASE, database_path=database, clock=clock)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=first.auth_app), base_url=ISSUER
    ) as auth:
        client = await register(auth, "private_key_jwt")
        token = await connect(auth, client)
        jwks_before = (await auth.get("/jwks")).json()
        session_cookie = dict(auth.cookies)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=first.api_app), base_url=API_BASE
    ) as api:
        assert (await api.get("/v2/me", headers=bearer(token["access_token"]))).status_code == 200
    first.close()

    # When it is created again on the same file
    second = create_sandbox(issuer=ISSUER, api_base=API_BASE, database_path=database, clock=clock)
    try:
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=second.auth_app),
                base_url=ISSUER,
                cookies=session_cookie,
            ) as auth,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=second.api_app), base_url=API_BASE
            ) as api,
        ):
            # Then the signing key, session, client, tokens and call log are all still there
            assert (await auth.get("/jwks")).json() == jwks_before
            assert "signed in as <code>alice</code>" in (await auth.get("/_sandbox/admin")).text
            assert (
                await api.get("/v2/me", headers=bearer(token["access_token"]))
            ).status_code == 200
            refreshed = await refresh(auth, client, token["refresh_token"])
            assert refreshed.status_code == 200
            assert [grant.sub for grant in second.grants()] == ["alice"]
            assert [call.status for call in second.api_calls()] == [200, 200]
    finally:
        second.close()


def test_an_in_memory_sandbox_starts_empty(clock: FakeClock) -> None:
    sandbox = create_sandbox(issuer=ISSUER, api_base=API_BASE, database_path=None, clock=clock)
    try:
        assert sandbox.grants() == [] and sandbox.api_calls() == []
    finally:
        sandbox.close()
