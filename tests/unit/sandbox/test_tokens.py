from __future__ import annotations

import re

import httpx
import pytest
from authlib.integrations.base_client import OAuthError

from behalf.sandbox import Sandbox
from tests.unit.sandbox.helpers import (
    INTROSPECT_URL,
    ISSUER,
    REVOKE_URL,
    TOKEN_URL,
    FakeClock,
    RegisteredClient,
    bearer,
    connect,
    post_token,
    refresh,
    register,
)

pytestmark = pytest.mark.anyio


async def _introspect(
    auth: httpx.AsyncClient, client: RegisteredClient, token: str
) -> dict[str, object]:
    response = await post_token(auth, client, INTROSPECT_URL, token=token)
    assert response.status_code == 200
    result: dict[str, object] = response.json()
    return result


async def test_refresh_rotates_the_refresh_token(sandbox: Sandbox, auth: httpx.AsyncClient) -> None:
    client = await register(auth, "private_key_jwt")
    first = await connect(auth, client)

    async with client.oauth(sandbox) as oauth:
        second = await oauth.refresh_token(TOKEN_URL, refresh_token=first["refresh_token"])

    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["scope"] == first["scope"]
    assert (await _introspect(auth, client, first["refresh_token"]))["active"] is False
    assert (await _introspect(auth, client, second["refresh_token"]))["active"] is True


