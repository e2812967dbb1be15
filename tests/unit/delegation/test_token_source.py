"""Token source on SQLite + fakeredis + an in-memory AS: refresh rules and failure classes."""

import datetime as dt

import fakeredis
import httpx
import pytest
from sqlalchemy import select

from delegation.errors import AgentMisconfigured, DelegationUnusable, ProviderUnavailable
from delegation.token_source import needs_refresh, refresh_skew
from delegation.tokens import TokenSet
from delegation.vault import Vault
from models import Agent, AuditEvent, Delegation, JobRun, OutboxMessage
from tests.support.fake_as import API_BASE, FakeAuthServer
from tests.support.world import World


@pytest.fixture
def fake_as():
    return FakeAuthServer(ttl=300)


@pytest.fixture
def world(sqlite_sessions, clock, tmp_path, fake_as):
    from delegation.kms import LocalKeyFile

    w = World(sessions=sqlite_sessions, vault=Vault(LocalKeyFile(tmp_path / "k", warn=False)),
              clock=clock, redis=fakeredis.FakeRedis(), transport=fake_as.transport())
    w.setup_agent(fake_as.metadata(), API_BASE)
    return w


def connect(world, fake_as, subject="alice", ttl=300):
    access, refresh = fake_as.grant(subject, world.client_id)
    return world.add_delegation(subject, world.token_set(access, refresh, ttl))


@pytest.mark.parametrize(
    ("lifetime", "minimum", "expected"),
    [(3600, 60, 360), (300, 60, 60), (59, 60, 29.5), (5, 60, 2.5), (None, 60, 60)],
)
def test_skew_is_proportional_bounded_and_never_exceeds_half_the_lifetime(
    lifetime, minimum, expected
):
    assert refresh_skew(lifetime, minimum) == pytest.approx(expected)


def test_a_59_second_token_is_not_permanently_expired(clock):
    tokens = TokenSet("a", "r", clock.now() + dt.timedelta(seconds=59), clock.now())
    assert not needs_refresh(tokens, clock.now(), 60)


def test_fresh_token_is_used_without_refreshing(world, fake_as):
    _, d_id = connect(world, fake_as)
    source = world.token_source()
    token = source.current(d_id)
    assert token.value.startswith("at-") and fake_as.token_requests == 0


def test_token_near_expiry_is_refreshed_and_the_rotated_pair_stored_first(world, fake_as, clock):
    _, d_id = connect(world, fake_as, ttl=300)
    source = world.token_source()
    clock.advance(250)  # inside the 60 s skew
    token = source.current(d_id)
    assert fake_as.token_requests == 1
    with world.sessions() as s:
        row = s.get(Delegation, d_id)
        assert row.version == 2 and row.refreshed_at == clock.now()
    # the stored refresh token is the rotated one: a second refresh succeeds (no reuse)
    clock.advance(290)
    second = source.current(d_id)
    assert fake_as.token_requests == 2 and second.value != token.value
    with world.sessions() as s:
        actions = s.scalars(select(AuditEvent.action)).all()
    assert actions.count("delegation:token:refreshed") == 2


def test_no_refresh_token_in_the_answer_keeps_the_old_one(world, fake_as, clock):
    _, d_id = connect(world, fake_as)
    fake_as.faults.append(httpx.Response(200, json={"access_token": "at-new", "expires_in": 300,
                                                    "token_type": "Bearer"}))
    clock.advance(290)
    world.token_source().current(d_id)
    _, tokens = world.token_source()._store.load(d_id)
    assert tokens.access_token == "at-new" and tokens.refresh_token.startswith("rt-")


def test_invalid_grant_breaks_parks_and_queues_one_notice(world, fake_as, clock):
    user_id, d_id = connect(world, fake_as)
    with world.sessions.begin() as s:
        from delegation.runs import queue_run

        queue_run(s, job="nightly", user_id=user_id, agent_id=world.agent_id, now=clock.now())
    fake_as.kill("alice")
    clock.advance(290)
    with pytest.raises(DelegationUnusable) as info:
        world.token_source().current(d_id)
    assert info.value.reason == "delegation_broken"
    with world.sessions() as s:
        row = s.get(Delegation, d_id)
        assert (row.status, row.status_reason) == ("broken", "invalid_grant")
        assert [r.status for r in s.scalars(select(JobRun))] == ["parked"]
        topics = [m.topic for m in s.scalars(select(OutboxMessage))]
        assert topics.count("delegation.broken") == 1
        assert "delegation:token:broken" in s.scalars(select(AuditEvent.action)).all()
    requests = fake_as.token_requests
    with pytest.raises(DelegationUnusable):
        world.token_source().current(d_id)
    assert fake_as.token_requests == requests  # no further AS calls


