"""The browser session: one signed cookie carrying a random browser binding, the CSRF token
and, once signed in, the user.

The cookie is signed (itsdangerous, keyed by the deployment's secret key) and time-limited; it
holds no token and nothing secret beyond this browser's own binding and CSRF values. Signing in
replaces the binding and the CSRF token, so nothing minted before sign-in survives it.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from api.deps import CookieSettings
from delegation.connect import new_browser_binding

_SALT = "behalf.browser-session.v1"


@dataclass(frozen=True, repr=False)
class BrowserSession:
    binding: str
    csrf: str
    user_id: uuid.UUID | None = None
    subject: str | None = None

    def __repr__(self) -> str:
        return f"BrowserSession(user_id={self.user_id}, subject={self.subject!r})"

    @classmethod
    def new(cls, user_id: uuid.UUID | None = None, subject: str | None = None
            ) -> BrowserSession:
        return cls(new_browser_binding(), secrets.token_urlsafe(32), user_id, subject)

    @property
    def signed_in(self) -> bool:
        return self.user_id is not None

    def signed_out(self) -> BrowserSession:
        return replace(BrowserSession.new(), binding=self.binding)

    def csrf_ok(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf.encode(),
                                                       str(presented).encode())


class SessionCookie:
    def __init__(self, secret_key: str, settings: CookieSettings) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt=_SALT)
        self.settings = settings

    def read(self, request: Request) -> BrowserSession | None:
        raw = request.cookies.get(self.settings.name)
        if not raw or len(raw) > 4096:
            return None
        try:
            doc: Any = self._serializer.loads(raw, max_age=self.settings.max_age_seconds)
        except BadSignature:
            return None
        try:
            user = uuid.UUID(doc["u"]) if doc.get("u") else None
            return BrowserSession(binding=str(doc["b"]), csrf=str(doc["c"]), user_id=user,
                                  subject=doc.get("s"))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def write(self, response: Response, session: BrowserSession) -> None:
        value = self._serializer.dumps({
            "b": session.binding, "c": session.csrf,
            "u": str(session.user_id) if session.user_id else None, "s": session.subject,
        })
        response.set_cookie(
            self.settings.name, value, max_age=self.settings.max_age_seconds, path="/",
            httponly=True, secure=self.settings.secure,
            samesite=self.settings.same_site,  # type: ignore[arg-type]
        )

    def clear(self, response: Response) -> None:
        response.delete_cookie(self.settings.name, path="/", httponly=True,
                               secure=self.settings.secure,
                               samesite=self.settings.same_site)  # type: ignore[arg-type]
