from __future__ import annotations

from typing import Any

import httpx
import pytest
from joserfc.jwk import RSAKey

from tests.unit.sandbox.helpers import REDIRECT_URI, register

pytestmark = pytest.mark.anyio


async def test_registers_a_private_key_jwt_client_without_a_secret(auth: httpx.AsyncClient) -> None:
    key = RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, auto_kid=True)

    response = await auth.post(
        "/register",
        json={
            "client_name": "Reporting agent",
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [key.as_dict(private=False)]},
            "scope": "openid reports:read",
        },
    )

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["client_id"]
    assert "client_secret" not in body
    assert body["token_endpoint_auth_method"] == "private_key_jwt"
    assert body["jwks"]["keys"][0]["kid"] == key.kid
    assert body["scope"] == "openid reports:read"
    # Omitted: the sandbox registers code + refresh and the code response type.
    assert body["grant_types"] == ["authorization_code", "refresh_token"]
    assert body["response_types"] == ["code"]


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_registers_a_secret_client_and_returns_its_secret(
    auth: httpx.AsyncClient, method: str
) -> None:
    client = await register(auth, method)

    assert client.client_id and client.secret


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ({"token_endpoint_auth_method": "private_key_jwt"}, "invalid_client_metadata"),
        ({"token_endpoint_auth_method": "none"}, "invalid_client_metadata"),
        (
            {"token_endpoint_auth_method": "client_secret_basic", "scope": "admin"},
            "invalid_client_metadata",
        ),
        (
            {"token_endpoint_auth_method": "client_secret_basic", "redirect_uris": []},
            "invalid_redirect_uri",
        ),
        (
            {"token_endpoint_auth_method": "client_secret_basic", "grant_types": ["password"]},
            "invalid_client_metadata",
        ),
    ],
)
async def test_refuses_bad_metadata(
    auth: httpx.AsyncClient, metadata: dict[str, Any], error: str
) -> None:
    response = await auth.post("/register", json={"redirect_uris": [REDIRECT_URI], **metadata})

    assert response.status_code == 400
    assert response.json()["error"] == error


async def test_refuses_a_private_key_sent_as_a_public_key(auth: httpx.AsyncClient) -> None:
    key = RSAKey.generate_key(2048, auto_kid=True)

    response = await auth.post(
        "/register",
        json={
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [key.as_dict(private=True)]},
        },
    )

    assert response.status_code == 400


async def test_refuses_a_body_that_is_not_a_json_object(auth: httpx.AsyncClient) -> None:
    response = await auth.post(
        "/register", content=b"[1, 2]", headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
