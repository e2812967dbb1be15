"""Real `behalf worker` processes on Redis, PostgreSQL and the real AS."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from delegation import outbox
from delegation.clock import SystemClock
from delegation.kms import LocalKeyFile
from delegation.runs import queue_run
from delegation.vault import Vault
from models import Delegation, JobRun
from tests.support.databases import BROKER_TEST_URL
from tests.support.real_world import connect_user, make_world, register_agent
from worker.celery_app import create_celery, publish_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BROKER = BROKER_TEST_URL


@pytest.fixture
def broker():
    client = redis_lib.Redis.from_url(BROKER)
    client.flushdb()
    yield BROKER
    client.flushdb()
    client.close()


@pytest.fixture
def key_file(tmp_path):
    return tmp_path / "dev-master.key"


@pytest.fixture
def worker_env(pg_database, redis_url, broker, key_file):
    return {
        "BEHALF_DATABASE_URL": pg_database,
        "BEHALF_REDIS_URL": redis_url,
        "BEHALF_BROKER_URL": broker,
        "BEHALF_LOCAL_KEY_FILE": str(key_file),
        "BEHALF_JOBS_MODULES": "tests.support.sample_jobs",
        "BEHALF_LOG_LEVEL": "WARNING",
    }


def publish_pending(sessions, broker_url):
    app = create_celery(broker_url)
    return outbox.relay_once(sessions, {outbox.RUN_DISPATCH: lambda p: publish_run(app, p)},
                             SystemClock(), batch=10_000)


def queue_and_publish(world, users, job, sessions, env):
    """One run of `job` per user, handed to the workers; their ids."""
    with world.sessions.begin() as s:
        runs = [queue_run(s, job=job, user_id=u, agent_id=world.agent_id,
                          now=world.clock.now()).id for u in users]
    publish_pending(sessions, env["BEHALF_BROKER_URL"])
    return runs


def wait_until(predicate, timeout, interval=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


USERS = 100
JOB_SECONDS = 20  # four access-token lifetimes per job; 100 jobs on 16 processes: ~2 minutes


@pytest.mark.timeout(540)
def test_worker_processes_refresh_many_short_lived_delegations_without_a_single_invalid_grant(
    pg_sessions, pg_engine, redis_url, key_file, worker_env, processes, oidc_provider_factory,
):
    # Given 100 users connected through an AS issuing 5-second access tokens (rotating refresh
    # tokens with reuse detection: a refresh token used twice revokes the grant)
    provider = oidc_provider_factory(access_token_ttl=5)
    vault = Vault(LocalKeyFile(key_file, warn=False))
    world = make_world(pg_sessions, vault, redis_url, provider)
    credentials, endpoints = register_agent(world, provider)
    users = [connect_user(world, provider, credentials, endpoints, f"user{i}")[0]
             for i in range(USERS)]
    provider.reset_stats()
    # And two worker processes with eight job processes each
    processes.base_env = dict(worker_env, SAMPLE_JOB_STRESS_SECONDS=str(JOB_SECONDS))
    for _ in range(2):
        processes.start("worker", "--concurrency", "8")
    # When every user's job calls the API for 20 s, needing a fresh token every 2.5 s
    started = time.monotonic()
    runs = queue_and_publish(world, users, "stress", pg_sessions, worker_env)

    def finished():
        with pg_sessions() as s:
            return s.scalar(select(func.count()).select_from(JobRun)
                            .where(JobRun.status.in_(["queued", "running"]))) == 0

    if not wait_until(finished, 420, interval=1.0):
        with pg_sessions() as s:
            rows = s.execute(select(JobRun.status, JobRun.reason, JobRun.detail)).all()
        pytest.fail(f"runs did not finish: {rows[:5]}\n{processes.logs()[-3000:]}")
    elapsed = time.monotonic() - started
    # Then every run succeeded, nothing broke, and the AS never saw a refresh token reused
    with pg_sessions() as s:
        statuses = s.execute(select(JobRun.status, func.count()).group_by(JobRun.status)).all()
        broken = s.scalar(select(func.count()).select_from(Delegation)
                          .where(Delegation.status != "active"))
    assert dict(statuses) == {"succeeded": len(runs)}, processes.logs()[-3000:]
    assert broken == 0
    refreshes = [r for r in provider.stats()["requests"] if r.get("grant_type") == "refresh_token"]
    assert [r for r in refreshes if r["status"] != 200] == []
    calls = provider.api_calls()
    assert all(c["status"] == 200 for c in calls)
    # every job outlived several tokens: at least three refreshes per delegation
    assert len(refreshes) >= 3 * USERS, len(refreshes)
    print(f"\nstress: {USERS} delegations, {len(runs)} runs in {elapsed:.0f} s, "
          f"{len(refreshes)} refreshes, {len(calls)} API calls, 0 invalid_grant, 0 broken")


def test_a_duplicate_delivery_runs_the_job_body_once(
    pg_sessions, redis_url, key_file, worker_env, processes, oidc_provider
):
    vault = Vault(LocalKeyFile(key_file, warn=False))
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    user_id, _, _ = connect_user(world, oidc_provider, credentials, endpoints, "alice")
    oidc_provider.reset_api_calls()
    processes.base_env = dict(worker_env, SAMPLE_JOB_SLOW_SECONDS="1")
    processes.start("worker", "--concurrency", "2")
    with world.sessions.begin() as s:
        run_id = queue_run(s, job="slow", user_id=user_id, agent_id=world.agent_id,
                           now=world.clock.now()).id
    app = create_celery(worker_env["BEHALF_BROKER_URL"])
    for _ in range(3):  # the same wake-up delivered three times
        publish_run(app, {"run_id": str(run_id)})

    def done():
        with pg_sessions() as s:
            return s.get(JobRun, run_id).status == "succeeded"

    assert wait_until(done, 60), processes.logs()[-3000:]
    time.sleep(2)  # give the duplicates time to (not) run
    calls = oidc_provider.api_calls()
    assert [c["path"] for c in calls] == ["/v2/reports", "/v2/calendar"]
    with pg_sessions() as s:
        assert s.get(JobRun, run_id).attempts == 1


def test_a_run_whose_worker_process_is_sigkilled_completes_exactly_once(
    pg_sessions, redis_url, key_file, worker_env, processes, oidc_provider
):
    import os
    import signal

    from tests.integration.test_revocation import child_pids

    vault = Vault(LocalKeyFile(key_file, warn=False))
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    user_id, _, _ = connect_user(world, oidc_provider, credentials, endpoints, "alice")
    oidc_provider.reset_api_calls()
    # Given a worker with short run leases, and a scheduler that recovers lost runs
    processes.base_env = dict(worker_env, SAMPLE_JOB_SLOW_SECONDS="4",
                              BEHALF_RUN_LEASE_SECONDS="2")
    worker = processes.start("worker", "--concurrency", "1")
    processes.start("scheduler", "--interval", "1s", "--no-sweep")
    with world.sessions.begin() as s:
        run_id = queue_run(s, job="slow", user_id=user_id, agent_id=world.agent_id,
                           now=world.clock.now()).id
    # When the job process is SIGKILLed after its first call, in the middle of its run
    assert wait_until(lambda: len(oidc_provider.api_calls()) >= 1, 60), processes.logs()[-2000:]
    (child,) = child_pids(worker.pid)
    os.kill(child, signal.SIGKILL)

    # Then the run is recovered after its lease and completes, once
    def succeeded():
        with pg_sessions() as s:
            return s.get(JobRun, run_id).status == "succeeded"

    assert wait_until(succeeded, 90), processes.logs()[-3000:]
    time.sleep(2)
    with pg_sessions() as s:
        row = s.get(JobRun, run_id)
        assert (row.status, row.attempts) == ("succeeded", 2)
    paths = [c["path"] for c in oidc_provider.api_calls()]
    assert paths.count("/v2/calendar") == 1  # the second half ran once, in the second attempt
    assert paths.count("/v2/reports") == 2  # the first attempt's call, then the retry's
    assert worker.poll() is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_prefork_worker_serves_the_budget_waits_of_its_job_processes(
    pg_sessions, redis_url, key_file, worker_env, processes, oidc_provider, tmp_path
):
    # Given an agent budget of 2 requests/s and a worker whose job processes report metrics
    vault = Vault(LocalKeyFile(key_file, warn=False))
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    users = [connect_user(world, oidc_provider, credentials, endpoints, f"user{i}")[0]
             for i in range(2)]
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # a previous worker's file
    processes.base_env = dict(worker_env, SAMPLE_JOB_STRESS_SECONDS="3",
                              BEHALF_AGENT_RATE_LIMIT="2",
                              PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    processes.start("worker", "--concurrency", "2", "--metrics-port", str(port))
    # When two jobs call the API as fast as the budget lets them
    runs = queue_and_publish(world, users, "stress", pg_sessions, worker_env)

    def finished():
        with pg_sessions() as s:
            return all(s.get(JobRun, r).status == "succeeded" for r in runs)

    assert wait_until(finished, 60), processes.logs()[-3000:]
    # Then the worker's /metrics shows the waits observed in its job processes
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {f"{s.name}{sorted(s.labels.items())}": s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    key = "behalf_rate_budget_wait_seconds_{}[('kind', 'agent'), ('purpose', 'request')]"
    assert samples[key.format("count")] >= 6, text
    assert samples[key.format("sum")] > 0.5, text  # 2 jobs sharing 2/s: somebody waited
    assert not (metrics_dir / "counter_999999.db").exists()


def test_a_prefork_worker_refuses_metrics_without_a_directory(worker_env, processes):
    processes.base_env = worker_env
    worker = processes.start("worker", "--metrics-port", str(free_port()))
    assert worker.wait(timeout=30) == 2
    assert "PROMETHEUS_MULTIPROC_DIR" in processes.logs()
