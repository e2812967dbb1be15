import socket
import threading
import time

import httpx
import pytest

from worker.abort import abortable_transport


@pytest.fixture
def silent_server():
    """Accepts a request and never answers (for 10 s)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    stop = threading.Event()

    def serve():
        conn, _ = server.accept()
        conn.recv(1000)
        stop.wait(10)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()


def test_an_in_flight_request_is_aborted_at_once(silent_server):
    transport, backend = abortable_transport()
    client = httpx.Client(transport=transport, timeout=30)
    threading.Timer(0.3, backend.abort).start()
    started = time.monotonic()
    with pytest.raises(httpx.TransportError):
        client.get(silent_server + "/slow")
    assert time.monotonic() - started < 2
    with pytest.raises(httpx.TransportError):
        client.get(silent_server + "/again")  # nothing more leaves after an abort
    client.close()


def test_every_run_shares_one_verifying_tls_context():
    import ssl

    first, _ = abortable_transport()
    second, _ = abortable_transport()
    contexts = [t._pool._ssl_context for t in (first, second)]
    assert contexts[0] is contexts[1]  # built once per process, not per run
    assert contexts[0].verify_mode == ssl.CERT_REQUIRED and contexts[0].check_hostname
