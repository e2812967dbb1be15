from __future__ import annotations

import httpx
import pytest
from authlib.oauth2 import rfc8414, rfc9207

from tests.unit.sandbox.helpers import ISSUER

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "path", ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"]
)
async def test_metadata_advertises_what_behalf_relies_on(
    auth: httpx.AsyncClient, path: str
) -> None:
    response = await auth.get(path)

    assert response.status_code == 200
    metadata = response.json()
    rfc8414.AuthorizationServerMetadata(metadata).validate(
        metadata_classes=[rfc9207.AuthorizationServerMetadata]
    )
    assert metadata["issuer"] == ISSUER
    for name, path_ in [
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/token"),
        ("revocation_endpoint", "/revoke"),
        ("introspection_endpoint", "/introspect"),
        ("registration_endpoint", "/register"),
        ("userinfo_endpoint", "/userinfo"),
        ("jwks_uri", "/jwks"),
    ]:
        assert metadata[name] == ISSUER + path_
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    assert metadata["scopes_supported"] == [
        "openid",
        "profile",
        "email",
        "reports:read",
        "reports:write",
        "calendar:read",
    ]
    assert metadata["token_endpoint_auth_methods_supported"] == [
        "private_key_jwt",
        "client_secret_basic",
        "client_secret_post",
    ]
    assert metadata["response_types_supported"] == ["code"]
    assert metadata["id_token_signing_alg_values_supported"] == ["RS256"]


async def test_jwks_publishes_the_public_signing_key_only(auth: httpx.AsyncClient) -> None:
    keys = (await auth.get("/jwks")).json()["keys"]

    assert len(keys) == 1
    assert keys[0]["kty"] == "RSA" and keys[0]["alg"] == "RS256" and keys[0]["kid"]
    assert "d" not in keys[0] and "p" not in keys[0]


def test_refuses_plain_http_off_loopback_and_a_shared_origin() -> None:
    from behalf.sandbox import create_sandbox

    with pytest.raises(ValueError, match="loopback"):
        create_sandbox(
            issuer="http://sandbox.example", api_base="http://127.0.0.1:2", database_path=None
        )
    with pytest.raises(ValueError, match="different origins"):
        create_sandbox(
            issuer="http://127.0.0.1:1", api_base="http://127.0.0.1:1/", database_path=None
        )
    with pytest.raises(ValueError, match="without path"):
        create_sandbox(
            issuer="http://127.0.0.1:1/as", api_base="http://127.0.0.1:2", database_path=None
        )
