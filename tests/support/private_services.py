"""Private PostgreSQL and Redis servers that a test may restart (the shared ones never are).

Other people's tests use the shared PostgreSQL (5432) and Redis (6379) at the same moment, so a
test that restarts a service starts its own. `PrivatePostgres`: initdb + pg_ctl in a temporary
directory, trust auth, 127.0.0.1 only, fsync off (that only matters if the machine crashes),
commits synchronous as in production, so a restart keeps every commit. `PrivateRedis`:
`redis-server` on a free loopback port. PostgreSQL refuses to run as root (CI runs as root), so
there it runs as the `postgres` OS user through `runuser`, in a directory that user owns.
`FaultyKms`: moto's KMS on a loopback port, failing on request.

Redis is configured as production runs it (docker-compose.yml): an append-only file, so queued
Celery messages survive a restart. Both stop themselves when the fixture ends.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.services import unavailable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class PrivatePostgres:
    """A throwaway PostgreSQL cluster; `restart()` stops it (immediate: a crash) and starts it."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = found[-1] if found else shutil.which("initdb")
        if initdb is None:
            unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self._bin = Path(initdb).parent
        self._as_root = os.geteuid() == 0
        if self._as_root and shutil.which("runuser") is None:
            unavailable("running PostgreSQL as root needs runuser (util-linux)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="behalf-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        command = [str(self._bin / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                cwd=self.dir, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stderr or result.stdout}\n"
                               f"{self.log.read_text() if self.log.exists() else ''}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def restart(self, *, down_for: float = 0.0) -> None:
        """Crash (immediate stop: every connection cut) and come back after `down_for`."""
        self.stop("immediate")
        time.sleep(down_for)
        self.start()

    def create_database(self, name: str) -> str:
        from sqlalchemy import text

        from models.session import make_engine

        engine = make_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A `redis-server` of our own; `restart()` stops it (SIGTERM, as an orchestrator does) and
    starts it again on the same port, with what its append-only file kept."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self._binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="behalf-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        self._process = subprocess.Popen(
            [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.dir), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
             "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if not _wait_for_port(self.port, 10):
            self.stop()
            raise RuntimeError("private redis-server did not start:\n"
                               + (self.dir / "server.log").read_text())

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._process = None

    def restart(self, *, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


class FaultyKms:
    """AWS KMS (moto's, in a thread of the test process) on a loopback port, whose answers a
    test can turn into `KMSInternalException` / `ThrottlingException` for a while."""

    def __init__(self) -> None:
        try:
            from moto.moto_server.werkzeug_app import (
                DomainDispatcherApplication,
                create_backend_app,
            )
            from werkzeug.serving import WSGIRequestHandler, make_server
        except ImportError as exc:
            unavailable(f"moto[server] is missing: {exc}")

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass
        self._inner = DomainDispatcherApplication(create_backend_app)
        self._failing_until = 0.0
        self._lock = threading.Lock()
        self.failures = 0
        self.calls = 0
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True,
                                   request_handler=Quiet)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-kms",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_for(self, seconds: float) -> None:
        with self._lock:
            self._failing_until = time.monotonic() + seconds

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self._lock:
            self.calls += 1
            failing = time.monotonic() < self._failing_until
            if failing:
                self.failures += 1
                throttle = self.failures % 2 == 0
        if not failing:
            return self._inner(environ, start_response)
        code = "ThrottlingException" if throttle else "KMSInternalException"
        body = json.dumps({"__type": code, "message": "injected KMS fault"}).encode()
        start_response("400 Bad Request" if throttle else "500 Internal Server Error",
                       [("Content-Type", "application/x-amz-json-1.1"),
                        ("Content-Length", str(len(body)))])
        return [body]

    def client(self) -> Any:
        import boto3

        return boto3.client("kms", region_name="us-east-1", endpoint_url=self.url,
                            aws_access_key_id="test", aws_secret_access_key="test")

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def faulty_kms() -> Iterator[FaultyKms]:
    server = FaultyKms()
    try:
        yield server
    finally:
        server.stop()
