"""The runtime against a real AS with rotation and reuse detection, real PostgreSQL and Redis."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import select

from delegation.errors import DelegationUnusable, ProviderUnavailable
from delegation.kms import LocalKeyFile
from delegation.oauth import OAuthClient
from delegation.runs import queue_run
from delegation.vault import DataKeyCache, Vault
from models import AuditEvent, Delegation, JobRun
from tests.support.real_world import connect_user, make_world, register_agent
from worker.jobs import JobSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def vault(tmp_path):
    return Vault(LocalKeyFile(tmp_path / "key", warn=False),
                 DataKeyCache(max_entries=100, max_age=300, monotonic=time.monotonic))


@pytest.fixture
def short_as(oidc_provider_factory):
    return oidc_provider_factory(access_token_ttl=5)


def expire(world, delegation_id):
    """Make the stored access token look expired to behalf (the AS still honours it)."""
    from sqlalchemy import update

    with world.sessions.begin() as s:
        s.execute(update(Delegation).where(Delegation.id == delegation_id)
                  .values(version=Delegation.version))
    source = world.token_source()
    state, tokens = source._store.load(delegation_id)
    import dataclasses
    import datetime as dt

    expired = dataclasses.replace(tokens, expires_at=world.clock.now() - dt.timedelta(seconds=1))
    from delegation.store import AgentDirectory

    identity = AgentDirectory(world.sessions, world.vault).get(state.agent_id)
    saved = source._store.save_refreshed(state, expired, identity)
    assert saved is not None


def test_protocol_registration_subset_grant_refresh_and_revocation(
    pg_sessions, vault, redis_url, oidc_provider, leak_scan
):
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    assert credentials.auth_method == "private_key_jwt" and credentials.secret is None
    _, _, exchange = connect_user(world, oidc_provider, credentials, endpoints, "alice",
                                     scopes={"reports:read"})
    assert set(exchange.granted_scopes) == {"reports:read"}
    assert exchange.tokens.refresh_token and exchange.id_token
    with httpx.Client(timeout=10) as http:
        claims = OAuthClient(http, world.clock).validate_id_token(
            endpoints, exchange.id_token, client_id=credentials.client_id, nonce=None)
    assert claims["sub"] == "alice"
    leak_scan.register(exchange.tokens.access_token, exchange.tokens.refresh_token)

    with httpx.Client(timeout=10) as http:
        oauth = OAuthClient(http, world.clock)
        refreshed = oauth.refresh(endpoints, credentials, exchange.tokens.refresh_token)
        assert refreshed.refresh_token != exchange.tokens.refresh_token  # rotated
        leak_scan.register(refreshed.access_token, refreshed.refresh_token)
        oauth.revoke(endpoints, credentials, refreshed.refresh_token, "refresh_token")
    assert oidc_provider.token_info(refreshed.refresh_token)["active"] is False
    assert oidc_provider.token_info(refreshed.access_token)["active"] is False


def test_fifty_concurrent_tasks_on_an_expired_delegation_refresh_exactly_once(
    pg_sessions, vault, redis_url, oidc_provider
):
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    _, d_id, _ = connect_user(world, oidc_provider, credentials, endpoints, "alice")
    expire(world, d_id)
    oidc_provider.reset_stats()

    # Given 50 tasks, each with its own token source (as if in 50 worker processes)
    sources = [world.token_source(lease_ms=15_000) for _ in range(50)]
    barrier = threading.Barrier(50)

    def task(source):
        barrier.wait()
        return source.current(d_id).value

    with ThreadPoolExecutor(max_workers=50) as pool:
        tokens = list(pool.map(task, sources))

    stats = oidc_provider.stats()
    refreshes = [r for r in stats["requests"] if r.get("grant_type") == "refresh_token"]
    assert len(refreshes) == 1 and refreshes[0]["status"] == 200
    assert len(set(tokens)) == 1
    with world.sessions() as s:
        assert s.get(Delegation, d_id).status == "active"
    # and the API accepts the token everyone got
    answer = httpx.get(f"{oidc_provider.api_base}/v2/reports",
                       headers={"Authorization": f"Bearer {tokens[0]}"})
    assert answer.status_code == 200


def test_a_stalled_refresher_whose_lease_expired_sends_and_writes_nothing(
    pg_sessions, vault, redis_url, oidc_provider
):
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    _, d_id, _ = connect_user(world, oidc_provider, credentials, endpoints, "alice")
    expire(world, d_id)
    oidc_provider.reset_stats()

    stalled = world.token_source(lease_ms=1500, request_timeout=1.0)
    other = world.token_source(lease_ms=15_000)
    inside_lease = threading.Event()
    resume = threading.Event()
    real_load = stalled._store.load
    calls = {"n": 0}

    def stalling_load(delegation_id):
        result = real_load(delegation_id)
        calls["n"] += 1
        if calls["n"] == 3:  # the read made while holding the lease
            inside_lease.set()
            resume.wait(10)
        return result

    stalled._store.load = stalling_load
    errors = []

    def run_stalled():
        try:
            stalled.current(d_id)
        except ProviderUnavailable as exc:
            errors.append(exc)

    thread = threading.Thread(target=run_stalled)
    thread.start()
    assert inside_lease.wait(10)
    time.sleep(1.6)  # the stalled refresher's lease runs out
    winner = other.current(d_id)
    resume.set()
    thread.join(10)

    assert errors and "lease" in str(errors[0])
    refreshes = [r for r in oidc_provider.stats()["requests"]
                 if r.get("grant_type") == "refresh_token"]
    assert len(refreshes) == 1  # only the winner spent the refresh token
    with world.sessions() as s:
        row = s.get(Delegation, d_id)
        assert row.status == "active" and row.version == winner.version


def test_invalid_grant_from_the_real_as_breaks_parks_and_stops_calls(
    pg_sessions, vault, redis_url, oidc_provider
):
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    user_id, d_id, _ = connect_user(world, oidc_provider, credentials, endpoints, "alice")
    world.jobs.add(JobSpec("nightly", "reporter", frozenset({"reports:read"}),
                           lambda ctx: ctx.http.get("/v2/reports").raise_for_status()))
    with world.sessions.begin() as s:
        run = queue_run(s, job="nightly", user_id=user_id, agent_id=world.agent_id,
                        now=world.clock.now())
    oidc_provider.revoke_grants("alice", credentials.client_id)  # the user revoked at the AS
    oidc_provider.reset_stats()
    oidc_provider.reset_api_calls()

    assert world.runner().run(run.id) == "parked"

    with world.sessions() as s:
        assert s.get(Delegation, d_id).status == "broken"
        assert s.get(JobRun, run.id).reason == "delegation_broken"
    api_calls = oidc_provider.api_calls()
    assert [c["status"] for c in api_calls] == [401]  # the dead token, then nothing more
    requests_before = len(oidc_provider.stats()["requests"])
    with pytest.raises(DelegationUnusable):
        world.token_source().current(d_id)
    assert len(oidc_provider.stats()["requests"]) == requests_before
    assert len(oidc_provider.api_calls()) == 1


@pytest.mark.parametrize(
    "fault",
    [
        {"mode": "status", "status": 500},
        {"mode": "status", "status": 503, "retry_after": 2},
        {"mode": "status", "status": 429, "retry_after": 1},
        {"mode": "status", "status": 400, "error": "temporarily_unavailable"},
        {"mode": "hang", "seconds": 3},
    ],
)
def test_token_endpoint_failures_are_retried_and_the_delegation_stays_active(
    pg_sessions, vault, redis_url, oidc_provider, fault
):
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    _, d_id, _ = connect_user(world, oidc_provider, credentials, endpoints, "alice")
    expire(world, d_id)
    oidc_provider.set_fault("token", count=1, grant_type="refresh_token", **fault)
    source = world.token_source(request_timeout=1.0, lease_ms=5000)
    with pytest.raises(ProviderUnavailable) as info:
        source.current(d_id)
    if fault.get("retry_after"):
        assert info.value.retry_after == fault["retry_after"]
    with world.sessions() as s:
        assert s.get(Delegation, d_id).status == "active"
    if fault["mode"] == "hang":
        time.sleep(0.1)
    token = source.current(d_id)  # the retry succeeds: nothing was lost
    assert token.version >= 2
    with world.sessions() as s:
        assert s.get(Delegation, d_id).status == "active"


def test_a_lost_refresh_response_is_classified_not_silently_broken(
    pg_sessions, vault, redis_url, oidc_provider
):
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    _, d_id, _ = connect_user(world, oidc_provider, credentials, endpoints, "alice")
    expire(world, d_id)
    oidc_provider.set_fault("token", mode="lose_response", count=1, grant_type="refresh_token")
    source = world.token_source(request_timeout=2.0, lease_ms=5000)
    with pytest.raises(ProviderUnavailable) as first:
        source.current(d_id)
    assert first.value.unanswered
    with pytest.raises(DelegationUnusable):
        source.current(d_id)  # the AS rotated and now sees the old token reused
    with world.sessions() as s:
        row = s.get(Delegation, d_id)
        assert (row.status, row.status_reason) == ("broken", "refresh_response_lost")
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.delegation_id == d_id)
                            .order_by(AuditEvent.id)).all()
    refreshing = [a for a in actions if a.startswith("delegation:token:")]
    assert refreshing[-4:] == ["delegation:token:refresh_started",
                               "delegation:token:refresh_unconfirmed",
                               "delegation:token:refresh_started", "delegation:token:broken"]


def test_a_job_longer_than_the_access_token_lifetime_keeps_working(
    pg_sessions, vault, redis_url, short_as
):
    world = make_world(pg_sessions, vault, redis_url, short_as)
    credentials, endpoints = register_agent(world, short_as)
    user_id, _, _ = connect_user(world, short_as, credentials, endpoints, "alice")

    def long_job(ctx):
        for _ in range(8):
            ctx.http.get("/v2/reports").raise_for_status()
            time.sleep(1.0)

    world.jobs.add(JobSpec("long", "reporter", frozenset({"reports:read"}), long_job))
    with world.sessions.begin() as s:
        run = queue_run(s, job="long", user_id=user_id, agent_id=world.agent_id,
                        now=world.clock.now())
    assert world.runner().run(run.id) == "succeeded"
    calls = short_as.api_calls()
    assert len(calls) == 8 and all(c["status"] == 200 for c in calls)
    refreshes = [r for r in short_as.stats()["requests"] if r.get("grant_type") == "refresh_token"]
    assert len(refreshes) >= 1


def test_the_bearer_token_reaches_only_the_api_origin(pg_sessions, vault, redis_url,
                                                        oidc_provider):
    world = make_world(pg_sessions, vault, redis_url, oidc_provider)
    credentials, endpoints = register_agent(world, oidc_provider)
    user_id, _, _ = connect_user(world, oidc_provider, credentials, endpoints, "alice")
    oidc_provider.reset_stats()

    def exfiltrate(ctx):
        ctx.http.get(f"{oidc_provider.issuer}/_test/whoami")  # another origin on the same host

    world.jobs.add(JobSpec("exfil", "reporter", frozenset(), exfiltrate))
    with world.sessions.begin() as s:
        run = queue_run(s, job="exfil", user_id=user_id, agent_id=world.agent_id,
                        now=world.clock.now())
    assert world.runner().run(run.id) == "failed"
    with world.sessions() as s:
        assert s.get(JobRun, run.id).reason == "ForeignOriginError"
