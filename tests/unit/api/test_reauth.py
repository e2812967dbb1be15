"""The re-authorisation link and the grants page's action, against the in-memory AS.

The whole loop with a real SMTP server, the real AS and Chromium is in
tests/integration/test_reauth.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid

import httpx
import pytest
from sqlalchemy import select, update

from api.reauth import RedactReauthTokens
from delegation import reauth, revocation
from delegation.runs import queue_run
from models import AuthorizationRequest, Delegation, JobRun, ReauthLink, User
from tests.unit.api.conftest import World, query
from tests.unit.api.helpers import actions, delegations, open_tokens, snapshot

KEYS = reauth.LinkKeys(b"k" * 48)


def connected(world: World, sub: str = "alice") -> httpx.Client:
    browser = world.browser()
    world.sign_in(browser, sub)
    assert world.connect(browser, sub, grant=["reports:read"]).status_code == 303
    return browser


def break_it(world: World, sub: str = "alice") -> Delegation:
    """The AS said invalid_grant: broken, with a parked run."""
    with world.sessions.begin() as s:
        row = s.scalars(select(Delegation).join(User, Delegation.user_id == User.id)
                        .where(User.subject == sub)).one()
        run = queue_run(s, job="nightly-report", user_id=row.user_id, agent_id=row.agent_id,
                        now=world.clock.now())
        run.status, run.reason = "parked", "delegation_broken"
        row.status, row.status_reason = "broken", "invalid_grant"
        row.broken_at, row.version = world.clock.now(), row.version + 1
        s.flush()
        s.expunge(row)
        return row


def mint(world: World, row: Delegation, *, days: int = 7) -> str:
    link_id = uuid.uuid4()
    now = world.clock.now()
    with world.sessions.begin() as s:
        s.add(ReauthLink(id=link_id, token_hash=KEYS.token_hash(link_id),
                         delegation_id=row.id, user_id=row.user_id, created_at=now,
                         expires_at=now + dt.timedelta(days=days), kind="broken"))
    return KEYS.token(link_id)


def link(world: World, token: str) -> ReauthLink:
    with world.sessions() as s:
        return s.scalars(select(ReauthLink)
                         .where(ReauthLink.token_hash == reauth.digest(token))).one()


def press(browser: httpx.Client, page: httpx.Response, action: str) -> httpx.Response:
    """Click the page's one button (a link to `action`)."""
    assert f'href="{action}" id="reauthorize"' in page.text
    return browser.get(action)


def runs(world: World) -> list[tuple[str, str | None]]:
    with world.sessions() as s:
        return [(r.status, r.reason) for r in s.scalars(select(JobRun))]


# --- the link, signed in as its user ---------------------------------------------------------


def test_the_link_repairs_the_same_delegation_once_and_requeues_its_parked_run(
        world: World) -> None:
    alice = connected(world)
    before = break_it(world)
    token = mint(world, before)

    # Alice opens the link: what broke, what re-authorising grants (in words), one button.
    page = alice.get(f"/reauth/{token}")
    assert page.status_code == 200
    assert "Re-authorise reporter" in page.text
    assert "see your reports" in page.text and "calendar" not in page.text
    assert "nightly-report: 1 run waiting" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "same-origin"

    # The button starts the connect flow for the same agent and the scopes she had granted,
    to_as = press(alice, page, f"/reauth/{token}/start")
    assert to_as.status_code == 303
    assert query(to_as.headers["location"])["scope"].split() == ["openid", "reports:read"]
    done = alice.get(world.fake.authorize(to_as.headers["location"], "alice"))
    assert done.status_code == 303 and done.headers["location"] == "/grants?connected=reporter"

    # and the delegation is the same one, with new tokens, active, the link used up,
    (after,) = delegations(world.sessions)
    assert (after.id, after.status, after.version) == (before.id, "active", before.version + 1)
    assert open_tokens(world.vault, after).refresh_token in world.fake.refresh_tokens
    assert link(world, token).used_at == world.clock.now()
    assert "delegation:reauthorized" in actions(world.sessions)
    # its parked run queued again,
    assert runs(world) == [("queued", "requeued")]
    # and the link refused from now on.
    again = alice.get(f"/reauth/{token}")
    assert again.status_code == 410 and "already used" in again.text
    assert world.secrets_seen() == []


