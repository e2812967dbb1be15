"""The scheduler process's loop, on SQLite and the in-memory broker."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading

import pytest
from sqlalchemy import select

from behalf.deps import Deps
from behalf.scheduling import BackgroundRelay, LoopConfig, SchedulerLoop
from behalf.settings import Settings
from delegation.clock import FrozenClock
from models import JobRun, OutboxMessage
from models import migrate as migrations
from tests.support.scheduling import add_schedules, fleet, runs_by_slot


@pytest.fixture
def deps(tmp_path):
    settings = dataclasses.replace(Settings(), database_url=f"sqlite:///{tmp_path}/loop.db",
                                   local_key_file=tmp_path / "key")
    built = Deps.from_settings(settings, clock=FrozenClock(dt.datetime(2026, 5, 1,
                                                                       tzinfo=dt.UTC)))
    migrations.upgrade(built.engine)
    published: list[str] = []
    built.extras["extra_relay_handlers"] = {
        "run.dispatch": lambda payload: published.append(payload["run_id"])}
    built.extras["published"] = published
    built.extras["owns_in_process_services"] = True  # this process is the whole (dev) fleet
    yield built
    built.close()


def test_one_cycle_claims_every_batch_and_relays_every_run(deps):
    f = fleet(deps.sessions, 25, now=deps.clock.now())
    add_schedules(f, cron="0 * * * *", now=deps.clock.now())
    deps.clock.advance(3600)

    cycle = SchedulerLoop(deps, LoopConfig(batch=10, sweep=False)).run_once()

    assert (cycle.claimed, cycle.queued, cycle.relayed) == (25, 25, 25)
    assert sorted(deps.extras["published"]) == sorted(str(r) for r in _run_ids(deps))
    with deps.sessions() as s:
        assert s.scalars(select(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
                         ).all() == []
    assert SchedulerLoop(deps, LoopConfig(batch=10, sweep=False)).run_once().claimed == 0


def test_a_stopped_loop_claims_nothing_and_run_forever_returns(deps):
    f = fleet(deps.sessions, 3, now=deps.clock.now())
    add_schedules(f, cron="0 * * * *", now=deps.clock.now())
    deps.clock.advance(3600)
    loop = SchedulerLoop(deps, LoopConfig(interval=0.01, sweep=False))
    loop.stop()
    assert loop.run_once().claimed == 0
    done = threading.Thread(target=loop.run_forever)
    done.start()
    done.join(5)
    assert not done.is_alive() and runs_by_slot(deps.sessions) == {}


def test_the_background_relay_makes_a_last_pass_and_hands_back_its_error():
    calls: list[int] = []
    relay = BackgroundRelay(lambda: calls.append(1) or 2)
    relay.start()
    relay.poke()
    assert relay.finish() == 2 * len(calls) and len(calls) >= 1

    def broken() -> int:
        raise RuntimeError("database gone")

    failing = BackgroundRelay(broken)
    failing.start()
    with pytest.raises(RuntimeError, match="database gone"):
        failing.finish()


def _run_ids(deps):
    with deps.sessions() as s:
        return s.scalars(select(JobRun.id)).all()
