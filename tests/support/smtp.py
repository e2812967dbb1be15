"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, keeping every mail it accepts.

`smtp_server` starts one for a test on a free port; `stop()` and `start()` take it down and
bring it back on the same port (an outage). `SmtpServer(tls=True)` offers STARTTLS with a
self-signed certificate made for 127.0.0.1, requires it, and requires AUTH (`USER` /
`PASSWORD`); `client_context()` is an SSL context that trusts that certificate. aiosmtpd
missing skips locally and fails in CI.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.services import unavailable

USER = "behalf-mailer"
PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, pem


class _Collect:
    def __init__(self, server: SmtpServer) -> None:
        self._server = server

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.original_content,
                                           policy=email.policy.default)
        with self._server.lock:
            self._server.messages.append(message)  # type: ignore[arg-type]
            self._server.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"


class SmtpServer:
    def __init__(self, *, tls: bool = False) -> None:
        self.port = free_port()
        self.tls = tls
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()
        self._controller: Any = None
        self._dir = Path(tempfile.mkdtemp(prefix="behalf-smtp-"))
        self._pem = b""
        if tls:
            self._cert, self._key, self._pem = _self_signed(self._dir)

    @property
    def url(self) -> str:
        if self.tls:
            return f"smtp://{USER}:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{self.port}" \
                   "?starttls=true&timeout=5"
        return f"smtp://127.0.0.1:{self.port}?timeout=5"

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self._pem.decode())

    def start(self) -> None:
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import AuthResult, LoginPassword
        except ImportError as exc:
            unavailable(f"aiosmtpd is missing: {exc}")
        options: dict[str, Any] = {}
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._cert, self._key)

            def authenticate(_server: Any, _session: Any, _envelope: Any, _mechanism: str,
                             data: Any) -> Any:
                ok = (isinstance(data, LoginPassword) and data.login == USER.encode()
                      and data.password == PASSWORD.encode())
                return AuthResult(success=ok)

            options = {"tls_context": context, "require_starttls": True,
                       "authenticator": authenticate, "auth_required": True,
                       "auth_require_tls": True}
        self._controller = Controller(_Collect(self), hostname="127.0.0.1", port=self.port,
                                      ready_timeout=10, **options)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for(self, count: int, timeout: float = 10.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} mails, got {len(self.messages)}")
            time.sleep(0.02)


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tls_smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer(tls=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