def test_not_signed_in_the_link_goes_through_sign_in_without_storing_the_token(
        world: World) -> None:
    connected(world)
    row = break_it(world)
    token = mint(world, row)
    browser = world.browser()  # a fresh browser: the mail was opened elsewhere

    page = browser.get(f"/reauth/{token}")
    assert page.status_code == 200 and "Sign in and re-authorise reporter" in page.text
    to_login = press(browser, page, f"/reauth/{token}/start")
    assert to_login.headers["location"] == "/auth/login?next=/reauth/resume"
    to_as = browser.get(to_login.headers["location"])
    back = browser.get(world.fake.authorize(to_as.headers["location"], "alice"))
    assert back.headers["location"] == "/reauth/resume"
    consent = browser.get("/reauth/resume")
    assert consent.headers["location"].startswith(world.fake.issuer)
    done = browser.get(world.fake.authorize(consent.headers["location"], "alice"))

    assert done.headers["location"] == "/grants?connected=reporter"
    assert delegations(world.sessions)[0].status == "active"
    with world.sessions() as s:
        return_to = set(s.scalars(select(AuthorizationRequest.return_to)))
    assert return_to == {None, "/grants", "/reauth/resume"}
    assert all(token not in (r or "") for r in return_to)


# --- refusals --------------------------------------------------------------------------------


def test_a_link_opened_while_signed_in_as_someone_else_repairs_nothing(world: World) -> None:
    connected(world, "alice")
    token = mint(world, break_it(world, "alice"))
    bob = world.browser()
    world.sign_in(bob, "bob")
    before = snapshot(world.sessions)

    page = bob.get(f"/reauth/{token}")
    assert page.status_code == 403
    assert "signed in as bob" in page.text and "another account" in page.text
    assert 'id="sign-out"' in page.text
    forced = bob.get(f"/reauth/{token}/start")
    assert forced.status_code == 403 and "another account" in forced.text

    assert snapshot(world.sessions) == before
    assert link(world, token).used_at is None


def test_consent_given_at_the_as_as_someone_else_repairs_nothing(world: World) -> None:
    alice = connected(world, "alice")
    token = mint(world, break_it(world, "alice"))
    page = alice.get(f"/reauth/{token}")
    to_as = press(alice, page, f"/reauth/{token}/start")
    before = snapshot(world.sessions)

    done = alice.get(world.fake.authorize(to_as.headers["location"], "bob"))

    assert done.status_code == 403
    assert "someone other than the person signed in" in done.text
    assert snapshot(world.sessions) == before
    assert link(world, token).used_at is None  # still usable by alice


def test_tampered_expired_and_revoked_links_are_refused(world: World) -> None:
    alice = connected(world)
    row = break_it(world)
    token = mint(world, row)
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for bad in (tampered, "short", "x" * 300):
        response = alice.get(f"/reauth/{bad}")
        assert response.status_code == 404 and "not valid" in response.text
    world.clock.advance(7 * 24 * 3600)
    expired = alice.get(f"/reauth/{token}")
    assert expired.status_code == 410 and "expired" in expired.text
    fresh = mint(world, row)
    revocation.revoke(world.sessions, world.clock, row.id, actor_type="user", actor="alice")
    revoked = alice.get(f"/reauth/{fresh}")
    assert revoked.status_code == 410 and "revoked" in revoked.text


def test_a_link_retired_while_the_user_is_at_the_as_stores_nothing(world: World) -> None:
    alice = connected(world)
    token = mint(world, break_it(world))
    to_as = press(alice, alice.get(f"/reauth/{token}"), f"/reauth/{token}/start")
    # Meanwhile the delegation is repaired another way (a plain reconnect): the link retires.
    assert world.connect(alice, "alice").status_code == 303
    before = snapshot(world.sessions)

    late = alice.get(world.fake.authorize(to_as.headers["location"], "alice"))

    assert late.status_code == 409 and "used or retired" in late.text
    assert snapshot(world.sessions) == before


