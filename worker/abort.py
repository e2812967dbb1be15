"""An HTTP transport whose in-flight requests can be aborted from another thread.

Closing an httpx client does not wake a thread blocked reading a response (close(2) on a socket
another thread is reading leaves that read blocked); `shutdown(2)` does. The backend records the
sockets it opens so a revocation can shut them down and the job's request fails at once.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import threading
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx


class AbortableBackend(httpcore.SyncBackend):
    def __init__(self) -> None:
        super().__init__()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.aborted = False

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        if self.aborted:
            raise httpcore.ConnectError("aborted")
        stream = super().connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                     socket_options=socket_options)
        sock = stream.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sockets.add(sock)
        return stream

    def abort(self) -> None:
        """Shut down every socket this backend opened: blocked reads return at once."""
        with self._lock:
            self.aborted = True
            sockets = list(self._sockets)
            self._sockets.clear()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@functools.cache
def _shared_tls() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle (~17 ms), which per run
    was a third of a short job's time. SSLContext is safe to share between threads."""
    return httpx.create_ssl_context()


def abortable_transport() -> tuple[httpx.HTTPTransport, AbortableBackend]:
    transport = httpx.HTTPTransport(verify=_shared_tls())
    backend = AbortableBackend()
    # httpx builds its httpcore pool itself; hand that pool our backend (pinned httpx; a test
    # proves a blocked request is aborted, so an upgrade that changes this fails loudly).
    transport._pool._network_backend = backend
    return transport, backend
