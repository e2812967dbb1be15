"""What the HTTP app needs from the outside world, passed in once by the composition root."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from delegation.clock import Clock
from delegation.oauth import OAuthClient
from delegation.vault import Vault

SESSION_COOKIE = "behalf_session"  # must not be the sandbox's `behalf_sandbox_session`


def _no_stop(_delegation_id: uuid.UUID) -> None:
    return None


@dataclass(frozen=True)
class CookieSettings:
    """The browser session cookie: HttpOnly always, SameSite=Lax (the AS's redirect back to
    /oauth/callback is a cross-site top-level GET, which Strict would strip), Secure when the
    app is served over https."""

    name: str = SESSION_COOKIE
    secure: bool = False
    max_age_seconds: int = 8 * 3600
    same_site: str = "lax"

    @classmethod
    def for_url(cls, public_url: str) -> CookieSettings:
        return cls(secure=urlsplit(public_url).scheme == "https")


@dataclass(frozen=True)
class ApiDeps:
    """The app's dependencies: narrow, explicit, and all replaceable in tests.

    `publish_stop` is called with a delegation id after a user's revocation has been
    committed (the durable revocation does not depend on it: the outbox also carries the stop).
    """

    sessions: sessionmaker[Session]
    vault: Vault
    clock: Clock
    oauth: OAuthClient
    public_url: str
    secret_key: str
    environment: str
    cookies: CookieSettings = field(default_factory=CookieSettings)
    publish_stop: Callable[[uuid.UUID], None] = _no_stop
    ops_token: str = ""
    state_ttl_seconds: int = 600

    @property
    def origin(self) -> str:
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"
