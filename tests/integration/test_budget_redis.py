"""The shared rate budget on a real Redis (its own Lua 5.1, its own atomicity).

Uses database 15 at 127.0.0.1:6379 and deletes only the keys it made.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from delegation.budget import BudgetExhausted, RateBudget, budget_key
from delegation.clock import FrozenClock, SystemClock
from tests.support.services import unavailable

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/15"
START = datetime(2026, 1, 1, tzinfo=UTC)
T0_MS = START.timestamp() * 1000


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        client.close()
        unavailable(f"Redis not reachable at {REDIS_URL}: {exc}")
    yield client
    client.close()


@pytest.fixture
def key(client: redis.Redis) -> Iterator[str]:
    name = budget_key("provider", f"test-{uuid.uuid4().hex}")
    client.delete(name)
    yield name
    client.delete(name)


def test_gcra_on_real_redis(client: redis.Redis, key: str):
    budget = RateBudget(client, clock=FrozenClock(START), sleep=time.sleep)
    assert [budget.try_acquire(key, 2, 3, T0_MS) for _ in range(5)] == [0.0, 0.0, 0.0, 0.5, 0.5]
    assert budget.try_acquire(key, 2, 3, T0_MS + 500) == 0.0
    # Real Redis keeps the microsecond epoch exactly (Lua 5.1 doubles, formatted as %d).
    assert int(client.get(key) or 0) == round(T0_MS) * 1000 + 4 * 500_000
    assert 0 < client.pttl(key) <= 2001


def test_concurrent_requests_at_one_instant_admit_exactly_the_burst(client: redis.Redis, key: str):
    # Given 16 workers hammering a budget of burst 7 at one frozen instant,
    admitted = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal admitted
        own = redis.Redis.from_url(REDIS_URL)
        budget = RateBudget(own, clock=FrozenClock(START), sleep=time.sleep)
        mine = sum(budget.try_acquire(key, 1, 7, T0_MS) == 0.0 for _ in range(20))
        own.close()
        with lock:
            admitted += mine

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then the script's atomicity lets exactly 7 through, out of 320 attempts.
    assert admitted == 7


class RecordingClock(SystemClock):
    """The real clock, remembering the wall times it handed to the budget."""

    def __init__(self) -> None:
        self.seen: list[datetime] = []

    def now(self) -> datetime:
        moment = super().now()
        self.seen.append(moment)
        return moment


def test_threads_sharing_a_budget_for_a_second(client: redis.Redis, key: str):
    # Given 8 workers sharing 50 requests/s with a burst of 10, each acquiring as fast as it
    # can for about a second on the real clock,
    rate, burst, workers = 50, 10, 8
    admitted_at: list[datetime] = []
    asked_at: list[datetime] = []
    lock = threading.Lock()
    barrier = threading.Barrier(workers + 1)
    deadline = 0.0

    def worker() -> None:
        own = redis.Redis.from_url(REDIS_URL)
        clock = RecordingClock()
        budget = RateBudget(own, clock=clock, sleep=time.sleep)
        mine = []
        barrier.wait()
        while (left := deadline - clock.monotonic()) > 0:
            try:
                budget.acquire(key, rate, burst, timeout=left)
            except BudgetExhausted:
                break
            mine.append(clock.seen[-1])  # the wall time of the admitted request
        own.close()
        with lock:
            admitted_at.extend(mine)
            asked_at.extend(clock.seen)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1.0
    barrier.wait()
    for t in threads:
        t.join()
    # Then never more went through than the budget allows over the span of the requests
    # (burst + rate x span), and about rate x 1 s + burst did.
    span = (max(admitted_at) - min(asked_at)).total_seconds()
    assert span < 1.1
    assert len(admitted_at) <= burst + int(rate * span)
    assert len(admitted_at) >= burst + int(rate * 0.8)
