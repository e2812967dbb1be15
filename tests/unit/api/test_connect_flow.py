"""Connecting an agent: the authorisation request, the grant it ends in, reconnecting."""

from __future__ import annotations

import base64
import hashlib
import re

from sqlalchemy import select, text, update

from delegation.providers import parse_scopes, register_agent
from models import AuthorizationRequest, Delegation, DelegationStatus, User
from tests.unit.api.conftest import PUBLIC_URL, World, build_world, query
from tests.unit.api.helpers import actions, delegations, open_tokens, snapshot


def test_connect_stores_the_grant_sealed_and_audits_it(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")

    # When alice connects the agent and allows everything,
    done = world.connect(browser, "alice")

    # then she lands on her grants,
    assert done.status_code == 303
    assert done.headers["location"] == "/grants?connected=reporter"
    page = browser.get(done.headers["location"])
    assert "reporter is connected" in page.text
    # and the delegation holds the tokens the AS issued, sealed.
    (row,) = delegations(world.sessions)
    assert row.status == DelegationStatus.ACTIVE
    assert row.granted_scopes == ["reports:read", "calendar:read"]
    assert row.version == 1
    tokens = open_tokens(world.vault, row)
    assert tokens.refresh_token in world.fake.refresh_tokens
    assert tokens.access_token.encode() not in row.token_blob
    assert "delegation:granted" in actions(world.sessions)
    assert world.secrets_seen() == []


def test_the_authorisation_request_is_pkce_s256_with_a_fresh_state_and_nonce(
        world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")

    first = query(world.start_connect(browser))
    second = query(world.start_connect(browser))

    assert first["code_challenge_method"] == "S256"
    assert first["response_type"] == "code"
    assert first["redirect_uri"] == f"{PUBLIC_URL}/oauth/callback"
    assert first["scope"].split() == ["openid", "reports:read", "calendar:read"]
    assert first["state"] != second["state"] and len(first["state"]) >= 43
    assert first["nonce"] != second["nonce"]
    assert first["code_challenge"] != second["code_challenge"]
    # The state and verifier are never stored as such: only the state's hash, and the verifier
    # encrypted under a key the database does not hold.
    with world.sessions() as s:
        rows = s.scalars(select(AuthorizationRequest)).all()
        dump = " ".join(repr(tuple(r)) for r in s.execute(
            text("SELECT * FROM authorization_requests")))
    assert {r.state_hash for r in rows} >= {
        hashlib.sha256(first["state"].encode()).hexdigest()}
    assert first["state"] not in dump


def test_the_verifier_sent_at_the_exchange_matches_the_challenge(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")
    url = world.start_connect(browser)
    challenge = query(url)["code_challenge"]

    browser.get(world.fake.authorize(url, "alice"))

    verifier = world.fake.token_requests[-1]["code_verifier"]
    assert 43 <= len(verifier) <= 128
    assert re.fullmatch(r"[A-Za-z0-9\-._~]+", verifier)
    assert base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(
        b"=").decode() == challenge
    with world.sessions() as s:
        blobs = [r.verifier_blob for r in s.scalars(select(AuthorizationRequest))]
    assert all(verifier.encode() not in blob for blob in blobs)


def test_the_browser_cookie_is_httponly_and_samesite(world: World) -> None:
    browser = world.browser()
    response = browser.get("/auth/login")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("behalf_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie or "SameSite=Lax" in cookie
    assert "behalf_sandbox_session" not in cookie


def test_a_subset_grant_is_recorded_as_such(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")

    world.connect(browser, "alice", grant=["reports:read"])

    (row,) = delegations(world.sessions)
    assert row.requested_scopes == ["reports:read", "calendar:read"]
    assert row.granted_scopes == ["reports:read"]
    page = browser.get("/grants").text
    assert "not granted: calendar:read" in page


def test_no_scope_in_the_answer_means_all_requested(world: World) -> None:
    world.fake.knobs.omit_scope = True
    browser = world.browser()
    world.sign_in(browser, "alice")

    world.connect(browser, "alice")

    (row,) = delegations(world.sessions)
    assert row.granted_scopes == ["reports:read", "calendar:read"]


def test_reconnecting_replaces_the_tokens_of_the_same_delegation(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")
    world.connect(browser, "alice")
    (before,) = delegations(world.sessions)
    old = open_tokens(world.vault, before)

    world.connect(browser, "alice", grant=["reports:read"])

    (after,) = delegations(world.sessions)
    assert after.id == before.id
    assert after.version == before.version + 1
    assert after.granted_scopes == ["reports:read"]
    assert open_tokens(world.vault, after).refresh_token != old.refresh_token
    assert after.wrapped_key != before.wrapped_key  # a fresh data key per grant


def test_reconnecting_a_broken_delegation_makes_it_active_again(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")
    world.connect(browser, "alice")
    with world.sessions.begin() as s:
        s.execute(update(Delegation).values(status="broken", status_reason="invalid_grant",
                                            version=Delegation.version + 1))

    world.connect(browser, "alice")

    (row,) = delegations(world.sessions)
    assert (row.status, row.status_reason, row.version) == ("active", None, 3)


def test_reconnecting_while_a_revocation_is_pending_at_the_as_waits(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")
    world.connect(browser, "alice")
    (row,) = delegations(world.sessions)
    csrf = browser.get("/api/grants").json()["csrf_token"]
    browser.post(f"/api/grants/{row.id}/revoke", headers={"X-CSRF-Token": csrf})
    before = snapshot(world.sessions)

    # While the old tokens are still to be revoked at the AS,
    refused = world.connect(browser, "alice")

    # reconnecting is refused (it would lose that revocation), and the AS's new grant undone;
    assert refused.status_code == 409
    assert "still being completed" in refused.text
    assert snapshot(world.sessions) == before
    assert world.fake.revoked
    # once the old tokens are destroyed, reconnecting reuses the delegation.
    with world.sessions.begin() as s:
        s.execute(update(Delegation).values(token_blob=None, wrapped_key=None,
                                            keys_destroyed_at=world.clock.now()))
    assert world.connect(browser, "alice").status_code == 303
    (row,) = delegations(world.sessions)
    assert row.status == "active" and row.revoked_at is None and row.keys_destroyed_at is None


def test_without_an_id_token_the_user_comes_from_userinfo(tmp_path, sqlite_sessions) -> None:
    world = build_world(tmp_path, sqlite_sessions)
    world.register_agent()
    browser = world.browser()
    world.sign_in(browser, "alice")
    world.fake.knobs.omit_id_token = True

    assert world.connect(browser, "alice").status_code == 303
    assert delegations(world.sessions)[0].granted_scopes == ["reports:read", "calendar:read"]


def test_client_secret_agents_connect_too(world: World) -> None:
    for method in ("client_secret_basic", "client_secret_post"):
        register_agent(world.sessions, world.vault, world.oauth, world.clock,
                       name=f"agent-{method[14:]}", provider_name="acme", environment="test",
                       scopes=parse_scopes("reports:read"), required_scopes=[],
                       auth_method=method, public_url=PUBLIC_URL, operator="tester")
    browser = world.browser()
    world.sign_in(browser, "alice")

    assert world.connect(browser, "alice", agent="agent-basic").status_code == 303
    assert world.connect(browser, "alice", agent="agent-post").status_code == 303
    assert len(delegations(world.sessions)) == 2


def test_connect_needs_sign_in_first_and_comes_back(world: World) -> None:
    browser = world.browser()

    first = browser.get("/connect/reporter")

    assert first.status_code == 303
    assert first.headers["location"] == "/auth/login?next=/connect/reporter"
    login = browser.get(first.headers["location"])
    back = browser.get(world.fake.authorize(login.headers["location"], "alice"))
    assert back.headers["location"] == "/connect/reporter"
    with world.sessions() as s:
        assert s.scalars(select(User.subject)).all() == ["alice"]


def test_unknown_and_malformed_agent_names_are_404(world: World) -> None:
    browser = world.browser()
    world.sign_in(browser, "alice")
    assert browser.get("/connect/nobody").status_code == 404
    assert browser.get("/connect/" + "a" * 300).status_code == 404
    assert browser.get("/connect/%3Cscript%3E").status_code == 404
    assert "<script>" not in browser.get("/connect/%3Cscript%3E").text
