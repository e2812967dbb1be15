"""Connecting an agent against a real authorisation server we did not write (oidc-provider),
on real PostgreSQL, through the real app served over HTTP; users are played by httpx.

Bad-input cases the real AS cannot be made to produce (forged ID tokens, widened scopes) are in
tests/unit/api/test_callback_refusals.py, against an in-memory AS.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from behalf.cli import main
from delegation import providers
from delegation.errors import DelegationUnusable, ReauthRequired
from delegation.oauth import Endpoints
from delegation.revocation import REVOKE_AT_PROVIDER_TOPIC
from delegation.store import AgentDirectory, DelegationStore
from delegation.token_source import TokenSource
from models import Agent, AuthorizationRequest, OutboxMessage
from tests.integration import connect_support
from tests.integration.connect_support import ConnectWorld, params, with_params
from tests.support.databases import LeakScan

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

world = connect_support.world  # the fixture


@pytest.fixture
def alice(world: ConnectWorld) -> httpx.Client:
    browser = world.browser()
    world.sign_in(browser, "alice")
    return browser


def refused(world: ConnectWorld, browser: httpx.Client, url: str, status: int,
            words: str) -> httpx.Response:
    """Open `url`; it must be a clear page that changed nothing and leaked nothing."""
    before = world.snapshot()
    response = browser.get(url)
    assert response.status_code == status, response.text
    assert words in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert world.snapshot() == before
    code = params(url).get("code") or ""
    if len(code) > 8:  # a real code: never echoed
        assert code not in response.text
    return response


# --- the whole flow ----------------------------------------------------------------------------


def test_registration_uses_private_key_jwt_with_only_the_public_key_sent(
        world: ConnectWorld, leak_scan: LeakScan) -> None:
    with world.sessions() as s:
        agent = s.scalars(select(Agent).where(Agent.name == "reporter")).one()
        credentials = providers.open_credentials(world.vault, agent)
    assert agent.auth_method == "private_key_jwt"
    assert credentials.private_jwk is not None
    leak_scan.register(credentials.private_jwk["d"], credentials.private_jwk["p"],
                       credentials.registration_access_token or "")
    assert agent.public_jwks is not None
    assert all("d" not in key for key in agent.public_jwks["keys"])
    # The AS knows the client by its public key: a registration read (RFC 7592) shows it.
    assert agent.registration is not None
    with httpx.Client(trust_env=False) as http:
        info = http.get(agent.registration["registration_client_uri"], headers={
            "Authorization": f"Bearer {credentials.registration_access_token}"}).json()
    assert info["token_endpoint_auth_method"] == "private_key_jwt"
    assert [k["kid"] for k in info["jwks"]["keys"]] == [credentials.private_jwk["kid"]]
    assert "d" not in info["jwks"]["keys"][0]


def test_browserless_flow_subset_grant_refresh_and_revocation(
        world: ConnectWorld, alice: httpx.Client) -> None:
    # Given alice, signed in, connects the agent but allows only reports:read,
    done = alice.get(world.consent(alice, "alice", scopes={"reports:read"}))

    # then she lands on her grants, where the agent is listed with what she granted;
    assert done.status_code == 303
    assert done.headers["location"] == "/grants?connected=reporter"
    page = alice.get(world.url + done.headers["location"]).text
    assert "reporter is connected" in page and "not granted: reports:write calendar:read" in page
    (row,) = world.delegations()
    assert row.granted_scopes == ["reports:read"]
    assert row.requested_scopes == ["reports:read", "reports:write", "calendar:read"]
    tokens = world.tokens(row)  # (registered for the database leak scan)
    assert tokens.refresh_token
    with world.sessions() as s:
        client_id = s.scalars(select(Agent.client_id).where(Agent.name == "reporter")).one()
    # the AS agrees: one grant, for alice, to this client, with that one API scope,
    (grant,) = world.provider.grants(sub="alice", client_id=client_id)
    assert sorted(grant["resources"][world.provider.api_base].split()) == ["reports:read"]
    # the code was exchanged with a private_key_jwt assertion, not a secret;
    token_calls = [r for r in world.provider.stats()["requests"]
                   if r["endpoint"] == "token" and r["client_id"] == client_id]
    assert [r["grant_type"] for r in token_calls] == ["authorization_code"]
    # and the token works at the API, for reports only.
    api = httpx.Client(trust_env=False, base_url=world.provider.api_base)
    headers = {"Authorization": f"Bearer {tokens.access_token}"}
    assert api.get("/v2/reports", headers=headers).status_code == 200
    assert api.get("/v2/calendar", headers=headers).status_code == 403

    # When the product refreshes (the API refused the token),
    source = TokenSource(store=DelegationStore(world.sessions, world.vault, world.clock),
                         agents=AgentDirectory(world.sessions, world.vault),
                         oauth=world.oauth, redis=fakeredis.FakeRedis(), clock=world.clock,
                         rng=random.Random(0))
    current = source.current(row.id)
    fresh = source.refresh(row.id, rejected=current)

    # the refresh token rotated at the AS and the new pair was stored first.
    (after,) = world.delegations()
    rotated = world.tokens(after)
    assert after.version == row.version + 1
    assert fresh.value == rotated.access_token != tokens.access_token
    assert world.provider.token_info(tokens.refresh_token)["consumed"] is True
    assert api.get("/v2/reports", headers={
        "Authorization": f"Bearer {fresh.value}"}).status_code == 200

    # When alice revokes from her grants page (a form post, no JavaScript),
    csrf = page.split('name="csrf_token" value="')[1].split('"')[0]
    revoked = alice.post(f"{world.url}/api/grants/{row.id}/revoke", data={"csrf_token": csrf})

    # the delegation is unusable at once, running work is told, the AS revocation is queued,
    assert revoked.status_code == 303
    assert "reporter was revoked" in alice.get(world.url + revoked.headers["location"]).text
    assert world.stops == [row.id]
    source.forget(row.id)
    with pytest.raises(DelegationUnusable):
        source.current(row.id)
    with world.sessions() as s:
        topics = s.scalars(select(OutboxMessage.topic)).all()
    assert REVOKE_AT_PROVIDER_TOPIC in topics
    # and revoking at the AS with the agent's client (RFC 7009) kills the grant there.
    with world.sessions() as s:
        agent = s.scalars(select(Agent).where(Agent.name == "reporter")).one()
        endpoints = Endpoints.from_metadata(world.provider.metadata)
        credentials = providers.open_credentials(world.vault, agent)
    world.oauth.revoke(endpoints, credentials, rotated.refresh_token or "", "refresh_token")
    assert world.provider.token_info(rotated.refresh_token or "")["active"] is False
    api.close()


def test_reconnecting_replaces_the_tokens_of_the_same_delegation(
        world: ConnectWorld, alice: httpx.Client) -> None:
    world.connect(alice, "alice", scopes={"reports:read"})
    (first,) = world.delegations()
    old = world.tokens(first)

    assert world.connect(alice, "alice").status_code == 303

    (second,) = world.delegations()
    new = world.tokens(second)
    assert (second.id, second.version) == (first.id, first.version + 1)
    assert second.granted_scopes == ["reports:read", "reports:write", "calendar:read"]
    assert new.refresh_token != old.refresh_token


def test_key_rotation_against_the_real_as(world: ConnectWorld, alice: httpx.Client) -> None:
    with world.sessions() as s:
        agent = s.scalars(select(Agent).where(Agent.name == "reporter")).one()
        old = providers.open_credentials(world.vault, agent)

    rotation = providers.rotate_key(world.sessions, world.vault, world.oauth, world.clock,
                                    name="reporter", environment="test",
                                    public_url=world.url, operator="tester", grace_seconds=0)

    assert rotation.old_kid != rotation.new_kid
    # The new key signs the code exchange; the old key is no longer accepted.
    assert world.connect(alice, "alice").status_code == 303
    endpoints = Endpoints.from_metadata(world.provider.metadata)
    with pytest.raises(Exception, match="refused the agent's client"):
        world.oauth.exchange_code(endpoints, old, code="x", verifier="v" * 43,
                                  redirect_uri=f"{world.url}/oauth/callback")
    with world.sessions() as s:
        agent = s.scalars(select(Agent).where(Agent.name == "reporter")).one()
        new = providers.open_credentials(world.vault, agent)
    with pytest.raises(ReauthRequired):  # client accepted; only the code is bad
        world.oauth.exchange_code(endpoints, new, code="x", verifier="v" * 43,
                                  redirect_uri=f"{world.url}/oauth/callback")
    world.leak_scan.register(old.private_jwk["d"] if old.private_jwk else "",
                             new.private_jwk["d"] if new.private_jwk else "")


# --- state --------------------------------------------------------------------------------------


def test_missing_state(world: ConnectWorld, alice: httpx.Client) -> None:
    back = world.consent(alice, "alice")
    refused(world, alice, with_params(back, state=None), 400, "has no state")


def test_forged_state(world: ConnectWorld, alice: httpx.Client) -> None:
    back = world.consent(alice, "alice")
    refused(world, alice, with_params(back, state="F" * 43), 400, "does not belong")


def test_expired_state(world: ConnectWorld, alice: httpx.Client) -> None:
    back = world.consent(alice, "alice")
    with world.sessions.begin() as s:
        s.execute(update(AuthorizationRequest).values(
            expires_at=world.clock.now().replace(year=2020)))
    refused(world, alice, back, 400, "expired")


def test_replayed_state(world: ConnectWorld, alice: httpx.Client) -> None:
    back = world.consent(alice, "alice")
    assert alice.get(back).status_code == 303
    world.tokens(world.delegations()[0])
    refused(world, alice, back, 400, "already used")


def test_state_from_another_browser(world: ConnectWorld, alice: httpx.Client) -> None:
    back = world.consent(alice, "alice")
    elsewhere = world.browser()
    world.sign_in(elsewhere, "alice")
    refused(world, elsewhere, back, 400, "another browser")
    assert alice.get(back).status_code == 303  # still good where it started
    world.tokens(world.delegations()[0])


# --- the code -----------------------------------------------------------------------------------


def test_replayed_code(world: ConnectWorld, alice: httpx.Client) -> None:
    first = world.consent(alice, "alice")
    assert alice.get(first).status_code == 303
    world.tokens(world.delegations()[0])
    second = world.consent(alice, "alice")
    refused(world, alice, with_params(second, code=params(first)["code"]), 400,
            "did not accept")


def test_code_from_another_client(world: ConnectWorld, alice: httpx.Client) -> None:
    world.register_agent("calendar-bot", scopes="calendar:read")
    theirs = world.consent(alice, "alice", agent="calendar-bot")
    ours = world.consent(alice, "alice")
    refused(world, alice, with_params(ours, code=params(theirs)["code"]), 400,
            "did not accept")


def test_pkce_verifier_mismatch(world: ConnectWorld, alice: httpx.Client) -> None:
    # The code of one request, the state (hence verifier) of another, same agent and user.
    one = world.consent(alice, "alice")
    two = world.consent(alice, "alice")
    refused(world, alice, with_params(two, code=params(one)["code"]), 400, "did not accept")
    # ... and the request whose verifier matches still works (its code was not spent).
    assert alice.get(one).status_code == 303
    world.tokens(world.delegations()[0])


# --- the AS's answer ----------------------------------------------------------------------------


def test_iss_mismatch_is_refused_before_any_exchange(world: ConnectWorld,
                                                     alice: httpx.Client) -> None:
    back = world.consent(alice, "alice")
    assert params(back)["iss"] == world.provider.issuer  # RFC 9207: the AS sends it
    exchanges = world.provider.stats()["token"]["total"]
    refused(world, alice, with_params(back, iss="http://127.0.0.1:1"), 400,
            "another authorization server")
    assert world.provider.stats()["token"]["total"] == exchanges


def test_access_denied(world: ConnectWorld, alice: httpx.Client) -> None:
    back = world.consent(alice, "alice", deny=True)
    assert params(back)["error"] == "access_denied"
    page = refused(world, alice, back, 403, "You declined")
    assert 'href="/connect/reporter"' in page.text


def test_token_response_without_refresh_token(world: ConnectWorld, alice: httpx.Client) -> None:
    # A client registered by hand without the refresh_token grant: the AS issues none.
    info = world.provider.register_client({
        "client_name": "no refresh", "redirect_uris": [f"{world.url}/oauth/callback"],
        "grant_types": ["authorization_code"], "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic"})
    world.leak_scan.register(info["client_secret"])
    providers.add_agent(world.sessions, world.vault, world.clock, name="forgetful",
                        provider_name="acme", environment="test", client_id=info["client_id"],
                        auth_method="client_secret_basic", scopes=["reports:read"],
                        required_scopes=[], secret=info["client_secret"], private_jwk=None,
                        operator="tester")
    back = world.consent(alice, "alice", agent="forgetful")
    refused(world, alice, back, 400, "no refresh token")
    # The access token it did issue was revoked at the AS (RFC 7009), not left behind.
    assert world.provider.stats()["revocation"]["by_client_id"] == {info["client_id"]: 1}


def test_required_scope_not_granted(world: ConnectWorld, alice: httpx.Client) -> None:
    world.register_agent("writer", scopes="reports:read reports:write",
                         required="reports:write")
    back = world.consent(alice, "alice", agent="writer", scopes={"reports:read"})
    refused(world, alice, back, 400, "needs reports:write")


def test_a_refused_reconnect_does_not_kill_the_working_grant(world: ConnectWorld,
                                                              alice: httpx.Client) -> None:
    # Given alice's working delegation (the AS keeps one grant per user and client),
    world.register_agent("writer", scopes="reports:read reports:write",
                         required="reports:write")
    assert world.connect(alice, "alice", agent="writer").status_code == 303
    (row,) = world.delegations()
    working = world.tokens(row)
    # when a reconnect is refused (a required scope unticked),
    back = world.consent(alice, "alice", agent="writer", scopes={"reports:read"})
    refused(world, alice, back, 400, "needs reports:write")

    # the refused tokens are dropped without revoking the grant they share with hers:
    assert world.provider.stats()["revocation"]["total"] == 0
    assert world.provider.token_info(working.refresh_token or "")["active"] is True
    (after,) = world.delegations()
    assert (after.id, after.version, after.status) == (row.id, row.version, "active")


def test_callback_for_bob_while_alice_is_signed_in(world: ConnectWorld,
                                                   alice: httpx.Client) -> None:
    # Alice's browser starts the request; bob logs in and consents at the AS (elsewhere);
    url = world.start_connect(alice)
    with httpx.Client(trust_env=False) as bobs:
        back = world.provider.login_and_consent(bobs, url + "&prompt=consent", "bob")
    # the answer comes back to alice's browser, where it is refused and bob's grant undone.
    refused(world, alice, back, 403, "someone other than the person signed in")
    assert world.provider.stats()["revocation"]["total"] == 1


def test_revoke_of_someone_elses_grant_is_404(world: ConnectWorld,
                                              alice: httpx.Client) -> None:
    world.connect(alice, "alice")
    (row,) = world.delegations()
    world.tokens(row)
    bob = world.browser()
    world.sign_in(bob, "bob")
    csrf = bob.get(f"{world.url}/api/grants").json()["csrf_token"]
    before = world.snapshot()

    response = bob.post(f"{world.url}/api/grants/{row.id}/revoke",
                        headers={"X-CSRF-Token": csrf})

    assert response.status_code == 404
    assert world.snapshot() == before and world.stops == []
    assert bob.get(f"{world.url}/api/grants").json()["grants"] == []


@pytest.mark.parametrize("query", [
    "state=" + "s" * 4000 + "&code=c", "state=a&state=b&code=c", "code=%FF%FE&state=a",
    "state=a&code=c&iss=" + "i" * 1000,
], ids=["long state", "repeated state", "binary code", "long iss"])
def test_oversized_and_malformed_parameters(world: ConnectWorld, alice: httpx.Client,
                                            query: str) -> None:
    refused(world, alice, f"{world.url}/oauth/callback?{query}", 400, "Nothing was saved")


# --- the AS being down --------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "status"])
def test_the_as_down_at_the_exchange_is_a_clear_page(world: ConnectWorld, alice: httpx.Client,
                                                     fault: str) -> None:
    back = world.consent(alice, "alice")
    world.provider.set_fault("token", mode=fault, status=503)  # type: ignore[arg-type]
    page = refused(world, alice, back, 503, "did not answer")
    assert 'href="/connect/reporter"' in page.text


def test_the_as_jwks_down_is_a_clear_page(world: ConnectWorld, alice: httpx.Client) -> None:
    back = world.consent(alice, "alice")
    world.provider.set_fault("jwks", status=500)
    refused(world, alice, back, 503, "did not answer")


# --- the command line, as the README tells a new user ------------------------------------------


@pytest.fixture
def cli_env(world: ConnectWorld, pg_database: str, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BEHALF_DATABASE_URL", pg_database)
    monkeypatch.setenv("BEHALF_LOCAL_KEY_FILE", os.fspath(tmp_path / "master.key"))
    monkeypatch.setenv("BEHALF_PUBLIC_URL", world.url)
    monkeypatch.setenv("BEHALF_ENV", "dev")
    yield


def test_the_cli_registers_an_agent_that_users_can_connect(
        world: ConnectWorld, cli_env: None, capsys: pytest.CaptureFixture[str],
        pg_sessions: sessionmaker[Session]) -> None:
    assert main(["provider", "add", "acme", "--issuer", world.provider.issuer]) == 0
    capsys.readouterr()
    assert main(["agent", "register", "cli-agent", "--provider", "acme",
                 "--scopes", "reports:read", "--json"]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert registered["auth_method"] == "private_key_jwt"
    assert registered["environment"] == "dev"
    assert main(["agent", "list", "--json", "--all-environments"]) == 0
    agents = {a["name"]: a for a in json.loads(capsys.readouterr().out)}
    assert agents["cli-agent"]["client_id"] == registered["client_id"]
    # (The app of this world serves environment "test"; the CLI wrote environment "dev".)
    with pg_sessions.begin() as s:
        s.execute(update(Agent).where(Agent.name == "cli-agent").values(environment="test"))
    alice = world.browser()
    world.sign_in(alice, "alice")
    assert world.connect(alice, "alice", agent="cli-agent").status_code == 303
    world.tokens(world.delegations()[0])


def test_sign_in_records_the_users_verified_email_for_mails(
        world: ConnectWorld, alice: httpx.Client) -> None:
    # re-authorisation mails go to this address; the AS vouches for it (email_verified)
    from models import User

    with world.sessions() as s:
        user = s.scalars(select(User).where(User.subject == "alice")).one()
    assert user.email == "alice@example.test"
