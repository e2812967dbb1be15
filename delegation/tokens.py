"""Token values and client credentials: plain data whose reprs never show a secret."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any


def _hidden(value: str | None) -> str:
    return "None" if value is None else "<hidden>"


@dataclass(frozen=True, repr=False)
class TokenSet:
    """What a token response gave us, with expiry computed on our clock (not Authlib's)."""

    access_token: str
    refresh_token: str | None
    expires_at: dt.datetime | None
    issued_at: dt.datetime
    scope: tuple[str, ...] | None = None
    token_type: str = "Bearer"  # noqa: S105

    def __repr__(self) -> str:
        return (
            f"TokenSet(access_token={_hidden(self.access_token)}, "
            f"refresh_token={_hidden(self.refresh_token)}, expires_at={self.expires_at}, "
            f"scope={self.scope})"
        )

    @property
    def lifetime(self) -> float | None:
        if self.expires_at is None:
            return None
        return (self.expires_at - self.issued_at).total_seconds()

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc["expires_at"] = self.expires_at.isoformat() if self.expires_at else None
        doc["issued_at"] = self.issued_at.isoformat()
        doc["scope"] = list(self.scope) if self.scope is not None else None
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> TokenSet:
        doc = json.loads(raw)
        return cls(
            access_token=doc["access_token"],
            refresh_token=doc.get("refresh_token"),
            expires_at=dt.datetime.fromisoformat(doc["expires_at"]) if doc.get("expires_at")
            else None,
            issued_at=dt.datetime.fromisoformat(doc["issued_at"]),
            scope=tuple(doc["scope"]) if doc.get("scope") is not None else None,
            token_type=doc.get("token_type", "Bearer"),
        )

    @classmethod
    def from_response(
        cls, doc: dict[str, Any], now: dt.datetime, *, previous_refresh_token: str | None = None
    ) -> TokenSet:
        """Build from a token endpoint answer; keep the old refresh token if none came back."""
        expires_in = doc.get("expires_in")
        expires_at = None
        if expires_in is not None:
            expires_at = now + dt.timedelta(seconds=float(expires_in))
        scope = doc.get("scope")
        return cls(
            access_token=str(doc["access_token"]),
            refresh_token=doc.get("refresh_token") or previous_refresh_token,
            expires_at=expires_at,
            issued_at=now,
            scope=tuple(str(scope).split()) if scope is not None else None,
            token_type=str(doc.get("token_type", "Bearer")),
        )


@dataclass(frozen=True, repr=False)
class ClientCredentials:
    """How an agent authenticates to the AS: a secret or a private JWK (sealed at rest)."""

    client_id: str
    auth_method: str
    secret: str | None = None
    private_jwk: dict[str, Any] | None = None
    registration_access_token: str | None = None
    retired_jwks: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"ClientCredentials(client_id={self.client_id!r}, auth_method={self.auth_method!r})"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ClientCredentials:
        return cls(**json.loads(raw))
