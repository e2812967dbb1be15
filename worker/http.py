"""`ctx.http`: an `httpx.Client` bound to the provider's API, carrying the user's token.

`DelegatedBearerAuth` is only the request/response state machine (token I/O is behind
`TokenSource`): it refuses any origin but the API's, checks cancellation, records the call in
the audit trail before it leaves and completes it after, and on a 401 refreshes once (handing
back the rejected token) and resends once.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from delegation.errors import BehalfError
from delegation.token_source import TokenSource
from worker.abort import abortable_transport
from worker.cancel import CancelToken

_ID_SEGMENT = re.compile(
    r"^(\d+|[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{16,}|[A-Za-z0-9_-]{24,})$"
)


class ForeignOriginError(BehalfError):
    """A job tried to send the delegated token somewhere other than the provider's API."""


def origin(url: str | httpx.URL) -> tuple[str, str, int]:
    parts = urlsplit(str(url))
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default


def path_template(path: str) -> str:
    """The path with id-like segments replaced by `{id}`: no query, no values that could
    hold a secret or personal data."""
    segments = [("{id}" if _ID_SEGMENT.match(s) else s) for s in path.split("/")]
    return "/".join(segments)[:300]


@dataclass(frozen=True)
class CallRecord:
    """What the audit trail learns of one API call."""

    call_id: uuid.UUID
    method: str
    path: str
    status: int | None = None
    outcome: str = "attempted"  # attempted | completed | failed | refused (never sent)


CallRecorder = Callable[[CallRecord], None]


class DelegatedBearerAuth(httpx.Auth):
    def __init__(
        self,
        tokens: TokenSource,
        delegation_id: uuid.UUID,
        *,
        api_base: str,
        cancel: CancelToken,
        record: CallRecorder,
        before_request: Callable[[], object] | None = None,
    ) -> None:
        self._tokens = tokens
        self._before_request = before_request  # a rate budget; may wait or raise
        self._delegation_id = delegation_id
        self._origin = origin(api_base)
        self._cancel = cancel
        self._record = record

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        if origin(request.url) != self._origin:
            raise ForeignOriginError(
                f"refusing to send the delegated token to {request.url.host}: "
                "ctx.http only talks to the provider's API"
            )
        self._cancel.raise_if_cancelled()
        request.read()  # buffer the body so the retry can resend it
        if self._before_request is not None:
            self._before_request()
        call = CallRecord(uuid.uuid4(), request.method, path_template(request.url.path))
        self._record(call)  # durable before anything leaves: a killed worker leaves a trace
        finished = False
        # The durable gate comes last, right before the request leaves: a revoke committed
        # by now is seen here, not after some other I/O.
        try:
            token = self._tokens.current(self._delegation_id)
        except BaseException:
            self._record(CallRecord(call.call_id, call.method, call.path, None, "refused"))
            raise
        request.headers["Authorization"] = f"Bearer {token.value}"
        try:
            response = yield request
            if response.status_code == 401:
                self._record(CallRecord(call.call_id, call.method, call.path, 401, "completed"))
                finished = True
                self._cancel.raise_if_cancelled()
                # Hand back the rejected token: if another worker already refreshed, the
                # source returns that token instead of spending the refresh token again.
                token = self._tokens.refresh(self._delegation_id, rejected=token)
                request.headers["Authorization"] = f"Bearer {token.value}"
                call = CallRecord(uuid.uuid4(), call.method, call.path)
                if self._before_request is not None:
                    self._before_request()
                self._record(call)
                finished = False
                response = yield request
            self._record(CallRecord(call.call_id, call.method, call.path,
                                    response.status_code, "completed"))
            finished = True
        finally:
            if not finished:
                # the transport failed or the request was aborted: the call may have left
                self._record(CallRecord(call.call_id, call.method, call.path, None, "failed"))

    async def async_auth_flow(  # pragma: no cover - ctx.http is synchronous
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        raise RuntimeError("ctx.http is a synchronous client")
        yield request


def build_client(
    *,
    tokens: TokenSource,
    delegation_id: uuid.UUID,
    api_base: str,
    cancel: CancelToken,
    record: CallRecorder,
    transport: httpx.BaseTransport | None = None,
    timeout: float = 30.0,
    before_request: Callable[[], object] | None = None,
) -> httpx.Client:
    """The client a job sees as `ctx.http`; cancelling the run closes its connections."""
    auth = DelegatedBearerAuth(tokens, delegation_id, api_base=api_base, cancel=cancel,
                               record=record, before_request=before_request)
    if transport is None:
        transport, backend = abortable_transport()
        cancel.on_cancel(backend.abort)
    client = httpx.Client(base_url=api_base, auth=auth, transport=transport, timeout=timeout,
                          follow_redirects=False)
    cancel.on_cancel(client.close)
    return client
