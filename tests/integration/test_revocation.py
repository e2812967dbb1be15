"""Revocation end to end: real worker processes, Redis pub/sub, PostgreSQL and the real AS."""

from __future__ import annotations

import os
import time
import uuid

import httpx
import pytest
import redis as redis_lib
from sqlalchemy import select

from delegation import bus, outbox, revocation
from delegation.clock import SystemClock
from delegation.kms import LocalKeyFile
from delegation.oauth import OAuthClient
from delegation.runs import queue_run
from delegation.store import AgentDirectory
from delegation.vault import Vault
from models import AuditEvent, Delegation, JobRun, OutboxMessage
from tests.integration.test_worker_processes import publish_pending, wait_until
from tests.support.databases import BROKER_TEST_URL
from tests.support.oidc_provider import sha256_hex
from tests.support.real_world import connect_user, make_world, register_agent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BROKER = BROKER_TEST_URL


@pytest.fixture
def env(pg_database, redis_url, tmp_path):
    client = redis_lib.Redis.from_url(BROKER)
    client.flushdb()
    yield {
        "BEHALF_DATABASE_URL": pg_database,
        "BEHALF_REDIS_URL": redis_url,
        "BEHALF_BROKER_URL": BROKER,
        "BEHALF_LOCAL_KEY_FILE": str(tmp_path / "key"),
        "BEHALF_JOBS_MODULES": "tests.support.sample_jobs",
        "BEHALF_LOG_LEVEL": "WARNING",
    }
    client.flushdb()
    client.close()


@pytest.fixture
def setup(pg_sessions, redis_url, env, oidc_provider):
    vault = Vault(LocalKeyFile(__import__("pathlib").Path(env["BEHALF_LOCAL_KEY_FILE"]),
                               warn=False))
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    return world, credentials, endpoints


def child_pids(pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.add(int(entry))
    return children


def run_status(sessions, run_id):
    with sessions() as s:
        row = s.get(JobRun, run_id)
        return row.status, row.reason


def calls_for(provider, sub):
    return [c for c in provider.api_calls() if c.get("sub") == sub]


def start_loops(world, users, env):
    with world.sessions.begin() as s:
        runs = {sub: queue_run(s, job="loop", user_id=uid, agent_id=world.agent_id,
                               now=world.clock.now()).id for sub, uid in users.items()}
    publish_pending(world.sessions, env["BEHALF_BROKER_URL"])
    return runs


def test_revoking_u_stops_only_us_runs_at_once_and_kills_no_process(
    setup, env, processes, oidc_provider, pg_sessions
):
    world, credentials, endpoints = setup
    users, delegations = {}, {}
    for sub in ("ursula", "victor"):
        users[sub], delegations[sub], _ = connect_user(world, oidc_provider, credentials,
                                                       endpoints, sub)
    processes.base_env = env
    workers = [processes.start("worker", "--concurrency", "2") for _ in range(2)]
    runs = start_loops(world, users, env)
    assert wait_until(lambda: all(run_status(pg_sessions, r)[0] == "running"
                                  for r in runs.values()), 60), (
        [run_status(pg_sessions, r) for r in runs.values()], processes.logs()[-1500:])
    assert wait_until(lambda: len(calls_for(oidc_provider, "ursula")) >= 3, 30)
    pids_before = {w.pid: child_pids(w.pid) for w in workers}

    # When U's delegation is revoked (the API/CLI path: commit, then push)
    revocation.revoke(pg_sessions, SystemClock(), delegations["ursula"], actor_type="user",
                      actor="ursula")
    bus.publish_stop(world.redis, delegations["ursula"], "delegation_revoked")
    returned_at = time.time()

    # Then the API receives nothing more with U's token, and U's run ends cancelled
    assert wait_until(lambda: run_status(pg_sessions, runs["ursula"]) ==
                      ("cancelled", "delegation_revoked"), 5), (
        run_status(pg_sessions, runs["ursula"]), processes.logs()[-1500:])
    late = [c for c in calls_for(oidc_provider, "ursula") if c["time"] > returned_at]
    assert late == []
    # And V's run goes on, in the same processes
    v_before = len(calls_for(oidc_provider, "victor"))
    time.sleep(1.0)
    assert len(calls_for(oidc_provider, "victor")) > v_before
    assert run_status(pg_sessions, runs["victor"])[0] == "running"
    assert {w.pid: child_pids(w.pid) for w in workers} == pids_before
    assert all(w.poll() is None for w in workers)
    revocation.revoke(pg_sessions, SystemClock(), delegations["victor"], actor_type="user",
                      actor="victor")
    assert wait_until(lambda: run_status(pg_sessions, runs["victor"])[0] == "cancelled", 5)


def test_without_any_push_running_work_still_stops_within_a_second(
    setup, env, processes, oidc_provider, pg_sessions
):
    world, credentials, endpoints = setup
    user_id, d_id, _ = connect_user(world, oidc_provider, credentials, endpoints, "ursula")
    processes.base_env = env
    processes.start("worker", "--concurrency", "1")
    runs = start_loops(world, {"ursula": user_id}, env)
    assert wait_until(lambda: len(calls_for(oidc_provider, "ursula")) >= 3, 60)

    revocation.revoke(pg_sessions, SystemClock(), d_id, actor_type="user", actor="ursula")
    returned_at = time.time()  # no PUBLISH at all: only durable state

    assert wait_until(lambda: run_status(pg_sessions, runs["ursula"])[0] == "cancelled", 5)
    last_call = max(c["time"] for c in calls_for(oidc_provider, "ursula"))
    assert last_call - returned_at <= 1.0


def test_a_worker_started_after_the_revoke_never_runs_the_delegation(
    setup, env, processes, oidc_provider, pg_sessions
):
    world, credentials, endpoints = setup
    user_id, d_id, _ = connect_user(world, oidc_provider, credentials, endpoints, "ursula")
    runs = start_loops(world, {"ursula": user_id}, env)  # queued and published, no worker up
    oidc_provider.reset_api_calls()
    revocation.revoke(pg_sessions, SystemClock(), d_id, actor_type="user", actor="ursula")
    processes.base_env = env
    processes.start("worker", "--concurrency", "1")
    assert wait_until(lambda: run_status(pg_sessions, runs["ursula"])[0] == "cancelled", 10)
    time.sleep(1.0)
    assert calls_for(oidc_provider, "ursula") == []


def test_tokens_are_revoked_at_the_as_then_shredded_and_an_outage_only_delays_it(
    setup, pg_sessions, oidc_provider
):
    world, credentials, endpoints = setup
    _, d_id, exchange = connect_user(world, oidc_provider, credentials, endpoints, "ursula")
    clock = SystemClock()
    http = httpx.Client(timeout=5)
    handlers = {revocation.REVOKE_AT_PROVIDER_TOPIC: lambda p: revocation.revoke_at_provider(
        pg_sessions, world.vault, AgentDirectory(pg_sessions, world.vault),
        OAuthClient(http, clock), clock, uuid.UUID(p["delegation_id"]))}

    # Given the AS is down when the user revokes
    oidc_provider.set_fault("revocation", count=2, status=503)
    revocation.revoke(pg_sessions, clock, d_id, actor_type="user", actor="ursula")
    assert outbox.relay_once(pg_sessions, handlers, clock) == 0
    with pg_sessions() as s:
        message = s.scalars(select(OutboxMessage).where(
            OutboxMessage.topic == revocation.REVOKE_AT_PROVIDER_TOPIC)).one()
        assert message.sent_at is None and message.attempts == 1
        assert s.get(Delegation, d_id).wrapped_key is not None  # nothing destroyed yet
    with pytest.raises(Exception, match="revoked"):
        world.token_source().current(d_id)  # unusable meanwhile

    # When the AS is back and the relay retries
    oidc_provider.reset_faults()
    with pg_sessions.begin() as s:
        s.get(OutboxMessage, message.id).available_at = clock.now()
    assert outbox.relay_once(pg_sessions, handlers, clock) == 1

    # Then the AS reports both tokens inactive, and the ciphertext and data key are gone
    assert oidc_provider.token_info(exchange.tokens.refresh_token)["active"] is False
    assert oidc_provider.token_info(exchange.tokens.access_token)["active"] is False
    with pg_sessions() as s:
        row = s.get(Delegation, d_id)
        assert row.token_blob is None and row.wrapped_key is None and row.keys_destroyed_at
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.delegation_id == d_id)
                            .order_by(AuditEvent.id)).all()
    assert actions[-3:] == ["delegation:revoked", "delegation:tokens:revoked_at_provider",
                            "delegation:keys:destroyed"]
    http.close()
    assert sha256_hex(exchange.tokens.access_token)  # tokens only ever compared by hash


