"""Shared pieces of the benchmarks: scratch databases, a fast local API, a world of delegations
with long-lived fabricated tokens (no AS round trip unless a benchmark wants one), statistics."""

from __future__ import annotations

import datetime as dt
import http.server
import os
import statistics
import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text

from delegation.tokens import ClientCredentials, TokenSet
from delegation.vault import Vault, agent_context, delegation_context
from models import Agent, Delegation, Provider, User
from models import migrate as migrations
from models.session import make_engine

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def scratch_database(name: str) -> str:
    admin = make_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    engine = make_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    return url


def drop_database(name: str) -> None:
    admin = make_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class FastApi(http.server.ThreadingHTTPServer):
    """A local API answering 200 to everything, counting requests (loopback only)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests = 0
        self.lock = threading.Lock()

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body leave as they are written

            def do_GET(self) -> None:
                with server.lock:
                    server.requests += 1
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client killed mid-request (a terminated task) is expected here, not news."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def make_delegations(sessions: Any, vault: Vault, api_base: str, n: int, *,
                     agent_name: str = "bench-agent", ttl: float = 24 * 3600,
                     metadata: dict[str, Any] | None = None,
                     credentials: ClientCredentials | None = None
                     ) -> list[tuple[Any, Any, Any]]:
    """n users, each with an active delegation holding fabricated long-lived tokens."""
    now = dt.datetime.now(dt.UTC)
    metadata = metadata or {"issuer": "http://127.0.0.1:9", "authorization_endpoint":
                            "http://127.0.0.1:9/a", "token_endpoint": "http://127.0.0.1:9/t"}
    credentials = credentials or ClientCredentials("bench-client", "client_secret_basic",
                                                   secret="bench")
    out = []
    with sessions.begin() as s:
        provider = Provider(name="bench", issuer=metadata["issuer"], discovered=metadata,
                            api_base=api_base, created_at=now)
        s.add(provider)
        s.flush()
        agent = Agent(name=agent_name, environment="bench", provider_id=provider.id,
                      client_id=credentials.client_id, auth_method=credentials.auth_method,
                      scopes=["reports:read"], required_scopes=[], created_at=now,
                      updated_at=now)
        s.add(agent)
        s.flush()
        sealed = vault.seal(credentials.to_bytes(), agent_context(agent.id))
        agent.credential_blob, agent.credential_wrapped_key, agent.credential_key_id = (
            sealed.blob, sealed.wrapped_key, sealed.key_id)
        for i in range(n):
            user = User(issuer=metadata["issuer"], subject=f"bench-{i}", created_at=now)
            s.add(user)
            s.flush()
            tokens = TokenSet(f"at-{uuid.uuid4().hex}", f"rt-{uuid.uuid4().hex}",
                              now + dt.timedelta(seconds=ttl), now, ("reports:read",))
            row = Delegation(id=uuid.uuid4(), user_id=user.id, agent_id=agent.id,
                             requested_scopes=["reports:read"], granted_scopes=["reports:read"],
                             granted_at=now, access_expires_at=tokens.expires_at,
                             created_at=now, updated_at=now)
            sealed = vault.seal(tokens.to_bytes(), delegation_context(user.id, row.id, agent.id))
            row.token_blob, row.wrapped_key, row.key_id = (sealed.blob, sealed.wrapped_key,
                                                           sealed.key_id)
            s.add(row)
            out.append((user.id, row.id))
        agent_id = agent.id
    return [(u, d, agent_id) for u, d in out]


def start_worker(env: dict[str, str], concurrency: int, log: Path,
                 *extra: str) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BEHALF_")}
    environ.update(env)
    environ["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "behalf.cli", "worker", "--concurrency", str(concurrency),
         *extra], cwd=ROOT, env=environ, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    return {
        "n": n,
        "median": statistics.median(ordered),
        "p99": ordered[min(n - 1, max(0, round(0.99 * n) - 1))],
        "min": ordered[0],
        "max": ordered[-1],
        "stdev": statistics.pstdev(ordered) if n > 1 else 0.0,
    }


# --- a fast local authorisation server (token endpoint only) ---------------------------------

TOKEN_CLIENT = ClientCredentials("bench-client", "client_secret_basic", secret="bench")


def serve_token_endpoint(lifetime: float) -> None:
    """The token endpoint's process: rotating refresh tokens, reuse detection, counters.

    A refresh token it has never seen is accepted once (the fabricated ones of
    `make_delegations`); a spent one is refused with `invalid_grant` and counted as reuse.
    Runs in its own process so the benchmark's client does not share a GIL with it. Prints
    its port, then serves until its stdin closes (the benchmark ended, or died) or
    `lifetime` seconds have passed.
    """
    import base64
    import json
    import secrets
    from urllib.parse import parse_qsl

    expected_auth = "Basic " + base64.b64encode(
        f"{TOKEN_CLIENT.client_id}:{TOKEN_CLIENT.secret}".encode()).decode()
    spent: set[str] = set()
    counters = {"refresh": 0, "reused": 0, "refused": 0}
    config: dict[str, Any] = {"expires_in": 3600}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def answer(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # /stats
            with lock:
                doc = dict(counters)
            self.answer(200, doc)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/config":
                with lock:
                    config.update(json.loads(raw))
                self.answer(200, config)
                return
            form = dict(parse_qsl(raw.decode()))
            if self.headers.get("Authorization") != expected_auth:
                self.answer(401, {"error": "invalid_client"})
                return
            token = form.get("refresh_token", "")
            with lock:
                if form.get("grant_type") != "refresh_token" or not token:
                    counters["refused"] += 1
                    status, doc = 400, {"error": "invalid_request"}
                elif token in spent:
                    counters["reused"] += 1
                    status, doc = 400, {"error": "invalid_grant",
                                        "error_description": "refresh token already used"}
                else:
                    spent.add(token)
                    counters["refresh"] += 1
                    status, doc = 200, {"access_token": "at-" + secrets.token_hex(16),
                                        "token_type": "Bearer",
                                        "expires_in": config["expires_in"],
                                        "refresh_token": "rt-" + secrets.token_hex(16),
                                        "scope": "reports:read"}
            self.answer(status, doc)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    stdin_closed = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stdin_closed.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    stdin_closed.wait(lifetime)
    server.shutdown()


class TokenEndpoint:
    """Handle on the token endpoint process: its URL, its counters, its settings."""

    def __init__(self, lifetime: float = 1800.0) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("BEHALF_")}
        environ["PYTHONPATH"] = str(ROOT)
        self._process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from bench.common import serve_token_endpoint; "
             "serve_token_endpoint(float(sys.argv[1]))", str(lifetime)],
            cwd=ROOT, env=environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._process.stdout is not None
        self.port = int(self._process.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_url = self.url + "/token"

    @property
    def metadata(self) -> dict[str, Any]:
        return {"issuer": self.url, "authorization_endpoint": self.url + "/authorize",
                "token_endpoint": self.token_url}

    def stats(self) -> dict[str, int]:
        import httpx

        return dict(httpx.get(self.url + "/stats").json())

    def issue_lifetime(self, seconds: int) -> None:
        """`expires_in` of the tokens it issues from now on (0: due for refresh at once)."""
        import httpx

        httpx.post(self.url + "/config", json={"expires_in": seconds}).raise_for_status()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
