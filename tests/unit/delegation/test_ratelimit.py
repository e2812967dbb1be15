"""Per-agent and per-provider request budgets: the gate, and the hooks in jobs and refreshes."""

from __future__ import annotations

import random
import uuid

import fakeredis
import pytest
from prometheus_client import REGISTRY

from delegation.budget import BudgetExhausted, RateBudget
from delegation.clock import FrozenClock
from delegation.kms import LocalKeyFile
from delegation.ratelimit import Limits, RequestGate
from delegation.runs import queue_run
from delegation.store import AgentDirectory
from delegation.vault import Vault
from tests.support.fake_as import API_BASE, FakeAuthServer
from tests.support.world import World
from worker.jobs import JobSpec
from worker.runner import Runner, RunnerConfig

AGENT = uuid.UUID(int=1)
PROVIDER = uuid.UUID(int=2)


class Sleeps:
    def __init__(self, clock: FrozenClock) -> None:
        self.clock = clock
        self.total = 0.0

    def __call__(self, seconds: float) -> None:
        self.total += seconds
        self.clock.advance(seconds)


def sample(name: str, kind: str, purpose: str) -> float:
    return REGISTRY.get_sample_value(name, {"kind": kind, "purpose": purpose}) or 0.0


@pytest.fixture
def sleeps(clock: FrozenClock) -> Sleeps:
    return Sleeps(clock)


@pytest.fixture
def budget(clock: FrozenClock, sleeps: Sleeps) -> RateBudget:
    return RateBudget(fakeredis.FakeRedis(), clock=clock, sleep=sleeps)


def test_the_gate_takes_from_the_agent_and_the_provider_budget_and_reports_waits(
        budget, sleeps):
    gate = RequestGate(budget, Limits(provider_rate=2.0, agent_rate=1.0), purpose="unit")
    waits_before = sample("behalf_rate_budget_wait_seconds_count", "agent", "unit")
    waited_before = sample("behalf_rate_budget_wait_seconds_sum", "agent", "unit")

    waited = [gate.before_request(AGENT, PROVIDER) for _ in range(4)]

    # the agent allows 1/s (burst 1): the 2nd, 3rd and 4th requests wait a second each;
    # the provider's 2/s never makes them wait longer
    assert waited == pytest.approx([0.0, 1.0, 1.0, 1.0])
    assert sleeps.total == pytest.approx(3.0)
    assert sample("behalf_rate_budget_wait_seconds_count", "agent", "unit") - waits_before == 4
    assert sample("behalf_rate_budget_wait_seconds_sum", "agent", "unit") - waited_before \
        == pytest.approx(3.0)


def test_a_budget_that_cannot_admit_in_time_raises_a_retryable_error(budget):
    gate = RequestGate(budget, Limits(provider_rate=0.01, max_wait=5.0), purpose="unit2")
    before = sample("behalf_rate_budget_exhausted_total", "provider", "unit2")
    gate.before_request(AGENT, PROVIDER)
    with pytest.raises(BudgetExhausted) as caught:
        gate.before_request(AGENT, PROVIDER)
    assert caught.value.retryable and caught.value.retry_after == pytest.approx(100.0)
    assert sample("behalf_rate_budget_exhausted_total", "provider", "unit2") - before == 1


def test_no_rate_means_no_budget(clock):
    class NoRedis:
        def register_script(self, script):
            def refuse(**_):
                raise AssertionError("no budget should be consulted")
            return refuse

    gate = RequestGate(RateBudget(NoRedis(), clock=clock, sleep=lambda s: None), Limits())
    assert gate.before_request(AGENT, None) == 0.0


def test_jobs_and_refreshes_go_through_the_gate(sqlite_sessions, clock, tmp_path, sleeps):
    # Given an agent limited to 1 request/s and a job that makes five API calls, one of which
    # meets a 401 (so the token source refreshes once)
    fake_as = FakeAuthServer(ttl=300)
    redis = fakeredis.FakeRedis()
    world = World(sessions=sqlite_sessions, vault=Vault(LocalKeyFile(tmp_path / "k",
                                                                     warn=False)),
                  clock=clock, redis=redis, transport=fake_as.transport())
    world.setup_agent(fake_as.metadata(), API_BASE)
    access, refresh = fake_as.grant("alice", world.client_id)
    user_id, _ = world.add_delegation("alice", world.token_set(access, refresh, 300))
    budget = RateBudget(redis, clock=clock, sleep=sleeps)
    gate = RequestGate(budget, Limits(agent_rate=1.0), purpose="job-test")
    refresh_gate = gate.with_purpose("refresh-test")
    seen: list[tuple[uuid.UUID, uuid.UUID | None]] = []

    def counting_refresh_gate(agent_id, provider_id):
        seen.append((agent_id, provider_id))
        return refresh_gate.before_request(agent_id, provider_id)

    tokens = world.token_source(before_refresh=counting_refresh_gate)

    def job(ctx):
        for i in range(5):
            if i == 2:
                fake_as.expire_access_tokens()
            ctx.http.get("/v2/reports").raise_for_status()

    world.jobs.add(JobSpec(name="busy", agent="reporter", scopes=frozenset({"reports:read"}),
                           function=job))
    with sqlite_sessions.begin() as s:
        run_id = queue_run(s, job="busy", user_id=user_id, agent_id=world.agent_id,
                           now=clock.now()).id
    runner = Runner(sessions=sqlite_sessions, tokens=tokens,
                    agents=AgentDirectory(sqlite_sessions, world.vault), jobs=world.jobs,
                    clock=clock, config=RunnerConfig(worker_id="w"),
                    transport=fake_as.transport(), rng=random.Random(0),
                    before_request=gate.before_request)

    # When it runs
    assert runner.run(run_id) == "succeeded"

    # Then six API requests (five + the resend after the 401) and one refresh, seven in all,
    # were admitted one second apart: six seconds of waiting, none over the budget
    assert len(fake_as.api_calls) == 6 and fake_as.token_requests == 1
    assert seen == [(world.agent_id, world.provider_id)]
    assert sleeps.total == pytest.approx(6.0)
