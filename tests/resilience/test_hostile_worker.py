"""A real `behalf worker` process on Redis, fed crafted Celery messages published raw with kombu.

Only a JSON wake-up carrying a run id may do anything, and only for a run the row says is due:
an unknown task name, a pickle message (whose unpickling would create a file), malformed ids,
arguments smuggling another user's id, and wake-ups for other users' finished, parked or
cancelled runs all leave every run row as it was. A legitimate wake-up sent after them is
processed by the same worker, which shows it read the hostile ones and survived them.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from kombu import Connection, Exchange, Queue
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from delegation.clock import SystemClock
from delegation.kms import LocalKeyFile
from delegation.runs import queue_run
from delegation.vault import Vault
from models import JobRun, User
from tests.support.databases import BROKER_TEST_URL
from tests.support.processes import Processes
from tests.support.services import unavailable
from tests.support.world import World
from worker.celery_app import QUEUE, RUN_JOB

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def broker() -> Iterator[str]:
    client = redis_lib.Redis.from_url(BROKER_TEST_URL)
    try:
        client.flushdb()
    except redis_lib.exceptions.ConnectionError as exc:
        unavailable(f"Redis not reachable at {BROKER_TEST_URL}: {exc}")
    yield BROKER_TEST_URL
    client.flushdb()
    client.close()


class Evil:
    """Unpickling this creates `path`: the proof that a pickle message was never loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def publish(connection: Connection, task: str, body: bytes, *, content_type: str,
            encoding: str = "utf-8") -> None:
    """One Celery protocol-2 message, as any client of the broker could send it."""
    queue = Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)
    task_id = str(uuid.uuid4())
    with connection.Producer() as producer:
        producer.publish(
            body, exchange=queue.exchange, routing_key=QUEUE, declare=[queue],
            content_type=content_type, content_encoding=encoding,
            headers={"lang": "py", "task": task, "id": task_id, "root_id": task_id,
                     "parent_id": None, "group": None, "retries": 0, "eta": None,
                     "expires": None, "argsrepr": "", "kwargsrepr": "", "origin": "hostile"})


def json_body(args: list[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([args, kwargs or {}, embed]).encode()


def runs(sessions: sessionmaker[Session]) -> dict[uuid.UUID, tuple[str, int]]:
    with sessions() as s:
        return {r.id: (r.status, r.attempts) for r in s.scalars(select(JobRun))}


def test_crafted_messages_run_nothing_and_the_worker_survives_them(
        pg_database: str, pg_sessions: sessionmaker[Session], redis_url: str, broker: str,
        processes: Processes, tmp_path: Path) -> None:
    # Given an agent, two users, bob's runs in every state but due, and one due run of alice
    key_file = tmp_path / "dev-master.key"
    world = World(sessions=pg_sessions, vault=Vault(LocalKeyFile(key_file, warn=False)),
                  clock=SystemClock(), redis=None, transport=httpx.MockTransport(
                      lambda request: httpx.Response(599)))
    world.setup_agent({"issuer": "http://127.0.0.1:9"}, "http://127.0.0.1:9")
    assert world.agent_id is not None
    now = world.clock.now()
    with pg_sessions.begin() as s:
        alice, bob = (User(issuer="http://127.0.0.1:9", subject=n, created_at=now)
                      for n in ("alice", "bob"))
        s.add_all([alice, bob])
        s.flush()
        targets = {}
        for status in ("succeeded", "parked", "cancelled", "failed", "queued"):
            run = queue_run(s, job="slow", user_id=bob.id, agent_id=world.agent_id, now=now)
            run.status = status
            targets[status] = run.id
        control = queue_run(s, job="slow", user_id=alice.id, agent_id=world.agent_id,
                            now=now).id
    before = runs(pg_sessions)
    marker = tmp_path / "unpickled"

    # When a worker receives, in this order, every crafted message
    processes.base_env = {
        "BEHALF_DATABASE_URL": pg_database, "BEHALF_REDIS_URL": redis_url,
        "BEHALF_BROKER_URL": broker, "BEHALF_LOCAL_KEY_FILE": str(key_file),
        "BEHALF_JOBS_MODULES": "tests.support.sample_jobs", "BEHALF_LOG_LEVEL": "INFO",
    }
    worker = processes.start("worker", "--concurrency", "1")
    hostile = 0
    with Connection(broker) as connection:
        crafted: list[tuple[str, bytes, str, str]] = [
            ("behalf.unknown_task", json_body([str(targets["queued"])]), "application/json",
             "utf-8"),
            # a Celery built-in: a worker offers none of them
            ("celery.backend_cleanup", json_body([]), "application/json", "utf-8"),
            (RUN_JOB, pickle.dumps(((str(targets["queued"]),), {"x": Evil(marker)}, {})),
             "application/x-python-serialize", "binary"),
            (RUN_JOB, pickle.dumps(Evil(marker)), "application/x-yaml", "binary"),
            (RUN_JOB, b"\x80\x04not json at all", "application/json", "utf-8"),
            # another user's due run, with a user id smuggled next to it
            (RUN_JOB, json_body([str(targets["queued"])], {"user_id": str(alice.id)}),
             "application/json", "utf-8"),
            (RUN_JOB, json_body([str(targets["queued"]), str(alice.id)]),
             "application/json", "utf-8"),
        ]
        for status in ("succeeded", "parked", "cancelled", "failed"):
            crafted.append((RUN_JOB, json_body([str(targets[status])]), "application/json",
                            "utf-8"))
        for bad in ([], ["not-a-uuid"], [123], [{"$ne": None}], [None],
                    ["'; UPDATE job_runs SET status='queued';--"], [str(uuid.uuid4())],
                    ["x" * 100_000]):
            crafted.append((RUN_JOB, json_body(bad), "application/json", "utf-8"))
        for task, body, content_type, encoding in crafted:
            publish(connection, task, body, content_type=content_type, encoding=encoding)
            hostile += 1
        # and then one legitimate wake-up, for alice's due run.
        publish(connection, RUN_JOB, json_body([str(control)]), content_type="application/json")

    # Then the worker handles the legitimate one (it has no delegation: failed, explained),
    deadline = time.monotonic() + 60
    while runs(pg_sessions)[control] == before[control] and time.monotonic() < deadline:
        assert worker.poll() is None, processes.logs()[-3000:]
        time.sleep(0.25)
    with pg_sessions() as s:
        done = s.get(JobRun, control)
        assert (done.status, done.reason, done.attempts) == ("failed", "no_delegation", 1), \
            processes.logs()[-3000:]
    time.sleep(1)  # anything the hostile messages might still set off
    # and no other run moved, nothing was unpickled, and the worker is still up.
    after = runs(pg_sessions)
    assert {k: v for k, v in after.items() if k != control} == \
        {k: v for k, v in before.items() if k != control}
    assert not marker.exists()
    assert worker.poll() is None
    logs = processes.logs()
    assert "Received unregistered task of type 'behalf.unknown_task'" in logs
    assert "Received unregistered task of type 'celery.backend_cleanup'" in logs
    assert "Refusing to deserialize untrusted content of type pickle" in logs
    assert "Refusing to deserialize untrusted content of type yaml" in logs
    print(f"\ncrafted Celery messages: {hostile}, runs started by them: 0")