def test_a_job_that_ignores_cancellation_is_stopped_hard_after_the_grace_period(
    setup, env, processes, oidc_provider, pg_sessions
):
    world, credentials, endpoints = setup
    user_id, d_id, _ = connect_user(world, oidc_provider, credentials, endpoints, "ursula")
    bob_id, _, _ = connect_user(world, oidc_provider, credentials, endpoints, "bob")
    processes.base_env = env
    worker = processes.start("worker", "--concurrency", "1")
    with world.sessions.begin() as s:
        run_id = queue_run(s, job="stuck", user_id=user_id, agent_id=world.agent_id,
                           now=world.clock.now()).id
    publish_pending(pg_sessions, env["BEHALF_BROKER_URL"])
    assert wait_until(lambda: len(calls_for(oidc_provider, "ursula")) >= 1, 60), (
        run_status(pg_sessions, run_id), processes.logs()[-2000:])
    children_before = child_pids(worker.pid)

    revocation.revoke(pg_sessions, SystemClock(), d_id, actor_type="user", actor="ursula")
    bus.publish_stop(world.redis, d_id, "delegation_revoked")

    # the job never looks at cancellation: after the 5 s grace its run is recorded stopped...
    assert wait_until(lambda: run_status(pg_sessions, run_id) ==
                      ("cancelled", "delegation_revoked"), 15), processes.logs()[-1500:]
    with pg_sessions() as s:
        assert "stopped hard" in s.get(JobRun, run_id).detail
    # ...and its process is replaced, while the worker itself goes on with other users' runs
    assert wait_until(lambda: child_pids(worker.pid) and
                      child_pids(worker.pid) != children_before, 15)
    assert worker.poll() is None
    with world.sessions.begin() as s:
        other = queue_run(s, job="slow", user_id=bob_id, agent_id=world.agent_id,
                          now=world.clock.now()).id
    publish_pending(pg_sessions, env["BEHALF_BROKER_URL"])
    assert wait_until(lambda: run_status(pg_sessions, other)[0] == "succeeded", 30), \
        processes.logs()[-1500:]
    assert len(calls_for(oidc_provider, "ursula")) == 1
