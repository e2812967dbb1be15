"""pytest fixtures for the test authorisation server and API (see `tests.support.oidc_provider`).

`oidc_provider` is one instance for the whole session (starting node costs about a second);
its grants and tokens are shared, so call `oidc_provider.reset()` where faults, statistics or the
API call log of an earlier test could mislead. `oidc_provider_factory` starts extra instances
with other settings (e.g. a 2-second access token TTL), stopped when the test ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pytest

from tests.support.oidc_provider import (
    DEFAULT_API_SCOPES,
    OidcProvider,
    OidcProviderSettings,
    OidcProviderUnavailable,
)
from tests.support.services import unavailable


class OidcProviderFactory(Protocol):
    def __call__(
        self,
        *,
        access_token_ttl: int = 300,
        refresh_token_ttl: int = 14 * 24 * 3600,
        api_scopes: tuple[str, ...] = DEFAULT_API_SCOPES,
    ) -> OidcProvider: ...


def _start(settings: OidcProviderSettings) -> OidcProvider:
    try:
        return OidcProvider.start(settings)
    except OidcProviderUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcProvider]:
    """The shared test AS + API, default settings (access tokens live 300 s)."""
    provider = _start(OidcProviderSettings())
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
def oidc_provider_factory() -> Iterator[OidcProviderFactory]:
    """Start extra AS + API instances with their own settings, for this test only."""
    started: list[OidcProvider] = []

    def factory(
        *,
        access_token_ttl: int = 300,
        refresh_token_ttl: int = 14 * 24 * 3600,
        api_scopes: tuple[str, ...] = DEFAULT_API_SCOPES,
    ) -> OidcProvider:
        settings = OidcProviderSettings(access_token_ttl, refresh_token_ttl, tuple(api_scopes))
        provider = _start(settings)
        started.append(provider)
        return provider

    try:
        yield factory
    finally:
        for provider in started:
            provider.stop()
