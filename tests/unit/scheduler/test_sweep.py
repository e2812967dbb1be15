"""The refresh sweep on SQLite + fakeredis + the in-memory AS."""

from __future__ import annotations

import datetime as dt
import random

import fakeredis
import httpx
import pytest
from sqlalchemy import select, update

from delegation.budget import RateBudget
from delegation.clock import FrozenClock
from delegation.kms import LocalKeyFile
from delegation.lease import Lease
from delegation.vault import Vault
from models import Delegation, Schedule
from scheduler import schedules
from scheduler.schedules import ScheduleSpec
from scheduler.sweep import LEASE_KEY, RefreshSweep, SweepConfig
from tests.support.fake_as import API_BASE, FakeAuthServer
from tests.support.world import World

START = dt.datetime(2026, 5, 1, 1, 50, tzinfo=dt.UTC)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(START)


@pytest.fixture
def fake_as() -> FakeAuthServer:
    return FakeAuthServer(ttl=3600)


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def world(sqlite_sessions, clock, tmp_path, fake_as, redis) -> World:
    w = World(sessions=sqlite_sessions, vault=Vault(LocalKeyFile(tmp_path / "k", warn=False)),
              clock=clock, redis=redis, transport=fake_as.transport())
    w.setup_agent(fake_as.metadata(), API_BASE)
    return w


def connect(world: World, fake_as: FakeAuthServer, subject: str, *, ttl: float,
            schedule_at: str | None = None, granted_days_ago: float = 0):
    access, refresh = fake_as.grant(subject, world.client_id)
    user_id, delegation_id = world.add_delegation(subject, world.token_set(access, refresh, ttl))
    now = world.clock.now()
    with world.sessions.begin() as s:
        if granted_days_ago:
            s.execute(update(Delegation).where(Delegation.id == delegation_id).values(
                granted_at=now - dt.timedelta(days=granted_days_ago)))
        if schedule_at is not None:
            schedules.create(s, ScheduleSpec(user_id=user_id, agent_id=world.agent_id,
                                             job="nightly", cron=schedule_at),
                             now=now, operator="test")
    return delegation_id


def sweep(world: World, redis, *, jitter: bool = False, sleep=None, **config) -> RefreshSweep:
    budget = RateBudget(redis, clock=world.clock, sleep=sleep or world.clock.advance)
    return RefreshSweep(sessions=world.sessions, tokens=world.token_source(), budget=budget,
                        redis=redis, clock=world.clock, config=SweepConfig(**config),
                        rng=random.Random(7), jitter=jitter)


def refreshed(world: World) -> set:
    with world.sessions() as s:
        return set(s.scalars(select(Delegation.id).where(Delegation.refreshed_at.is_not(None))))


def test_it_refreshes_tokens_a_run_is_about_to_need_and_leaves_the_others(world, fake_as,
                                                                           redis):
    # the nightly 02:00 run is in 10 minutes
    needed = connect(world, fake_as, "needed", ttl=300, schedule_at="0 2 * * *")
    fresh_enough = connect(world, fake_as, "fresh", ttl=7200, schedule_at="0 2 * * *")
    nobody_needs = connect(world, fake_as, "idle-soon", ttl=300)
    later = connect(world, fake_as, "later", ttl=300, schedule_at="0 5 * * *")

    result = sweep(world, redis).run_once()

    assert result.ran and result.outcomes == {"refreshed": 1}
    assert refreshed(world) == {needed}
    assert fake_as.token_requests == 1
    assert {fresh_enough, nobody_needs, later}.isdisjoint(refreshed(world))
    # refreshed once: the next pass does not refresh it again
    assert sweep(world, redis).run_once().outcomes == {}


def test_it_refreshes_delegations_idle_for_a_day(world, fake_as, redis, clock):
    idle = connect(world, fake_as, "idle", ttl=7200, granted_days_ago=1.5)
    recent = connect(world, fake_as, "recent", ttl=7200, granted_days_ago=0.5)
    assert sweep(world, redis).run_once().outcomes == {"refreshed": 1}
    assert refreshed(world) == {idle}

    clock.advance(86400)  # a day later both are idle (the first one since its refresh)
    assert sweep(world, redis).run_once().outcomes == {"refreshed": 2}
    assert recent in refreshed(world)


