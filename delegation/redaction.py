"""Redaction of anything token-shaped in log records: the second line of defence.

The first line is that no code of ours logs a secret (`tests/resilience/test_leaks.py` runs a
whole deployment and scans its logs for every token it saw issued). This module catches what
slips through anyway: a library that logs a request line, an exception whose message quotes a
response body, a `repr` of an object that holds a token.

What counts as token-shaped (`redact`): JWTs; `Bearer …` / `Basic …` credentials; the values of
`access_token=`, `refresh_token=`, `client_secret=`, `code_verifier=` and similar fields (in
query strings, forms, JSON and reprs); `code=`, `state=` and `token=` query parameters; PEM
private keys; and long opaque base64/base64url runs (32+ characters mixing upper and lower case
with a digit or `-_+`). UUIDs, hex digests, lowercase identifiers, paths and counts never match,
so ordinary lines stay readable.

`install()` makes the process's log record factory redact every record (message, arguments,
exception text, stack) before any handler sees it. A factory, not only a formatter: Celery's
worker and uvicorn replace the root handlers and their formatters with their own, and leave the
factory alone.

`disclosed()` lets one deliberate write through: the dev mailbox (`LogMailer`), where the log
*is* the user's inbox and the re-authorisation link must stay usable.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

MASK = "[REDACTED]"

_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer|dpop)(\s+)(?!realm\b)[A-Za-z0-9._~+/=-]{8,}")
# Basic: the credentials are base64, so they carry a digit, + / or padding (a word does not)
_BASIC = re.compile(r"\b(Basic)(\s+)(?=[A-Za-z]*[0-9+/=])[A-Za-z0-9+/]{8,}={0,2}")
_FIELD_NAMES = (
    "access_token", "refresh_token", "id_token", "registration_access_token",
    "client_secret", "client_assertion", "code_verifier", "assertion", "password", "passwd",
    "api_key", "apikey", "secret_key", "private_key", "ops_token",
)
_FIELD = re.compile(r"""(?i)(["']?\b(?:""" + "|".join(_FIELD_NAMES)
                    + r""")["']?\s*[=:]\s*["']?)[^\s"'&,;<>)\]}]+""")
_QUERY = re.compile(r"(?i)([?&](?:code|state|token|key)=)[^\s&#\"'<>]+")
_OPAQUE = re.compile(r"(?<![A-Za-z0-9_+-])[A-Za-z0-9_+-]{32,}={0,2}")
_HAS_UPPER = re.compile(r"[A-Z]")
_HAS_LOWER = re.compile(r"[a-z]")
_HAS_OTHER = re.compile(r"[0-9_+-]")

_PLAIN_TYPES = (int, float, bool, uuid.UUID, dt.date, dt.time, dt.timedelta, enum.Enum)
_disclosed: ContextVar[bool] = ContextVar("behalf_log_disclosed", default=False)
_exceptions = logging.Formatter()


def _opaque(match: re.Match[str]) -> str:
    run = match.group(0)
    if _HAS_UPPER.search(run) and _HAS_LOWER.search(run) and _HAS_OTHER.search(run):
        return MASK
    return run


def redact(text: str) -> str:
    """`text` with every token-shaped part replaced by `[REDACTED]` (idempotent)."""
    if len(text) < 8:
        return text
    text = _PEM.sub("[REDACTED PRIVATE KEY]", text)
    text = _JWT.sub(MASK, text)
    text = _BEARER.sub(rf"\1\2{MASK}", text)
    text = _BASIC.sub(rf"\1\2{MASK}", text)
    text = _FIELD.sub(rf"\1{MASK}", text)
    text = _QUERY.sub(rf"\1{MASK}", text)
    return _OPAQUE.sub(_opaque, text)


def _redact_arg(value: Any) -> Any:
    if value is None or isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, str):
        return redact(value)
    # An object: its str() or repr() may quote a token (a response, an exception, a dataclass).
    shown = str(value)
    redacted = redact(shown)
    if redacted != shown:
        return redacted
    shown = repr(value)
    return redact(str(value)) if redact(shown) != shown else value


def redact_record(record: logging.LogRecord) -> None:
    """Redact a record in place: message, arguments, exception text and stack."""
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    elif record.msg is not None:
        record.msg = _redact_arg(record.msg)
    args = record.args
    if isinstance(args, Mapping):
        record.args = {key: _redact_arg(value) for key, value in args.items()}
    elif isinstance(args, tuple):
        record.args = tuple(_redact_arg(value) for value in args)
    if record.exc_info and not record.exc_text:
        # formatted now, so that whichever formatter handles it later shows the redacted text
        record.exc_text = _exceptions.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


@contextmanager
def disclosed() -> Iterator[None]:
    """Log within this block unredacted: only for a write whose purpose is to show a secret
    to its owner (the dev mailbox)."""
    token = _disclosed.set(True)
    try:
        yield
    finally:
        _disclosed.reset(token)


def install() -> None:
    """Make every log record of this process redacted at creation (idempotent; forked worker
    processes inherit it)."""
    current: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()
    if getattr(current, "behalf_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        if not _disclosed.get():
            redact_record(record)
        return record

    factory.behalf_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
