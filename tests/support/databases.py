"""Real PostgreSQL and Redis for tests: one database per test session (and xdist worker),
migrated with Alembic, emptied after each test; a leak scan over `pg_dump` on request."""

from __future__ import annotations

import base64
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models import Base
from models import migrate as migrations
from models.session import make_engine, make_session_factory
from tests.support.overrides import override
from tests.support.services import unavailable

PG_ADMIN_URL = override("PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = override("REDIS_URL", "redis://127.0.0.1:6379/9")
# the Celery broker of tests that start worker processes (its own database: they flush it)
BROKER_TEST_URL = override("BROKER_URL", "redis://127.0.0.1:6379/8")


def _pg_url(database: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database


def create_database(name: str) -> str:
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        unavailable(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc.orig}")
    finally:
        admin.dispose()
    return _pg_url(name)


def drop_database(name: str) -> None:
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def truncate_all(engine: Engine) -> None:
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """URL of a freshly migrated PostgreSQL database owned by this test session."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"behalf_test_{worker}_{os.getpid()}"
    url = create_database(name)
    engine = make_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    yield url
    drop_database(name)


class LeakScan:
    """Secrets a test stored; after the test, none may appear in a dump of the database."""

    def __init__(self) -> None:
        self.values: list[str] = []

    def register(self, *values: str) -> None:
        self.values.extend(v for v in values if v)

    def forms(self, value: str) -> list[str]:
        raw = value.encode()
        return [value, base64.b64encode(raw).decode(), raw.hex()]

    def check(self, database_url: str) -> None:
        if not self.values:
            return
        dump = subprocess.run(
            ["pg_dump", "--data-only", "--no-owner", database_url.replace("+psycopg", "")],
            check=True, capture_output=True, text=True,
        ).stdout
        for value in self.values:
            for form in self.forms(value):
                assert form not in dump, "a stored secret appears in plaintext in the database"


@pytest.fixture
def leak_scan() -> LeakScan:
    return LeakScan()


@pytest.fixture
def pg_engine(pg_database: str, leak_scan: LeakScan) -> Iterator[Engine]:
    """An engine on the session's PostgreSQL database; every table is emptied afterwards."""
    engine = make_engine(pg_database)
    yield engine
    try:
        leak_scan.check(pg_database)
    finally:
        truncate_all(engine)
        engine.dispose()


@pytest.fixture
def pg_sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)


@pytest.fixture
def sqlite_sessions(tmp_path: object) -> Iterator[sessionmaker[Session]]:
    """A migrated SQLite file (the embedded default), for unit tests of pure data logic."""
    path = os.path.join(str(tmp_path), f"{uuid.uuid4().hex}.sqlite3")
    engine = make_engine(f"sqlite:///{path}")
    migrations.upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis database for the test, flushed before and after."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        unavailable(f"Redis not reachable at {REDIS_TEST_URL}: {exc}")
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()
