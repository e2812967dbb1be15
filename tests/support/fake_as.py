"""An in-memory AS token endpoint and API behind `httpx.MockTransport`, for fast unit tests.

It rotates refresh tokens and detects reuse (a spent refresh token kills the grant), counts
requests, and can be told to fail. Protocol behaviour is also tested against a real AS in the
integration suite; this double keeps unit tests fast and deterministic.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import httpx

AS_BASE = "https://as.test"
API_BASE = "https://api.test"


@dataclass
class Grant:
    sub: str
    client_id: str
    scope: str
    live_refresh: str
    spent: set[str] = field(default_factory=set)
    access: set[str] = field(default_factory=set)
    alive: bool = True


class FakeAuthServer:
    def __init__(self, *, ttl: int = 300) -> None:
        self.ttl = ttl
        self.grants: dict[str, Grant] = {}
        self.by_access: dict[str, Grant] = {}
        self.token_requests = 0
        self.faults: list[httpx.Response] = []
        self.api_calls: list[dict[str, object]] = []
        self.calls_to_other_hosts: list[str] = []
        self.lock = threading.Lock()
        self.issued: list[str] = []

    def metadata(self) -> dict[str, object]:
        return {
            "issuer": AS_BASE,
            "authorization_endpoint": f"{AS_BASE}/authorize",
            "token_endpoint": f"{AS_BASE}/token",
            "revocation_endpoint": f"{AS_BASE}/revoke",
            "code_challenge_methods_supported": ["S256"],
        }

    def grant(self, sub: str, client_id: str, scope: str = "reports:read") -> tuple[str, str]:
        """Create a grant; returns (access_token, refresh_token)."""
        refresh = "rt-" + secrets.token_urlsafe(16)
        grant = Grant(sub, client_id, scope, refresh)
        access = self._new_access(grant)
        self.grants[refresh] = grant
        self.issued += [access, refresh]
        return access, refresh

    def _new_access(self, grant: Grant) -> str:
        access = "at-" + secrets.token_urlsafe(16)
        grant.access.add(access)
        self.by_access[access] = grant
        self.issued.append(access)
        return access

    def kill(self, sub: str) -> None:
        for grant in self.grants.values():
            if grant.sub == sub:
                grant.alive = False

    def expire_access_tokens(self) -> None:
        self.by_access.clear()

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "as.test":
            return self._as(request)
        if request.url.host == "api.test":
            return self._api(request)
        self.calls_to_other_hosts.append(str(request.url))
        return httpx.Response(200, json={"elsewhere": True})

    def _as(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/token":
            return httpx.Response(404)
        with self.lock:
            self.token_requests += 1
            if self.faults:
                return self.faults.pop(0)
            form = dict(parse_qsl(request.content.decode()))
            if form.get("grant_type") != "refresh_token":
                return httpx.Response(400, json={"error": "unsupported_grant_type"})
            presented = form.get("refresh_token", "")
            grant = self.grants.get(presented)
            if grant is None:
                return httpx.Response(400, json={"error": "invalid_grant"})
            if not grant.alive or presented in grant.spent:
                grant.alive = False  # reuse detection: the whole grant dies
                return httpx.Response(400, json={"error": "invalid_grant",
                                                 "error_description": "grant revoked"})
            grant.spent.add(presented)
            new_refresh = "rt-" + secrets.token_urlsafe(16)
            grant.live_refresh = new_refresh
            self.grants[new_refresh] = grant
            self.issued.append(new_refresh)
            access = self._new_access(grant)
            return httpx.Response(200, json={
                "access_token": access, "refresh_token": new_refresh, "token_type": "Bearer",
                "expires_in": self.ttl, "scope": grant.scope,
            })

    def _api(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ")
        grant = self.by_access.get(token)
        status = 200 if grant is not None and grant.alive else 401
        self.api_calls.append({
            "method": request.method, "path": request.url.path, "status": status,
            "sub": grant.sub if grant else None,
            "token_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
        })
        if status == 401:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return httpx.Response(200, json={"path": request.url.path, "sub": grant.sub if grant
                                         else None})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


def as_json(response: httpx.Response) -> dict[str, object]:
    return json.loads(response.content)