def test_invalid_grant_after_someone_else_refreshed_is_a_race_not_a_death(world, fake_as, clock):
    _, d_id = connect(world, fake_as)
    loser = world.token_source(lease_ms=15_000)
    winner = world.token_source(lease_ms=15_000)
    clock.advance(290)
    winner.current(d_id)
    # the loser still believes the old version; its 401-driven refresh must reuse the winner's
    from delegation.token_source import AccessToken

    stale = AccessToken("at-old", d_id, 1, None)
    token = loser.refresh(d_id, rejected=stale)
    assert token.version == 2 and fake_as.token_requests == 1
    with world.sessions() as s:
        assert s.get(Delegation, d_id).status == "active"


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(503, headers={"Retry-After": "7"}),
        httpx.Response(429, headers={"Retry-After": "3"}),
        httpx.Response(500, text="boom"),
        httpx.Response(400, json={"error": "temporarily_unavailable"}),
    ],
)
def test_transient_failures_are_retryable_and_break_nothing(world, fake_as, clock, answer):
    _, d_id = connect(world, fake_as)
    fake_as.faults.append(answer)
    clock.advance(290)
    with pytest.raises(ProviderUnavailable) as info:
        world.token_source().current(d_id)
    if "Retry-After" in answer.headers:
        assert info.value.retry_after == float(answer.headers["Retry-After"])
    with world.sessions() as s:
        assert s.get(Delegation, d_id).status == "active"
    assert world.token_source().current(d_id).version == 2  # next try succeeds


def test_a_timeout_is_retryable(world, fake_as, clock):
    _, d_id = connect(world, fake_as)

    def timeout(request):
        raise httpx.ReadTimeout("slow", request=request)

    world.transport = httpx.MockTransport(timeout)
    clock.advance(290)
    with pytest.raises(ProviderUnavailable, match="timed out"):
        world.token_source(lease_ms=15_000).current(d_id)


@pytest.mark.parametrize("error", ["invalid_client", "unauthorized_client"])
def test_invalid_client_blames_the_agent_not_the_user(world, fake_as, clock, error):
    _, d_id = connect(world, fake_as)
    fake_as.faults.append(httpx.Response(401, json={"error": error}))
    clock.advance(290)
    with pytest.raises(AgentMisconfigured):
        world.token_source().current(d_id)
    with world.sessions() as s:
        assert s.get(Delegation, d_id).status == "active"
        assert s.get(Agent, world.agent_id).status == "misconfigured"


def test_a_refresh_that_loses_its_compare_and_set_writes_nothing(world, fake_as, clock):
    _, d_id = connect(world, fake_as)
    source = world.token_source()
    store = source._store
    state, _ = store.load(d_id)
    clock.advance(290)
    source.current(d_id)  # version 1 -> 2
    from delegation.store import AgentDirectory

    identity = AgentDirectory(world.sessions, world.vault).get(world.agent_id)
    assert store.save_refreshed(state, world.token_set("at-x", "rt-x", 300), identity) is None
    _, tokens = store.load(d_id)
    assert tokens.access_token != "at-x"


def test_a_revoked_delegation_gets_no_token(world, fake_as):
    _, d_id = connect(world, fake_as)
    with world.sessions.begin() as s:
        s.get(Delegation, d_id).status = "revoked"
    with pytest.raises(DelegationUnusable) as info:
        world.token_source().current(d_id)
    assert info.value.reason == "delegation_revoked"


def test_tokens_never_appear_in_reprs(world, fake_as):
    _, d_id = connect(world, fake_as)
    token = world.token_source().current(d_id)
    _, tokens = world.token_source()._store.load(d_id)
    assert token.value not in repr(token)
    assert tokens.refresh_token not in repr(tokens) and tokens.access_token not in repr(tokens)


def test_the_token_cache_keeps_only_the_most_recently_used_delegations(world, fake_as):
    ids = [connect(world, fake_as, subject=f"user{i}")[1] for i in range(3)]
    source = world.token_source(cache_size=2)
    loads = []
    real_load = source._store.load
    source._store.load = lambda d_id: loads.append(d_id) or real_load(d_id)
    source.current(ids[0])
    source.current(ids[1])
    source.current(ids[0])  # cached; now the most recently used
    source.current(ids[2])  # evicts ids[1], the least recently used
    source.current(ids[0])
    source.current(ids[1])
    assert loads == [ids[0], ids[1], ids[2], ids[1]]