async def test_reusing_a_rotated_refresh_token_revokes_the_whole_grant(
    sandbox: Sandbox, auth: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    # Given a grant whose refresh token was rotated once
    client = await register(auth, "client_secret_basic")
    first = await connect(auth, client)
    second = (await refresh(auth, client, first["refresh_token"])).json()

    # When the old refresh token is presented again (a leak, or two workers racing)
    reuse = await refresh(auth, client, first["refresh_token"])

    # Then it is refused, and every token of the grant is dead, the newest included
    assert (reuse.status_code, reuse.json()["error"]) == (400, "invalid_grant")
    assert (await refresh(auth, client, second["refresh_token"])).json()["error"] == "invalid_grant"
    for access_token in (first["access_token"], second["access_token"]):
        assert (await api.get("/v2/me", headers=bearer(access_token))).status_code == 401
    [grant] = sandbox.grants()
    assert (grant.status, grant.status_reason) == ("revoked", "refresh token reused")


async def test_refresh_may_narrow_but_not_widen_the_scope(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_post")
    token = await connect(auth, client, scope="openid reports:read")

    wider = await post_token(
        auth,
        client,
        TOKEN_URL,
        grant_type="refresh_token",
        refresh_token=token["refresh_token"],
        scope="reports:read reports:write",
    )
    narrower = await post_token(
        auth,
        client,
        TOKEN_URL,
        grant_type="refresh_token",
        refresh_token=token["refresh_token"],
        scope="reports:read",
    )

    assert wider.json()["error"] == "invalid_scope"
    assert narrower.json()["scope"] == "reports:read"


async def test_a_refresh_token_belongs_to_its_client(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    thief = await register(auth, "client_secret_basic")
    token = await connect(auth, client)

    stolen = await refresh(auth, thief, token["refresh_token"])

    assert stolen.json()["error"] == "invalid_grant"
    assert (await refresh(auth, client, token["refresh_token"])).status_code == 200


async def test_revoking_an_access_token_kills_it_alone(
    sandbox: Sandbox, auth: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    client = await register(auth, "private_key_jwt")
    token = await connect(auth, client)

    async with client.oauth(sandbox) as oauth:
        revoked = await oauth.revoke_token(
            REVOKE_URL, token=token["access_token"], token_type_hint="access_token"
        )

    assert revoked.status_code == 200
    assert await _introspect(auth, client, token["access_token"]) == {"active": False}
    assert (await api.get("/v2/me", headers=bearer(token["access_token"]))).status_code == 401
    assert (await refresh(auth, client, token["refresh_token"])).status_code == 200


async def test_revoking_the_refresh_token_kills_the_grant(
    auth: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    client = await register(auth, "client_secret_basic")
    token = await connect(auth, client)

    revoked = await post_token(auth, client, REVOKE_URL, token=token["refresh_token"])

    assert revoked.status_code == 200
    assert (await refresh(auth, client, token["refresh_token"])).json()["error"] == "invalid_grant"
    assert (await api.get("/v2/me", headers=bearer(token["access_token"]))).status_code == 401
    assert (await _introspect(auth, client, token["access_token"]))["active"] is False


async def test_revoking_an_unknown_token_is_a_quiet_success(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")

    response = await post_token(auth, client, REVOKE_URL, token="never-issued")

    assert response.status_code == 200  # RFC 7009 §2.2


async def test_revocation_needs_client_authentication(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    token = await connect(auth, client)

    response = await auth.post("/revoke", data={"token": token["refresh_token"]})

    assert response.status_code == 401
    assert (await refresh(auth, client, token["refresh_token"])).status_code == 200


async def test_introspection_describes_a_live_token(
    auth: httpx.AsyncClient, clock: FakeClock
) -> None:
    client = await register(auth, "client_secret_basic")
    token = await connect(auth, client, scope="openid reports:read")

    live = await _introspect(auth, client, token["access_token"])
    clock.advance(301)
    expired = await _introspect(auth, client, token["access_token"])

    assert live["active"] is True
    assert live["sub"] == "alice" and live["client_id"] == client.client_id
    assert live["scope"] == "openid reports:read"
    assert live["exp"] == int(clock()) - 1
    assert expired == {"active": False}


async def test_a_client_cannot_introspect_another_clients_token(auth: httpx.AsyncClient) -> None:
    client = await register(auth, "client_secret_basic")
    other = await register(auth, "client_secret_basic")
    token = await connect(auth, client)

    assert await _introspect(auth, other, token["access_token"]) == {"active": False}


async def test_break_grants_makes_the_next_refresh_fail_with_invalid_grant(
    sandbox: Sandbox, auth: httpx.AsyncClient, api: httpx.AsyncClient
) -> None:
    # Given alice and bob both connected the same client
    client = await register(auth, "private_key_jwt")
    token = await connect(auth, client, user="alice")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.auth_app), base_url=ISSUER
    ) as bobs_browser:
        bobs = await connect(bobs_browser, client, user="bob")

    # When alice's grant is broken from the sandbox
    broken = sandbox.break_grants("alice", client.client_id)

    # Then her next refresh fails with invalid_grant and her tokens are dead; bob's live on
    assert broken == 1
    async with client.oauth(sandbox) as oauth:
        with pytest.raises(OAuthError) as refused:
            await oauth.refresh_token(TOKEN_URL, refresh_token=token["refresh_token"])
    assert refused.value.error == "invalid_grant"
    assert (await api.get("/v2/me", headers=bearer(token["access_token"]))).status_code == 401
    assert (await api.get("/v2/me", headers=bearer(bobs["access_token"]))).json()["sub"] == "bob"
    assert {(grant.sub, grant.status) for grant in sandbox.grants()} == {
        ("alice", "broken"),
        ("bob", "active"),
    }
    assert sandbox.break_grants("alice", client.client_id) == 0


async def test_the_admin_page_lists_grants_and_breaks_one(
    sandbox: Sandbox, auth: httpx.AsyncClient
) -> None:
    client = await register(auth, "client_secret_basic")
    token = await connect(auth, client)
    [grant] = sandbox.grants()

    page = await auth.get("/_sandbox/admin")
    assert page.status_code == 200
    assert grant.id in page.text and client.client_id in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    forged = await auth.post(f"/_sandbox/admin/grants/{grant.id}/break", data={"csrf": "forged"})
    assert forged.status_code == 400
    clicked = await auth.post(f"/_sandbox/admin/grants/{grant.id}/break", data={"csrf": csrf})

    assert clicked.status_code == 303
    assert sandbox.grants()[0].status == "broken"
    assert (await refresh(auth, client, token["refresh_token"])).json()["error"] == "invalid_grant"