def test_resuming_needs_the_cookie_the_link_set_in_this_browser(world: World) -> None:
    connected(world)
    token = mint(world, break_it(world))
    stranger = world.browser()
    assert stranger.get("/reauth/resume").status_code == 400
    stranger.cookies.set("behalf_reauth", "forged", path="/reauth")
    assert stranger.get("/reauth/resume").status_code == 400
    # opening the page (as a mail scanner would) uses nothing up and starts nothing
    before = snapshot(world.sessions)
    with world.sessions() as s:
        pending = len(s.scalars(select(AuthorizationRequest.id)).all())
    assert stranger.get(f"/reauth/{token}").status_code == 200
    assert snapshot(world.sessions) == before
    with world.sessions() as s:
        assert len(s.scalars(select(AuthorizationRequest.id)).all()) == pending


# --- the grants page's action ------------------------------------------------------------------


def test_grants_marks_a_broken_grant_with_a_reauthorise_action_leading_to_the_same_flow(
        world: World) -> None:
    alice = connected(world)
    row = break_it(world)
    old_link = mint(world, row)

    (grant,) = alice.get("/api/grants").json()["grants"]
    assert grant["status"] == "broken"
    assert grant["reauthorize_url"] == f"/reauth/delegation/{row.id}"
    assert 'class="reauthorize"' in alice.get("/grants").text

    page = alice.get(grant["reauthorize_url"])
    assert page.status_code == 200 and "Re-authorise reporter" in page.text
    to_as = press(alice, page, grant["reauthorize_url"] + "/start")
    alice.get(world.fake.authorize(to_as.headers["location"], "alice"))

    (after,) = delegations(world.sessions)
    assert (after.id, after.status) == (row.id, "active")
    assert runs(world) == [("queued", "requeued")]
    assert link(world, old_link).invalidated_at is not None  # repaired another way
    assert alice.get(f"/reauth/{old_link}").status_code == 410
    (grant,) = alice.get("/api/grants").json()["grants"]
    assert grant["reauthorize_url"] is None
    assert alice.get(f"/reauth/delegation/{row.id}").status_code == 409


def test_the_action_is_only_for_the_users_own_grants(world: World) -> None:
    connected(world, "alice")
    row = break_it(world, "alice")
    bob = world.browser()
    world.sign_in(bob, "bob")
    assert bob.get(f"/reauth/delegation/{row.id}").status_code == 404
    assert bob.get(f"/reauth/delegation/{row.id}/start").status_code == 404
    assert bob.get("/reauth/delegation/not-a-uuid").status_code == 404
    anonymous = world.browser().get(f"/reauth/delegation/{row.id}")
    assert anonymous.headers["location"] == f"/auth/login?next=/reauth/delegation/{row.id}"


def test_access_logs_do_not_record_link_tokens() -> None:
    def record(path: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                                 '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5000", "GET", path, "1.1", 200), None)

    secret = record("/reauth/SECRETTOKENSECRETTOKENSECRETTOKENSECRETTOK")
    RedactReauthTokens().filter(secret)
    assert "SECRET" not in secret.getMessage() and "/reauth/<redacted>" in secret.getMessage()
    kept = record("/reauth/resume")
    RedactReauthTokens().filter(kept)
    assert "/reauth/resume" in kept.getMessage()


@pytest.mark.parametrize("status", ["active", "revoked"])
def test_only_a_broken_delegation_can_be_reauthorised_from_grants(world: World,
                                                                   status: str) -> None:
    alice = connected(world)
    with world.sessions.begin() as s:
        s.execute(update(Delegation).values(status=status))
    (row,) = delegations(world.sessions)
    response = alice.get(f"/reauth/delegation/{row.id}")
    assert response.status_code == 409 and "nothing to re-authorise" in response.text
