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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def make_delegations(sessions: Any, vault: Vault, api_base: str, n: int, *,
                     agent_name: str = "bench-agent", ttl: float = 24 * 3600,
                     metadata: dict[str, Any] | None = None,
                     credentials: ClientCredentials | None = None) -> list[tuple[Any, Any]]:
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
    return [(u, d, agent_id) for u, d in out]  # type: ignore[misc]


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