def test_a_dead_refresh_token_breaks_the_delegation_and_nothing_else(world, fake_as, redis):
    dead = connect(world, fake_as, "dead", ttl=7200, granted_days_ago=2)
    fake_as.kill("dead")
    assert sweep(world, redis).run_once().outcomes == {"unusable": 1}
    with world.sessions() as s:
        row = s.get(Delegation, dead)
        assert (row.status, row.status_reason) == ("broken", "invalid_grant")


def test_refreshes_are_bounded_per_provider_per_pass_and_by_its_rate(world, fake_as, redis,
                                                                      clock):
    for i in range(10):
        connect(world, fake_as, f"u{i}", ttl=7200, granted_days_ago=2)

    capped = sweep(world, redis, per_provider=3).run_once()
    assert capped.outcomes == {"refreshed": 3, "deferred": 7}

    # a rate of 1/s with no waiting allowed: one (the burst) per pass
    clock.advance(10)  # let the budget refill after the first pass
    rated = sweep(world, redis, provider_rate=1.0, max_wait=0.0).run_once()
    assert rated.outcomes == {"refreshed": 1, "deferred": 6}
    clock.advance(1.0)
    assert sweep(world, redis, provider_rate=1.0, max_wait=0.0).run_once().outcomes == {
        "refreshed": 1, "deferred": 5}
    assert fake_as.token_requests == 5


def test_waiting_on_the_budget_spreads_the_refreshes_out(world, fake_as, redis, clock):
    for i in range(4):
        connect(world, fake_as, f"u{i}", ttl=7200, granted_days_ago=2)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    result = sweep(world, redis, provider_rate=2.0, max_wait=5.0, sleep=sleep).run_once()
    assert result.outcomes == {"refreshed": 4}
    assert sum(slept) == pytest.approx(1.0)  # burst of 2, then two more at 2/s


def test_only_one_scheduler_sweeps_at_a_time(world, fake_as, redis):
    connect(world, fake_as, "idle", ttl=7200, granted_days_ago=2)
    other = Lease(redis, LEASE_KEY, 60_000)
    assert other.acquire()
    assert sweep(world, redis).run_once().ran is False
    other.release()
    assert sweep(world, redis).run_once().outcomes == {"refreshed": 1}


def test_jitter_spreads_refreshes_over_the_lookahead(world, fake_as, redis, clock):
    # 40 delegations whose runs are spread over the next 15 minutes
    for i in range(40):
        connect(world, fake_as, f"u{i}", ttl=60, schedule_at="0 2 * * *")
    with world.sessions.begin() as s:
        rows = s.scalars(select(Schedule)).all()
        for i, row in enumerate(rows):
            row.next_run_at = clock.now() + dt.timedelta(seconds=20 * (i + 1))
    first = sweep(world, redis, jitter=True, lookahead=dt.timedelta(minutes=15)).run_once()
    # every run within 7.5 minutes is refreshed now, some of the later ones, not all
    assert 22 <= first.outcomes["refreshed"] < 40


def test_a_delegation_whose_refresh_fails_is_left_out_for_a_while(world, fake_as, redis,
                                                                   clock):
    failing = connect(world, fake_as, "down", ttl=7200, granted_days_ago=2)
    fake_as.faults.extend([httpx.Response(503, headers={"Retry-After": "30"})])
    assert sweep(world, redis).run_once().outcomes == {"retry_later": 1}
    assert sweep(world, redis).run_once().outcomes == {}  # backing off: not asked again
    redis.delete(f"behalf:refresh-sweep:backoff:{failing}")  # (as when the key expires)
    assert sweep(world, redis).run_once().outcomes == {"refreshed": 1}
    assert fake_as.token_requests == 2


def test_a_pass_stops_when_the_scheduler_stops(world, fake_as, redis):
    for i in range(5):
        connect(world, fake_as, f"u{i}", ttl=7200, granted_days_ago=2)
    asked = []

    def stopping() -> bool:
        asked.append(1)
        return len(asked) > 2

    assert sweep(world, redis).run_once(stopping=stopping).outcomes == {"refreshed": 2}
