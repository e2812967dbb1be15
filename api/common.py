"""What the routers share: the app's services, the signed-in user, callback parameters."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session, sessionmaker

from api.browser import BrowserSession, SessionCookie
from api.deps import ApiDeps
from api.pages import error_page
from delegation.connect import (
    MAX_CODE_LENGTH,
    MAX_PARAM_LENGTH,
    CallbackParams,
    Connector,
    ConnectRefused,
)
from delegation.providers import NAME_PATTERN
from models import User

log = logging.getLogger("api")

MAX_QUERY_LENGTH = 8192
MAX_FORM_BYTES = 4096
FORM_TYPE = "application/x-www-form-urlencoded"
# Free text a request may carry (an operator's name, an agent name or client_id to filter
# by): no control characters, so nothing can forge a log line or reach PostgreSQL as a NUL
# (which it refuses with an error). As a JSON-schema pattern, published in /openapi.json.
PLAIN_TEXT = r"^[^\x00-\x1f\x7f]*$"
AGENT_NAME = f"^{NAME_PATTERN.pattern}$"  # anchored for the schema
_CALLBACK_LIMITS = {
    "state": 128, "code": MAX_CODE_LENGTH, "iss": 500, "error": 100,
    "error_description": MAX_PARAM_LENGTH, "error_uri": MAX_PARAM_LENGTH,
}
# Steps after which starting over makes sense (the error page offers "Try again").
RETRYABLE = frozenset({
    "missing_state", "unknown_state", "other_browser", "replayed_state", "expired_state",
    "access_denied", "code_rejected", "provider_unavailable", "required_scope_missing",
    "nothing_granted", "revocation_pending", "authorization_error", "issuer_mismatch",
    "issuer_missing", "missing_code", "bad_parameters",
})


@dataclass(frozen=True)
class Services:
    deps: ApiDeps
    connector: Connector
    cookie: SessionCookie

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.deps.sessions

    def session(self, request: Request) -> BrowserSession | None:
        return self.cookie.read(request)

    def signed_in(self, request: Request) -> tuple[BrowserSession, User] | None:
        """The browser session and its user, if someone is signed in (and still exists)."""
        session = self.cookie.read(request)
        if session is None or session.user_id is None:
            return None
        with self.deps.sessions() as db:
            user = db.get(User, session.user_id)
        if user is None:
            return None
        return session, user


def parse_callback(request: Request) -> CallbackParams:
    """The AS's answer, refusing oversized, repeated or non-text parameters."""
    if len(request.url.query) > MAX_QUERY_LENGTH:
        raise ConnectRefused("bad_parameters", "The answer is too large to be genuine. "
                             "Nothing was saved.")
    values: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in _CALLBACK_LIMITS:
            continue  # e.g. session_state: not ours to interpret
        if name in values:
            raise ConnectRefused("bad_parameters", f"The answer repeats '{name}'. Nothing "
                                 "was saved.")
        if len(value) > _CALLBACK_LIMITS[name]:
            raise ConnectRefused("bad_parameters", f"The answer's '{name}' is too long to be "
                                 "genuine. Nothing was saved.")
        if not value.isascii() or not value.isprintable():
            raise ConnectRefused("bad_parameters", f"The answer's '{name}' is malformed. "
                                 "Nothing was saved.")
        values[name] = value
    return CallbackParams(
        state=values.get("state"), code=values.get("code"), iss=values.get("iss"),
        error=values.get("error"), error_description=values.get("error_description"),
    )


def refused(exc: ConnectRefused, *, signed_in: bool) -> HTMLResponse:
    log.info("refused: %s (HTTP %s)", exc.reason, exc.status)
    retry = None
    if exc.reason in RETRYABLE and exc.agent:
        retry = f"/connect/{exc.agent}"
    return error_page(exc.status, str(exc), retry_url=retry, signed_in=signed_in)


def parse_uuid(value: str) -> uuid.UUID | None:
    if len(value) > 36:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == FORM_TYPE


async def read_form(request: Request) -> dict[str, str] | None:
    """A small urlencoded form (our pages' forms carry one CSRF field); None when too large
    or malformed. The body is read with a cap, whatever Content-Length claims."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        fields = parse_qs(body.decode("ascii"), max_num_fields=20, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    return {name: values[0] for name, values in fields.items() if len(values) == 1}
