"""The revocation listener acts on durable state, never on a message's word."""

import time
import uuid

import fakeredis
import pytest

from delegation import bus
from delegation.kms import LocalKeyFile
from delegation.vault import Vault
from models import Delegation
from tests.support.fake_as import API_BASE, FakeAuthServer
from tests.support.world import World
from worker.cancel import CancelToken
from worker.listener import RevocationListener
from worker.runner import ActiveRuns


@pytest.fixture
def world(sqlite_sessions, clock, tmp_path):
    fake = FakeAuthServer()
    w = World(sessions=sqlite_sessions, vault=Vault(LocalKeyFile(tmp_path / "k", warn=False)),
              clock=clock, redis=fakeredis.FakeRedis(), transport=fake.transport())
    w.setup_agent(fake.metadata(), API_BASE)
    access, refresh = fake.grant("alice", w.client_id)
    _, w.delegation_id = w.add_delegation("alice", w.token_set(access, refresh, 300))
    return w


@pytest.fixture
def listening(world):
    server = fakeredis.FakeServer()
    active = ActiveRuns()
    token = CancelToken()
    active.add(world.delegation_id, uuid.uuid4(), token)
    listener = RevocationListener(redis_factory=lambda: fakeredis.FakeRedis(server=server),
                                  sessions=world.sessions, active=active)
    listener.start()
    assert listener.connected.wait(5)
    yield fakeredis.FakeRedis(server=server), token, listener
    listener.stop()


def test_a_forged_stop_for_an_active_delegation_changes_nothing(world, listening):
    redis, token, _ = listening
    assert bus.publish_stop(redis, world.delegation_id, "delegation_revoked") == 1
    time.sleep(0.5)
    assert not token.cancelled
    with world.sessions() as s:
        assert s.get(Delegation, world.delegation_id).status == "active"


def test_a_genuine_stop_cancels_the_delegations_runs(world, listening):
    redis, token, _ = listening
    with world.sessions.begin() as s:
        s.get(Delegation, world.delegation_id).status = "revoked"
    bus.publish_stop(redis, world.delegation_id, "whatever the message says")
    deadline = time.monotonic() + 5
    while not token.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert token.reason == "delegation_revoked"  # from the durable state, not the message


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"delegation_id": "nope"}', b"[]"])
def test_malformed_messages_are_ignored(raw):
    assert bus.parse(raw) is None


def test_a_refresh_in_flight_when_the_revoke_commits_cannot_reactivate(world, clock):
    from delegation import revocation
    from delegation.store import AgentDirectory

    source = world.token_source()
    state, tokens = source._store.load(world.delegation_id)  # the refresher read v1...
    revocation.revoke(world.sessions, clock, world.delegation_id, actor_type="user",
                      actor="alice")  # ...the revoke commits...
    identity = AgentDirectory(world.sessions, world.vault).get(world.agent_id)
    assert source._store.save_refreshed(state, tokens, identity) is None  # ...its write loses
    with world.sessions() as s:
        row = s.get(Delegation, world.delegation_id)
        assert row.status == "revoked" and row.version == 2
